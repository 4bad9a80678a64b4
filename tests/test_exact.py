"""``exact=True``: the gradient through the whole batch, against hand-written loops that keep every segment's graph."""

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from lightning_tbptt import BatchError, ConfigurationError, TBPTTCallback, current_segment
from lightning_tbptt.state import detach_state
from tests.helpers import (
    LENGTHS,
    LR,
    MOMENTUM,
    SequenceRegressor,
    loader_of,
    make_loader,
    make_trainer,
    max_difference,
    padded_batches,
    parameters_equal,
    twin,
)
from tests.test_distributed import LAYOUT, SEGMENT, WORLD, masks, rank_batches, run_ddp
from tests.test_streaming import BATCHES, LANES, LaneRegressor, lane_batches
from tests.test_streaming import SEGMENT as LANE_SEGMENT
from tests.test_variable_length import MaskedRegressor

ARCHITECTURES = {
    "lstm-2-layers": {"cell": "lstm", "num_layers": 2},
    "gru": {"cell": "gru"},
    "lstm-proj_size": {"cell": "lstm", "hidden_size": 7, "proj_size": 4},
    "gru-2-layers-time-first": {"cell": "gru", "num_layers": 2, "batch_first": False},
}

Optimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def sgd(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=LR, momentum=MOMENTUM)


def adam(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=0.01)


class Regressor(SequenceRegressor):
    """The plain per-step regressor, with a choice of optimizer and of loss reduction (a mean per call, or a sum)."""

    def __init__(self, optimizer: Optimizer = sgd, reduction: str = "mean", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.make_optimizer = optimizer
        self.reduction = reduction

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y, reduction=self.reduction)
        if self.reduction == "sum":
            loss = loss / 92  # about the steps of a batch: steps of the size of a mean's
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


def reference_exact(
    model: Any,
    loader: Iterable[Any],
    *,
    segment_length: int,
    epochs: int = 1,
    optimizer: Optimizer = sgd,
    clip: float | None = None,
    time_dim: int = 1,
    accumulate: int = 1,
) -> int:
    """The oracle: every segment of a batch is run with its graph kept (no detach), their losses summed, one backward
    and one optimizer step per batch (or per ``accumulate`` batches and at the end of the epoch, losses divided by
    it). Returns the number of optimizer steps."""
    optim = optimizer(model.parameters())
    steps = 0
    for _ in range(epochs):
        batches = list(loader)
        for b, (x, y) in enumerate(batches):
            state, total = None, 0.0
            for start in range(0, x.shape[time_dim], segment_length):
                x_seg = x.narrow(time_dim, start, min(segment_length, x.shape[time_dim] - start))
                out, state = model.rnn(x_seg, state)
                y_seg = y.narrow(time_dim, start, x_seg.shape[time_dim])
                total = total + F.mse_loss(model.head(out), y_seg)
            (total / accumulate).backward()
            if (b + 1) % accumulate == 0 or b == len(batches) - 1:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optim.step()
                optim.zero_grad()
                steps += 1
    return steps


def fit(tmp_path: Any, model: Any, callbacks: list[Any], loader: Any, **kwargs: Any) -> Any:
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model, loader)
    return trainer


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_exact_equals_backpropagating_the_summed_losses_through_the_whole_batch(tmp_path, architecture):
    kwargs = ARCHITECTURES[architecture]
    time_dim = 1 if kwargs.get("batch_first", True) else 0
    torch.manual_seed(0)
    model = Regressor(**kwargs).double()
    reference = twin(model)
    loader = make_loader(batch_first=time_dim == 1)  # 3 batches of 23 steps: segments of 5, the last of 3
    trainer = fit(tmp_path, model, [TBPTTCallback(5, exact=True, time_dim=time_dim)], loader, max_epochs=2)
    steps = reference_exact(reference, loader, segment_length=5, epochs=2, time_dim=time_dim)
    assert trainer.global_step == steps == 6
    assert max_difference(model, reference) < 1e-12


