"""MaskedMetric behaves like any torchmetrics metric and counts only the valid time steps."""

import os
import socket
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy, MulticlassF1Score

from lightning_tbptt import BatchError, ConfigurationError, MaskedMetric, NoSegmentError, TBPTTCallback
from tests.helpers import LENGTHS, SequenceRegressor, loader_of, make_trainer, padded_batches


def random_steps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    preds = torch.randn(3, 6, 4, generator=generator)
    target = torch.randint(0, 4, (3, 6), generator=generator)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4])[:, None]
    return preds, target, mask


def test_update_compute_forward_reset_match_the_plain_metric_on_valid_steps():
    preds, target, mask = random_steps()
    masked = MaskedMetric(MulticlassAccuracy(num_classes=4))
    plain = MulticlassAccuracy(num_classes=4)
    batch_value = masked(preds, target, mask=mask)
    assert batch_value == plain(preds[mask], target[mask])
    preds2, target2, mask2 = random_steps(seed=1)
    masked.update(preds2, target2, mask=mask2)
    plain.update(preds2[mask2], target2[mask2])
    assert masked.compute() == plain.compute()
    masked.reset()
    masked.update(preds2, target2, mask=mask2)
    assert masked.compute() == MulticlassAccuracy(num_classes=4)(preds2[mask2], target2[mask2])


def test_update_bookkeeping_and_dtype_reach_like_a_plain_metric():
    preds, target, mask = random_steps()
    metric = MaskedMetric(MeanSquaredError())
    assert not metric.update_called
    metric.update(preds[..., 0], target.double(), mask=mask)
    assert metric.update_called
    assert metric.update_count == 1
    metric.set_dtype(torch.float64)
    assert metric.metric.sum_squared_error.dtype == torch.float64


def test_a_mask_that_selects_nothing_leaves_the_metric_as_it_is():
    # a classification metric refuses an empty update: a segment with no valid step must not reach it
    preds, target, mask = random_steps()
    nothing = torch.zeros_like(mask)
    masked, plain = MaskedMetric(MulticlassAccuracy(num_classes=4)), MulticlassAccuracy(num_classes=4)
    masked.update(preds, target, mask=nothing)
    masked.update(preds, target, mask=mask)
    assert torch.isnan(masked(preds, target, mask=nothing))
    masked.update(preds, target, mask=nothing)
    plain.update(preds[mask], target[mask])
    assert torch.equal(masked.compute(), plain.compute())
    assert masked.update_count == 4


def test_metric_collection_of_masked_metrics():
    preds, target, mask = random_steps()
    collection = MetricCollection(
        {
            "acc": MaskedMetric(MulticlassAccuracy(num_classes=4)),
            "f1": MaskedMetric(MulticlassF1Score(num_classes=4, average="macro")),
        }
    )
    collection.update(preds, target, mask=mask)
    preds2, target2, mask2 = random_steps(seed=1)
    collection.update(preds2, target2, mask=mask2)
    values = collection.compute()
    all_preds, all_target = torch.cat([preds[mask], preds2[mask2]]), torch.cat([target[mask], target2[mask2]])
    assert values["acc"] == MulticlassAccuracy(num_classes=4)(all_preds, all_target)
    assert values["f1"] == MulticlassF1Score(num_classes=4, average="macro")(all_preds, all_target)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric MeanSquaredError was called before")
def test_state_dict_round_trip():
    preds = torch.randn(2, 5, 1)
    target = torch.randn(2, 5, 1)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    metric = MaskedMetric(MeanSquaredError())
    metric.persistent(True)
    metric.update(preds, target, mask=mask)
    state = metric.state_dict()
    assert set(state) == {"metric.sum_squared_error", "metric.total"}
    restored = MaskedMetric(MeanSquaredError())
    restored.persistent(True)
    restored.load_state_dict(state)
    assert torch.equal(restored.compute(), metric.compute())
    assert MaskedMetric(MeanSquaredError()).state_dict() == {}, "not persistent by default, like torchmetrics"


