"""The truncation probe (``probe_every``) and ``segment_length="auto"``, against direct measurements."""

import itertools
import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import SumMetric

from lightning_tbptt import ConfigurationError, ModelError, TBPTTCallback, current_segment
from lightning_tbptt.probe import relative_difference
from tests.helpers import SequenceRegressor, make_loader, make_trainer, twin

T = 32


class GradientsSeen(pl.Callback):
    """Keeps the gradient of every optimizer step, flattened."""

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps.append([p.grad.detach().clone() for p in pl_module.parameters()])


def first_gradient(tmp_path: Any, model: Any, callback: TBPTTCallback, loader: Any) -> list[torch.Tensor]:
    seen = GradientsSeen()
    make_trainer(tmp_path, [callback, seen], limit_train_batches=1).fit(model, loader)
    return seen.steps[0]


def probed(tmp_path: Any, model: Any, loader: Any, segment_length: int, **kwargs: Any) -> TBPTTCallback:
    callback = TBPTTCallback(segment_length, probe_every=1, **kwargs)
    make_trainer(tmp_path, [callback], limit_train_batches=1).fit(model, loader)
    return callback


class SecondHalf(SequenceRegressor):
    """Scores only the steps of the batch's second half (the probe's biases are those of that half's losses)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        start = current_segment().start
        assert start is not None
        return F.mse_loss(self(x), y) * float(start >= T // 2)


@pytest.mark.parametrize(
    ("model_kwargs", "segment_length"),
    [({"cell": "lstm", "num_layers": 2}, 8), ({"cell": "gru"}, 4), ({"cell": "lstm", "proj_size": 2}, 16)],
    ids=["lstm-2-layers", "gru", "lstm-proj_size"],
)
def test_the_probed_bias_equals_exact_against_truncated_gradients_of_the_same_batch(
    tmp_path, model_kwargs, segment_length
):
    # the probe spans the whole batch and scores its second half: its bias at each candidate length is, exactly, the
    # relative difference of the gradients of `exact=True` and of `step_per="batch"` with that length, both through
    # Lightning, of a model whose loss is on that half
    torch.manual_seed(0)
    model = SecondHalf(**model_kwargs, log=False).double()
    loader = make_loader(8, num_sequences=8, length=T)
    result = probed(tmp_path, twin(model), loader, segment_length, probe_horizon=T).probe_result
    assert result is not None and result.span == T and result.segment_length == segment_length
    longer = [segment_length * 2**i for i in range(5) if segment_length * 2**i < T]
    assert sorted(result.biases) == [segment_length // 4, segment_length // 2, *longer]
    for length, bias in result.biases.items():
        exact = first_gradient(tmp_path, twin(model), TBPTTCallback(length, exact=True), loader)
        truncated = first_gradient(tmp_path, twin(model), TBPTTCallback(length, step_per="batch"), loader)
        direct = relative_difference(exact, truncated)
        assert 0.001 < direct < 1
        assert math.isclose(bias, direct, rel_tol=1e-8), (length, bias, direct)
    assert result.bias == result.biases[segment_length]
    shorter_is_worse = [result.biases[c] for c in sorted(result.biases)]
    assert shorter_is_worse == sorted(shorter_is_worse, reverse=True)


def test_the_losses_of_the_first_half_of_the_span_do_not_count(tmp_path):
    # a model scoring every step: the probe measures the bias of its second half's losses (equal to the model that
    # scores only that half, same weights), not that of all its losses
    torch.manual_seed(0)
    model = SequenceRegressor(log=False).double()
    half = SecondHalf(log=False).double()
    half.load_state_dict(model.state_dict())
    loader = make_loader(8, num_sequences=8, length=T)
    result = probed(tmp_path, twin(model), loader, 8, probe_horizon=T).probe_result
    assert result is not None and sorted(result.biases) == [2, 4, 8, 16]

    def direct(module: Any, length: int) -> float:
        exact = first_gradient(tmp_path, twin(module), TBPTTCallback(length, exact=True), loader)
        return relative_difference(
            exact, first_gradient(tmp_path, twin(module), TBPTTCallback(length, step_per="batch"), loader)
        )

    for length, bias in result.biases.items():
        assert math.isclose(bias, direct(half, length), rel_tol=1e-8)
        assert not math.isclose(bias, direct(model, length), rel_tol=1e-2)


class FirstQuarter(SequenceRegressor):
    """Scores only the first quarter of the batch: nothing in the probed span's second half."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        start = current_segment().start
        assert start is not None
        return F.mse_loss(self(x), y) * float(start < T // 4)


def test_a_span_whose_second_half_scores_nothing_measures_no_bias(tmp_path):
    torch.manual_seed(0)
    loader = make_loader(4, num_sequences=4, length=T)
    result = probed(tmp_path, FirstQuarter(log=False).double(), loader, 4, probe_horizon=T).probe_result
    assert result is not None and result.biases == {} and result.bias is None and result.suggested is None
    assert "tbptt/probe_bias" not in result.metrics() and "tbptt/probe_suggested_length" not in result.metrics()
    # with "auto" (grid 2, 4, 8, starting at 8), nothing measured means no shorter length: it stays at the longest
    # (biases of 0 for want of a gradient would have halved it)
    callback = TBPTTCallback("auto", probe_every=1, min_segment_length=2, max_segment_length=8, probe_horizon=T)
    make_trainer(tmp_path, [callback], limit_train_batches=1).fit(FirstQuarter(log=False).double(), loader)
    assert callback.probe_result is not None and callback.probe_result.next_length == 8


class LinearRecurrence(nn.Module):
    """``h_t = a * h_{t-1} + W x_t`` with a fixed scalar ``a``: the gradient reaching ``h_{t-d}`` is ``a**d`` times the
    gradient reaching ``h_t`` (for a loss after ``t``), exactly."""

    def __init__(self, decay: float, input_size: int = 3, hidden_size: int = 5) -> None:
        super().__init__()
        self.decay = decay
        self.inputs = nn.Linear(input_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.new_zeros(x.shape[0], self.inputs.out_features) if state is None else state
        outputs = []
        for step in self.inputs(x).unbind(1):
            h = self.decay * h + step
            outputs.append(h)
        return torch.stack(outputs, 1), h


class LinearRegressor(SequenceRegressor):
    def __init__(self, decay: float) -> None:
        super().__init__(log=False)
        self.rnn = LinearRecurrence(decay)
        self.head = nn.Linear(5, 1)


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_the_decay_of_a_linear_recurrence_is_its_factor_in_closed_form(tmp_path, decay):
    torch.manual_seed(0)
    model = LinearRegressor(decay).double()
    loader = make_loader(4, num_sequences=4, length=T)
    result = probed(tmp_path, model, loader, 8, probe_horizon=T, recurrent_modules=["rnn"]).probe_result
    assert result is not None and result.band == 2
    distances = [d for d, _ in result.decay]
    assert distances == list(range(0, T - 2, 2))  # from the last band's start back to the second band's
    for distance, norm in result.decay:
        assert math.isclose(norm, decay**distance, rel_tol=1e-9), (distance, norm)
    assert result.decay_rate is not None and math.isclose(result.decay_rate, decay, rel_tol=1e-9)


class Noisy(SequenceRegressor):
    """Dropout, a metric, a buffer and a list: everything a probe could disturb."""

    def __init__(self) -> None:
        super().__init__(log=False)
        self.dropout = nn.Dropout(0.3)
        self.norm = nn.BatchNorm1d(1)
        self.total = SumMetric()
        self.calls: list[tuple[int, bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.dropout(x))
        return self.norm(self.head(out).transpose(1, 2)).transpose(1, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        segment = current_segment()
        self.calls.append((batch_idx, segment.probing, segment.index))
        loss = F.mse_loss(self(x), y)
        self.total.update(loss.detach())
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


@pytest.mark.parametrize("step_per", ["segment", "batch"])
def test_the_probe_leaves_training_exactly_as_without_it(tmp_path, step_per):
    torch.manual_seed(0)
    model = Noisy().double()
    loader = make_loader(4, num_sequences=12, length=T)
    runs = {}
    for probe_every in (None, 2):
        trained = twin(model)
        callback = TBPTTCallback(8, step_per=step_per, probe_every=probe_every)
        trainer = make_trainer(tmp_path, [callback], max_epochs=2)
        torch.manual_seed(1)
        trainer.fit(trained, loader)
        runs[probe_every] = (trained, trainer, callback, torch.get_rng_state())
    (plain, plain_trainer, _, plain_rng), (probed_model, probed_trainer, callback, probed_rng) = runs[None], runs[2]
    assert torch.equal(plain_rng, probed_rng)
    for (name, a), b in zip(plain.state_dict().items(), probed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # parameters, the BatchNorm statistics and the metric's state
    assert probed_trainer.global_step == plain_trainer.global_step == (24 if step_per == "segment" else 6)
    assert float(probed_trainer.callback_metrics["train_loss_epoch"]) == float(
        plain_trainer.callback_metrics["train_loss_epoch"]
    )
    # batches 0, 2 and 4 of the fit (epoch 0: 0 and 2; epoch 1: its second batch) are probed, in 16 bands of 2 steps
    probing = [(batch, index) for batch, probing, index in probed_model.calls if probing]
    assert [batch for batch, _ in probing] == [0] * 16 + [2] * 16 + [1] * 16
    assert [index for _, index in probing[:16]] == list(range(16))
    assert len(probed_model.calls) == len(plain.calls) + 48
    assert callback.probe_result is not None and callback.probe_result.batch == 4
    assert callback.probe_result.global_step == (16 if step_per == "segment" else 4)


def test_the_probe_logs_its_values_and_shows_the_bias(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    torch.manual_seed(0)
    logger = CSVLogger(tmp_path, name="probe")
    callback = TBPTTCallback(8, probe_every=2)
    trainer = make_trainer(tmp_path, [callback], logger=logger, log_every_n_steps=1)
    trainer.fit(SequenceRegressor().double(), make_loader(4, num_sequences=12, length=T))
    logger.save()
    rows = (tmp_path / "probe" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    probe_rows = [dict(zip(header, row.split(","), strict=True)) for row in rows[1:]]
    probe_rows = [row for row in probe_rows if row["tbptt/probe_bias"]]
    assert [int(row["step"]) for row in probe_rows] == [0, 8]  # batches 0 and 2, before their steps
    result = callback.probe_result
    assert result is not None
    assert float(probe_rows[-1]["tbptt/probe_bias"]) == pytest.approx(result.bias)
    assert float(probe_rows[-1]["tbptt/probe_segment_length"]) == 8
    assert float(probe_rows[-1]["tbptt/probe_seconds"]) == pytest.approx(result.seconds)
    assert trainer.progress_bar_metrics["tbptt/probe_bias"] == pytest.approx(result.bias)


def test_a_state_that_takes_no_gradient_is_refused(tmp_path):
    class Detaching(LinearRecurrence):
        def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            out, h = super().forward(x, None if state is None else state.detach())
            return out, h

    model = LinearRegressor(0.5).double()
    model.rnn = Detaching(0.5).double()
    before = twin(model)
    trainer = make_trainer(tmp_path, [TBPTTCallback(8, probe_every=1, recurrent_modules=["rnn"])])
    with pytest.raises(ModelError, match="found no gradient reaching the carried state of LinearRegressor"):
        trainer.fit(model, make_loader(4, num_sequences=4, length=T))
    pairs = zip(model.state_dict().values(), before.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert trainer.global_step == 0


class Manual(SequenceRegressor):
    def __init__(self) -> None:
        super().__init__(log=False)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


class OwnSplit(TBPTTCallback):
    def split_batch(self, batch: Any, segment_length: int) -> Any:
        return super().split_batch(batch, segment_length)


@pytest.mark.parametrize(
    ("model", "callback", "match"),
    [
        (Manual, TBPTTCallback(8, probe_every=1), r"probe_every=1\)` cannot work with manual optimization"),
        (Manual, TBPTTCallback("auto"), r"segment_length='auto'\)` cannot work with manual optimization"),
        (SequenceRegressor, OwnSplit(8, probe_every=3), "cannot be combined with a custom `split_batch`"),
    ],
    ids=["manual", "auto-manual", "custom-split"],
)
def test_probing_what_it_cannot_measure_is_refused_when_the_fit_starts(tmp_path, model, callback, match):
    with pytest.raises(ConfigurationError, match=match):
        make_trainer(tmp_path, [callback]).fit(model().double(), make_loader(4, num_sequences=4, length=T))


class Copier(SequenceRegressor):
    """The copy task with a lag: the target at step t is the input symbol at t - LAG."""

    def __init__(self, hidden_size: int = 16) -> None:
        super().__init__(log=False)
        self.calls: list[tuple[int, bool, int, int]] = []
        self.rnn = nn.LSTM(4, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        segment = current_segment()
        self.calls.append((batch_idx, segment.probing, segment.index, segment.length))
        loss = F.cross_entropy(self(x).transpose(1, 2), y, ignore_index=-100, reduction="sum")
        return loss / (y != -100).sum().clamp(min=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.02)


class Recorded(SequenceRegressor):
    """The plain regressor, recording every segment it runs."""

    def __init__(self) -> None:
        super().__init__(log=False)
        self.calls: list[tuple[int, bool, int, int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        segment = current_segment()
        self.calls.append((batch_idx, segment.probing, segment.index, segment.length))
        return super().training_step(batch, batch_idx)


def trained_lengths(model: Any) -> list[int]:
    """The segment length of each training batch the model ran."""
    return [length for _, probing, index, length in model.calls if index == 0 and not probing]


def auto_lengths(tmp_path: Any, **kwargs: Any) -> tuple[list[int], TBPTTCallback]:
    """The segment length every training batch of a run with ``segment_length="auto"`` trained with."""
    callback = TBPTTCallback("auto", **kwargs)
    torch.manual_seed(0)
    model = Recorded().double()
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(model, make_loader(8, num_sequences=64, length=T))
    lengths = trained_lengths(model)
    assert trainer.global_step == sum(-(-T // length) for length in lengths)  # a step per segment, at every length
    return lengths, callback


def test_auto_moves_the_segment_length_between_batches_by_at_most_a_factor_two(tmp_path):
    lengths, callback = auto_lengths(tmp_path, min_segment_length=2, max_segment_length=16, probe_every=2)
    assert len(lengths) == 16
    assert lengths[0] in (16, 8)  # from the longest length, changed by the first batch's probe at most by half
    for before, after in itertools.pairwise(lengths):
        assert after in (before, 2 * before, before // 2) and 2 <= after <= 16
    assert all(lengths[i] == lengths[i - 1] for i in range(1, 16, 2)), "changed only by a probe"
    assert len(set(lengths)) >= 3, lengths
    result = callback.probe_result
    assert result is not None and result.next_length == callback.current_segment_length == lengths[-1]


def test_auto_comes_down_at_once_to_the_length_that_holds_the_batch(tmp_path):
    # grid 8 ... 512 and batches of 32 steps: 512 and 32 both train one segment; the first probe goes to 32 (or its
    # half, 16), not to 256
    lengths, _ = auto_lengths(tmp_path, probe_every=4)
    assert lengths[0] in (32, 16), lengths
    assert max(lengths) <= 32


def copy_loader() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    symbols = torch.randint(0, 4, (64, T), generator=generator)
    targets = torch.full_like(symbols, -100)
    targets[:, 4:] = symbols[:, :-4]
    return DataLoader(TensorDataset(F.one_hot(symbols, 4).double(), targets), batch_size=8)


def test_resuming_auto_goes_on_with_the_length_and_the_schedule_of_the_uninterrupted_run(tmp_path):
    # saved at the end of the first epoch (a plain DataLoader keeps no position: it resumes exactly only there, and
    # only from a checkpoint of `on_train_epoch_end`: Lightning before 2.5 runs the last batch again after one saved at
    # that batch's end)
    from pytorch_lightning.callbacks import ModelCheckpoint

    def run(ckpt_path: Any = None, saves: bool = False) -> tuple[Any, TBPTTCallback]:
        callback = TBPTTCallback("auto", min_segment_length=2, max_segment_length=16, probe_every=5)
        saving = ModelCheckpoint(tmp_path, "{epoch}", every_n_epochs=1, save_top_k=-1) if saves else None
        callbacks: list[Any] = [callback] + ([saving] if saving else [])
        torch.manual_seed(0)
        model = Recorded().double()
        loader = make_loader(8, num_sequences=64, length=T)
        trainer = make_trainer(tmp_path, callbacks, max_epochs=2, enable_checkpointing=saves)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return model, callback

    whole, whole_callback = run(saves=True)
    checkpoint = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)
    (entry,) = [v for k, v in checkpoint["callbacks"].items() if "TBPTTCallback" in k]
    assert entry["probe"]["batches"] == 8 and entry["config"]["segment_length"] == "auto"
    lengths = trained_lengths(whole)
    assert entry["probe"]["segment_length"] == lengths[7] != 16  # (not the length "auto" starts from)
    assert len(set(lengths[8:])) > 1, "the resumed part must change its length for the test to mean anything"
    resumed, resumed_callback = run(ckpt_path=tmp_path / "epoch=0.ckpt")
    pairs = zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert trained_lengths(resumed) == lengths[8:]
    probed_batches = [batch for batch, probing, index, _ in resumed.calls if probing and index == 0]
    assert probed_batches == [2, 7]  # fit batches 10 and 15: the second epoch's 3rd and 8th
    assert resumed_callback.probe_result is not None and whole_callback.probe_result is not None
    assert resumed_callback.probe_result.biases == whole_callback.probe_result.biases


def test_a_checkpoint_entry_with_a_broken_probe_record_is_refused():
    from lightning_tbptt.checkpoint import CheckpointRecord

    entry = CheckpointRecord(probe={"batches": 2, "segment_length": 8}).to_dict()
    assert CheckpointRecord.from_dict(entry).probe == {"batches": 2, "segment_length": 8}
    with pytest.raises(ConfigurationError, match=r"`probe` as None or a dict of `batches`.*it holds \{'batches': -1"):
        CheckpointRecord.from_dict({**entry, "probe": {"batches": -1, "segment_length": 8}})