@pytest.mark.parametrize(
    ("optimizer", "clip", "accumulate"),
    [(adam, None, 1), (sgd, 0.05, 1), (sgd, None, 2)],
    ids=["adam", "clipping", "accumulate-2-batches"],
)
def test_exact_keeps_the_optimizer_clipping_and_accumulation(tmp_path, optimizer, clip, accumulate):
    torch.manual_seed(0)
    model = Regressor(optimizer=optimizer, num_layers=2).double()
    reference = twin(model)
    loader = make_loader()
    trainer = fit(
        tmp_path,
        model,
        [TBPTTCallback(5, exact=True)],
        loader,
        max_epochs=2,
        gradient_clip_val=clip,
        accumulate_grad_batches=accumulate,
    )
    steps = reference_exact(
        reference, loader, segment_length=5, epochs=2, optimizer=optimizer, clip=clip, accumulate=accumulate
    )
    assert trainer.global_step == steps == (6 if accumulate == 1 else 4)
    assert max_difference(model, reference) < 1e-12


def test_truncated_step_per_batch_differs_from_the_exact_gradient(tmp_path):
    """The negative control: the same objective and steps, truncated at segment boundaries, is not exact."""
    torch.manual_seed(0)
    model = Regressor(num_layers=2).double()
    reference = twin(model)
    loader = make_loader()
    fit(tmp_path, model, [TBPTTCallback(5, step_per="batch")], loader, max_epochs=2)
    reference_exact(reference, loader, segment_length=5, epochs=2)
    assert max_difference(model, reference) > 1e-3


@pytest.mark.parametrize("segment_length", [5, 23, 64])
def test_a_summed_loss_trained_exactly_equals_plain_lightning_on_the_whole_sequence(tmp_path, segment_length):
    """With a loss that sums over time steps, the segments' losses add up to the whole sequence's loss."""
    torch.manual_seed(0)
    model = Regressor(reduction="sum").double()
    plain = twin(model)
    loader = make_loader()
    fit(tmp_path, model, [TBPTTCallback(segment_length, exact=True)], loader, max_epochs=2)
    fit(tmp_path, plain, [], loader, max_epochs=2)
    assert max_difference(model, plain) < 1e-12


class Dropping(Regressor):
    """Dropout inside the LSTM (between its layers) and before the head: both draw random numbers."""

    def __init__(self) -> None:
        super().__init__(num_layers=2)
        self.rnn = nn.LSTM(3, 6, num_layers=2, dropout=0.4, batch_first=True)
        self.dropout = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(self.dropout(out))


def test_dropout_draws_the_same_random_numbers_in_the_recomputation(tmp_path):
    torch.manual_seed(0)
    model = Dropping().double()
    reference = twin(model)
    loader = make_loader()
    torch.manual_seed(1)
    fit(tmp_path, model, [TBPTTCallback(5, exact=True)], loader, max_epochs=2)
    after_fit = torch.get_rng_state()

    torch.manual_seed(1)
    optim = sgd(reference.parameters())
    reference.train()
    for _ in range(2):
        for x, y in list(loader):
            state, total = None, 0.0
            for start in range(0, x.shape[1], 5):
                out, state = reference.rnn(x[:, start : start + 5], state)
                total = total + F.mse_loss(reference.head(reference.dropout(out)), y[:, start : start + 5])
            total.backward()
            optim.step()
            optim.zero_grad()
    assert max_difference(model, reference) < 1e-12
    # the generator moved on by one forward per segment, as in the reference: the recomputation drew nothing new
    assert torch.equal(after_fit, torch.get_rng_state())
    # and without replaying, the dropout masks of the recomputation would differ from the first pass: not exact
    torch.manual_seed(0)
    unreplayed = Dropping().double()
    torch.manual_seed(1)
    fit(tmp_path, unreplayed, [TBPTTCallback(5, step_per="batch")], loader, max_epochs=2)
    assert max_difference(unreplayed, reference) > 1e-3