@pytest.mark.parametrize(
    ("preds", "target", "mask", "match"),
    [
        (torch.zeros(3, 5), torch.zeros(3, 6), torch.ones(3, 6, dtype=torch.bool), r"`preds` to start with the mask"),
        (torch.zeros(3, 6), torch.zeros(6, 3), torch.ones(3, 6, dtype=torch.bool), r"`target` to start with the mask"),
        (torch.zeros(3, 6), torch.zeros(3, 6), torch.ones(3, 6), r"2-D boolean tensor but got dtype torch.float32"),
        (torch.zeros(3, 6), torch.zeros(3, 6), torch.ones(3, dtype=torch.bool), r"but got dtype torch.bool and shape"),
    ],
    ids=["preds", "target", "float-mask", "1-D-mask"],
)
def test_shape_mismatches(preds, target, mask, match):
    with pytest.raises(BatchError, match=match):
        MaskedMetric(MeanSquaredError()).update(preds, target, mask=mask)


def test_wrapping_something_else_and_using_it_without_a_mask_outside_a_segment():
    with pytest.raises(ConfigurationError, match=r"`metric` to be a torchmetrics `Metric` but got function"):
        MaskedMetric(torch.nn.functional.mse_loss)  # type: ignore[arg-type]
    with pytest.raises(NoSegmentError):
        MaskedMetric(MeanSquaredError()).update(torch.zeros(2, 3), torch.zeros(2, 3))


class Frozen(SequenceRegressor):
    """Learning rate 0, so the predictions of the fit are those of one pass over each whole sequence afterwards."""

    def __init__(self) -> None:
        super().__init__(log=False)
        self.classes = torch.nn.Linear(6, 3)
        self.accuracy = MaskedMetric(MulticlassAccuracy(num_classes=3))
        self.f1 = MaskedMetric(BinaryF1Score())
        self.mse = MaskedMetric(MeanSquaredError())

    def outputs(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, _ = self.rnn(x, state)
        return self.classes(out), torch.sigmoid(self.head(out))[..., 0], self.head(out)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits, probability, value = self.outputs(batch["x"])
        self.accuracy(logits, batch["classes"])
        self.f1(probability, batch["binary"])
        self.mse(value, batch["y"])
        self.log_dict({"accuracy": self.accuracy, "f1": self.f1, "mse": self.mse}, on_step=True, on_epoch=True)
        return value.sum() * 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_masked_metrics_over_a_padded_segmented_epoch_equal_plain_metrics_on_the_unpadded_sequences(tmp_path):
    batches = padded_batches(LENGTHS, pad_to=25)
    for batch in batches:
        batch["classes"] = (batch["x"][..., 0] > 0).long() + (batch["x"][..., 1] > 0).long()
        batch["binary"] = (batch["x"][..., 2] > 0).long()
    model = Frozen().double()
    trainer = make_trainer(tmp_path, [TBPTTCallback(5, lengths="lengths")])
    trainer.fit(model, loader_of(batches))

    logits, probability, value, classes, binary, y = [], [], [], [], [], []
    with torch.no_grad():
        for batch in batches:
            for row, n in enumerate(batch["lengths"].tolist()):
                outputs = model.outputs(batch["x"][row : row + 1, :n])
                for into, out in zip((logits, probability, value), outputs, strict=True):
                    into.append(out[0])
                classes.append(batch["classes"][row, :n])
                binary.append(batch["binary"][row, :n])
                y.append(batch["y"][row, :n])
    metrics = trainer.callback_metrics
    expected_accuracy = MulticlassAccuracy(num_classes=3)(torch.cat(logits), torch.cat(classes))
    assert metrics["accuracy_epoch"] == pytest.approx(expected_accuracy.item())
    assert metrics["f1_epoch"] == pytest.approx(BinaryF1Score()(torch.cat(probability), torch.cat(binary)).item())
    assert metrics["mse_epoch"] == pytest.approx(MeanSquaredError()(torch.cat(value), torch.cat(y)).item())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sync_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        preds, target, mask = random_steps(seed=rank)
        metric = MaskedMetric(MulticlassAccuracy(num_classes=4))
        metric.update(preds, target, mask=mask)
        value = metric.compute()
        if rank == 0:
            torch.save(value, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_masked_metric_syncs_across_two_processes():
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "value.pt")
        mp.start_processes(_sync_worker, args=(_free_port(), out), nprocs=2, start_method="spawn", join=True)
        synced = torch.load(out)
    parts = [random_steps(seed=rank) for rank in range(2)]
    all_preds = torch.cat([p[m] for p, _, m in parts])
    all_target = torch.cat([t[m] for _, t, m in parts])
    assert synced == MulticlassAccuracy(num_classes=4)(all_preds, all_target)