class Recording(Regressor):
    """Records every call of ``training_step``: the segment, the pass, whether gradients are on, and the loss."""

    def __init__(self) -> None:
        super().__init__(log=False)
        self.calls: list[tuple[int, int, bool, bool, float]] = []
        self.metric = MeanMetric()
        self.backwards = SumMetric()
        self.hooks: dict[str, int] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        segment = current_segment()
        loss = super().training_step(batch, batch_idx)
        grad = torch.is_grad_enabled()
        self.calls.append((batch_idx, segment.index, segment.recomputing, grad, float(loss.detach())))
        self.metric.update(loss)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("metric", self.metric, on_step=False, on_epoch=True)
        return loss

    def _count(self, name: str) -> None:
        self.hooks[name] = self.hooks.get(name, 0) + 1

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._count("on_before_backward")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self._count("on_before_optimizer_step")
        self.log("steps_logged", float(self.hooks["on_before_optimizer_step"]), on_step=True, reduce_fx="max")

    def on_after_backward(self) -> None:
        self.backwards.update(torch.tensor(1.0))  # runs in the recomputation only: counted there

    def on_before_zero_grad(self, optimizer: Any) -> None:
        self._count("on_before_zero_grad")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._count("on_train_batch_end")
        self.last_outputs = outputs


def test_each_segment_runs_twice_logs_once_and_counts_once_in_metrics(tmp_path):
    torch.manual_seed(0)
    model = Recording().double()
    trainer = fit(tmp_path, model, [TBPTTCallback(5, exact=True)], make_loader(), max_epochs=1)
    per_batch = 10  # 5 segments, twice
    assert len(model.calls) == 3 * per_batch
    first = model.calls[:per_batch]
    # the first pass: forward order, without gradient; the recomputation: last to first, with gradient
    assert [(s, r, g) for _, s, r, g, _ in first] == [(i, False, False) for i in range(5)] + [
        (i, True, True) for i in reversed(range(5))
    ]
    # the recomputation's losses are the first pass's, bit for bit
    assert [loss for *_, loss in first[:5]] == [loss for *_, loss in reversed(first[5:])]
    first_pass = [loss for b, _, recomputing, _, loss in model.calls if not recomputing]
    assert trainer.global_step == 3
    # one optimizer step per batch; one backward per segment; gradients zeroed once per batch
    assert model.hooks == {
        "on_before_backward": 15,
        "on_before_optimizer_step": 3,
        "on_before_zero_grad": 3,
        "on_train_batch_end": 3,
    }
    # logged once per segment: the epoch mean weights each segment by its valid steps (4 rows x 5 or 3 steps)
    weights = [5, 5, 5, 5, 3] * 3
    expected = sum(w * loss for w, loss in zip(weights, first_pass, strict=True)) / sum(weights)
    assert float(trainer.callback_metrics["train_loss_epoch"]) == pytest.approx(expected, rel=1e-6)
    # the on_step value is the batch's last segment's, and so is the output the batch returns
    assert float(trainer.callback_metrics["train_loss_step"]) == pytest.approx(first_pass[-1], rel=1e-6)
    assert float(model.last_outputs["loss"]) == pytest.approx(first_pass[-1], rel=1e-12)
    # the metric counted each segment once (the recomputation's updates were undone)
    assert float(trainer.callback_metrics["metric"]) == pytest.approx(sum(first_pass) / 15, rel=1e-6)
    # hooks that run in the recomputation only log and update metrics as usual
    assert float(trainer.callback_metrics["steps_logged"]) == 3
    assert float(model.backwards.compute()) == 15


class KeepsLosses(Regressor):
    """The documented recipe for a side effect that is not a metric: skip it in the recomputation."""

    def __init__(self) -> None:
        super().__init__(log=False)
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if not current_segment().recomputing:
            self.losses.append(float(loss.detach()))
        return loss


def test_a_side_effect_skipped_in_the_recomputation_happens_once_per_segment(tmp_path):
    torch.manual_seed(0)
    model = KeepsLosses().double()
    reference = twin(model)
    loader = make_loader()
    fit(tmp_path, model, [TBPTTCallback(5, exact=True)], loader)
    expected = []
    with torch.no_grad():
        for x, y in loader:  # the first batch's losses are those of the initial model
            state = None
            for start in range(0, 23, 5):
                out, state = reference.rnn(x[:, start : start + 5], state)
                expected.append(float(F.mse_loss(reference.head(out), y[:, start : start + 5])))
            break
    assert len(model.losses) == 15
    assert model.losses[:5] == pytest.approx(expected, rel=1e-12)


class Validated(Regressor):
    def __init__(self) -> None:
        super().__init__(log=False)
        self.validated: list[tuple[int, bool, bool]] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        segment = current_segment()
        self.validated.append((segment.index, segment.recomputing, torch.is_grad_enabled()))
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))


def test_evaluation_is_unchanged_each_segment_runs_once(tmp_path):
    torch.manual_seed(0)
    model = Validated().double()
    trainer = fit(tmp_path, model, [TBPTTCallback(5, exact=True)], make_loader(), limit_train_batches=1)
    model.validated.clear()
    trainer.validate(model, make_loader(), verbose=False)
    assert model.validated == [(i, False, False) for i in range(5)] * 3


class Skips(Regressor):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        return None if current_segment().index == 2 else loss


def test_a_segment_without_a_loss_is_refused_and_the_model_is_left_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = Skips().double()
    before = twin(model)
    with pytest.raises(BatchError, match=r"return a loss for every segment .* segment 2 returned NoneType"):
        fit(tmp_path, model, [TBPTTCallback(5, exact=True)], make_loader())
    assert parameters_equal(model, before, rtol=0, atol=0)
    assert "training_step" not in vars(model)  # the wrapper of the recomputation is gone


class Manual(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimization_is_refused_in_a_fit(tmp_path):
    with pytest.raises(ConfigurationError, match=r"exact=True\)` cannot work with manual optimization"):
        fit(tmp_path, Manual().double(), [TBPTTCallback(5, exact=True)], make_loader())


def reference_exact_lanes(model: Any, batches: list[Any], segment_length: int) -> int:
    """Streaming with resets, exactly: every lane runs alone, its state zeroed at each start marker, every segment's
    graph kept through the batch, the state detached between batches; one backward and step per batch."""
    optimizer = sgd(model.parameters())
    states: list[Any] = [None] * LANES
    for batch in batches:
        x, y, starts = batch["x"], batch["y"], batch["starts"]
        length = x.shape[1]
        total = 0.0
        for start in range(0, length, segment_length):
            stop = min(start + segment_length, length)
            outputs = []
            for lane in range(LANES):
                state, pieces, begin = states[lane], [], start
                cuts = [step for step in range(start, stop) if starts[lane, step]]
                for cut in [*cuts, stop]:
                    if cut > begin:
                        out, state = model.rnn(x[lane : lane + 1, begin:cut], state)
                        pieces.append(out)
                    if cut < stop:
                        state = None  # a new sequence starts at `cut`: no gradient crosses it
                    begin = cut
                outputs.append(torch.cat(pieces, dim=1))
                states[lane] = state
            total = total + F.mse_loss(model.head(torch.cat(outputs)), y[:, start:stop])
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
        states = [None if s is None else detach_state(s) for s in states]
    return len(batches)


def test_streaming_with_resets_is_exact_inside_each_batch(tmp_path):
    batches = lane_batches()
    torch.manual_seed(0)
    model = LaneRegressor(num_layers=2, log=False).double()
    reference = twin(model)
    callback = TBPTTCallback(LANE_SEGMENT, streaming=True, resets="starts", exact=True)
    trainer = fit(tmp_path, model, [callback], loader_of(batches))
    assert trainer.global_step == reference_exact_lanes(reference, batches, LANE_SEGMENT) == BATCHES
    assert max_difference(model, reference) < 1e-12


def reference_exact_sequences(model: Any, batches: list[dict[str, torch.Tensor]], segment_length: int) -> int:
    """Padded batches, exactly: every sequence runs alone over its valid steps with its graph kept; each segment's
    loss is the masked mean over its valid steps; their sum is backpropagated once per batch."""
    optimizer = sgd(model.parameters())
    for batch in batches:
        x, y, lengths = batch["x"], batch["y"], batch["lengths"].tolist()
        states: list[Any] = [None] * len(lengths)
        total = 0.0
        for start in range(0, max(lengths), segment_length):
            squared, count = 0.0, 0
            for row, length in enumerate(lengths):
                n = min(max(length - start, 0), segment_length)
                if n == 0:
                    continue
                out, states[row] = model.rnn(x[row : row + 1, start : start + n], states[row])
                squared = squared + ((model.head(out) - y[row : row + 1, start : start + n]) ** 2).sum()
                count += n
            total = total + squared / count
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
    return len(batches)


@pytest.mark.parametrize("drop_finished", [False, True], ids=["keep-rows", "drop-finished"])
def test_padded_sequences_are_exact_and_padding_takes_no_part(tmp_path, drop_finished):
    batches = padded_batches(LENGTHS, pad_to=25)
    torch.manual_seed(0)
    model = MaskedRegressor(cell="gru", num_layers=2).double()
    reference = twin(model)
    callback = TBPTTCallback(4, lengths="lengths", drop_finished=drop_finished, exact=True)
    trainer = fit(tmp_path, model, [callback], loader_of(batches))
    assert trainer.global_step == reference_exact_sequences(reference, batches, 4) == 3
    assert max_difference(model, reference) < 1e-12
    # segments past the longest sequence are not run: 23 steps -> 6 segments, 16 -> 4, 20 -> 5; each twice
    assert len(model.steps_run) == 2 * (6 + 4 + 5)


def reference_exact_ddp(model: Any) -> dict[str, Any]:
    """DDP by hand, exactly: each rank's batch backpropagated whole (the sum of its segments' masked losses), the
    gradient averaged over ranks, one step per batch."""
    optimizer = sgd(model.parameters())
    data = {rank: rank_batches(rank) for rank in LAYOUT}
    squared, valid = 0.0, 0
    for b in range(len(LAYOUT[0])):
        loss = torch.zeros((), dtype=torch.float64)
        for rank in LAYOUT:
            x, y, lengths = data[rank][b]
            state = None
            for start in range(0, int(lengths.max()), SEGMENT):
                stop = min(start + SEGMENT, int(lengths.max()))
                out, state = model.rnn(x[:, start:stop], state)
                mask = masks(lengths, start, stop - start)
                errors = (model.head(out) - y[:, start:stop]).pow(2).squeeze(-1)
                loss = loss + errors[mask].sum() / mask.sum().clamp(min=1)
                squared += float(errors[mask].detach().sum())
                valid += int(mask.sum())
        (loss / WORLD).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"metric": squared / valid}


def test_two_processes_with_different_segment_counts_are_exact_with_one_gradient_sync_per_batch(tmp_path):
    ranks = run_ddp(tmp_path, "ddp", "exact")
    torch.manual_seed(0)  # as the script does before building its model
    reference = SequenceRegressor(log=False).double()
    expected = reference_exact_ddp(reference)
    for rank in ranks:
        for key, value in reference.state_dict().items():
            assert torch.allclose(rank["parameters"][key], value, rtol=0, atol=1e-10), key
        assert rank["global_step"] == 2
        # one agreement all-reduce and one gradient all-reduce per batch (every other backward under `no_sync`)
        assert rank["per_batch"] == [(1, 1), (1, 1)]
        assert rank["counts"] == [5] * 5 + [3] * 3  # backward hooks: each rank's segments, then idle steps
        assert rank["metric"] == pytest.approx(expected["metric"], rel=1e-6)  # each valid step counted once
