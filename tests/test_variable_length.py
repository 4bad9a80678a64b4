"""Variable-length, padded sequences in real fits: exact to the time step against per-sequence reference loops."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_tbptt import (
    BatchError,
    ConfigurationError,
    NoSegmentError,
    TBPTTCallback,
    current_segment,
    masked_mean,
)
from lightning_tbptt.state import detach_state
from tests.helpers import (
    LENGTHS,
    LR,
    MOMENTUM,
    SequenceRegressor,
    fit_with_twin,
    loader_of,
    make_trainer,
    padded_batches,
    parameters_equal,
)


class MaskedRegressor(SequenceRegressor):
    """Per-step regression on padded batches; the loss counts valid steps only."""

    def __init__(self, cell: str = "lstm", **kwargs: Any) -> None:
        super().__init__(cell=cell, **kwargs)
        self.steps_run: list[tuple[int | None, int, int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        segment = current_segment()
        self.steps_run.append((segment.start, segment.length, batch["x"].shape[0]))
        out, _ = self.rnn(batch["x"])
        loss = masked_mean((self.head(out) - batch["y"]) ** 2)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss


def reference_per_sequence(model: Any, batches: list[dict[str, torch.Tensor]], segment_length: int) -> int:
    """The oracle: every sequence is run alone over its valid steps only, with its own carried state.

    A segment's loss is the sum of squared errors over the valid steps of all sequences divided by their number, as
    the masked mean is; segments start every ``segment_length`` steps up to the longest sequence of the batch, the
    part the library runs. Returns the number of optimizer steps.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    steps = 0
    for batch in batches:
        x, y, lengths = batch["x"], batch["y"], batch["lengths"].tolist()
        states: list[Any] = [None] * len(lengths)
        for start in range(0, max(lengths), segment_length):
            total, count = 0.0, 0
            for row, length in enumerate(lengths):
                n = min(max(length - start, 0), segment_length)
                if n == 0:
                    continue
                out, state = model.rnn(x[row : row + 1, start : start + n], states[row])
                total = total + ((model.head(out) - y[row : row + 1, start : start + n]) ** 2).sum()
                count += n
                states[row] = detach_state(state)
            (total / count).backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    return steps


@pytest.mark.parametrize("drop_finished", [False, True], ids=["keep-rows", "drop-finished"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padded_training_equals_per_sequence_reference(tmp_path, cell, drop_finished):
    batches = padded_batches(LENGTHS, pad_to=25)
    callback = TBPTTCallback(5, lengths="lengths", drop_finished=drop_finished)
    model, reference, _, trainer = fit_with_twin(
        tmp_path, lambda: MaskedRegressor(cell, num_layers=2).double(), [callback], loader_of(batches)
    )
    steps = reference_per_sequence(reference, batches, segment_length=5)
    # segments up to the longest sequence: 23 -> 5, 16 -> 4, 20 -> 4 (the padded length 25 would give 5 each)
    assert trainer.global_step == steps == 5 + 4 + 4
    assert parameters_equal(model, reference)


def test_fully_padded_segments_are_never_run_and_finished_rows_can_be_dropped(tmp_path):
    batches = padded_batches([[12, 3, 7, 1]], pad_to=20)
    model = MaskedRegressor().double()
    callback = TBPTTCallback(5, lengths="lengths", drop_finished=True)
    trainer = make_trainer(tmp_path, [callback])
    trainer.fit(model, loader_of(batches))
    # (start, length, rows): segments 15-20 and the padded tail of 10-15 do not run; ended rows are dropped
    assert model.steps_run == [(0, 5, 4), (5, 5, 2), (10, 2, 1)]
    assert trainer.global_step == 3


def test_dropping_finished_rows_gives_the_same_parameters_as_keeping_them(tmp_path):
    batches = padded_batches(LENGTHS)
    results = []
    for drop_finished in (False, True):
        callback = TBPTTCallback(4, lengths="lengths", drop_finished=drop_finished, step_per="batch")
        fitted = fit_with_twin(tmp_path, lambda: MaskedRegressor(num_layers=2).double(), [callback], loader_of(batches))
        results.append(fitted.model)
    assert parameters_equal(results[0], results[1])


class OwnMaskRegressor(SequenceRegressor):
    """A model that masks by the lengths it finds in its batch, knowing nothing of segments."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out, _ = self.rnn(batch["x"])
        steps = torch.arange(batch["x"].shape[1])
        mask = (steps < batch["lengths"][:, None]).unsqueeze(-1)
        return (((self.head(out) - batch["y"]) ** 2) * mask).sum() / mask.sum()


def test_a_model_that_masks_by_its_own_lengths_gets_segment_lengths(tmp_path):
    batches = padded_batches(LENGTHS)
    callback = TBPTTCallback(5, lengths="lengths")
    model, reference, _, _ = fit_with_twin(
        tmp_path, lambda: OwnMaskRegressor().double(), [callback], loader_of(batches)
    )
    reference_per_sequence(reference, batches, segment_length=5)
    assert parameters_equal(model, reference)


class PackingRegressor(SequenceRegressor):
    """Packs each segment by its lengths (which must then never be 0)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        lengths = batch["lengths"].cpu()
        packed = pack_padded_sequence(batch["x"], lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=batch["x"].shape[1])
        return masked_mean((self.head(out) - batch["y"]) ** 2)


def test_a_model_that_packs_each_segment_works_with_dropped_rows(tmp_path):
    batches = padded_batches(LENGTHS)
    callback = TBPTTCallback(5, lengths="lengths", drop_finished=True)
    model, reference, _, _ = fit_with_twin(
        tmp_path, lambda: PackingRegressor().double(), [callback], loader_of(batches)
    )
    reference_per_sequence(reference, batches, segment_length=5)
    assert parameters_equal(model, reference)


class FrozenRegressor(MaskedRegressor):
    """Learning rate 0: predictions stay those of the initial model, so epoch aggregates can be computed by hand."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def mean_squared_error_by_hand(model: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """The mean over every valid time step of the epoch, each sequence run alone over its valid steps."""
    squared_errors = []
    with torch.no_grad():
        for batch in batches:
            for row, n in enumerate(batch["lengths"].tolist()):
                out, _ = model.rnn(batch["x"][row : row + 1, :n])
                squared_errors.append(((model.head(out) - batch["y"][row : row + 1, :n]) ** 2).flatten())
    return torch.cat(squared_errors).mean().item()


def test_epoch_loss_is_the_mean_over_all_valid_time_steps(tmp_path):
    batches = padded_batches(LENGTHS)
    model = FrozenRegressor().double()
    trainer = make_trainer(tmp_path, [TBPTTCallback(5, lengths="lengths")])
    trainer.fit(model, loader_of(batches))
    by_hand = mean_squared_error_by_hand(model, batches)
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(by_hand, rel=1e-12)


class ExplicitBatchSize(FrozenRegressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("equal_weights", loss, on_step=False, on_epoch=True, batch_size=1)
        return loss


def test_an_explicit_batch_size_still_wins(tmp_path):
    batches = padded_batches(LENGTHS)
    model = ExplicitBatchSize().double()
    losses: list[float] = []
    model.log = _recording(model.log, losses)  # type: ignore[method-assign]
    trainer = make_trainer(tmp_path, [TBPTTCallback(5, lengths="lengths")])
    trainer.fit(model, loader_of(batches))
    segment_losses = losses[::2]
    assert trainer.callback_metrics["equal_weights"].item() == pytest.approx(sum(segment_losses) / len(segment_losses))


def _recording(log: Any, into: list[float]) -> Any:
    def wrapper(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        into.append(float(value.detach()))
        log(name, value, *args, **kwargs)

    return wrapper


class LogsInAnotherHookToo(FrozenRegressor):
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.log("grad_norm", 1.0, on_step=False, on_epoch=True)


def test_epoch_loss_stays_exact_when_other_hooks_log_between_segments(tmp_path):
    """Lightning clears a hook's logged values when it logs during an epoch's first batch; not between segments."""
    batches = padded_batches(LENGTHS)
    model = LogsInAnotherHookToo().double()
    trainer = make_trainer(tmp_path, [TBPTTCallback(5, lengths="lengths")], max_epochs=2)
    trainer.fit(model, loader_of(batches))
    by_hand = mean_squared_error_by_hand(model, batches)
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(by_hand, rel=1e-12)
    assert trainer.callback_metrics["grad_norm"].item() == pytest.approx(1.0)


def test_masked_mean_accumulates_half_precision_without_overflow():
    values = torch.full((64, 512), 3.0, dtype=torch.float16)
    mean = masked_mean(values, torch.ones(64, 512, dtype=torch.bool))
    assert mean.dtype == torch.float16
    assert mean.item() == 3.0


def test_masked_mean_needs_a_boolean_mask():
    with pytest.raises(BatchError, match=r"2-D boolean tensor but got dtype torch.int64"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.long))


class MaskRecorder(MaskedRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.masks.append(current_segment().mask.clone())
        return super().training_step(batch, batch_idx)


def test_the_mask_marks_exactly_the_real_steps(tmp_path):
    batches = padded_batches([[7, 2, 5]])
    model = MaskRecorder().double()
    make_trainer(tmp_path, [TBPTTCallback(3, lengths="lengths")]).fit(model, loader_of(batches))
    full = torch.cat(model.masks, dim=1)
    expected = torch.arange(7)[None, :] < torch.tensor([7, 2, 5])[:, None]
    assert torch.equal(full, expected)


class ValidatesWithTheAccessor(MaskedRegressor):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        current_segment()


def test_the_accessor_outside_a_segment(tmp_path):
    batches = padded_batches(LENGTHS)
    callback = TBPTTCallback(5, lengths="lengths", evaluate=False)
    trainer = make_trainer(tmp_path, [callback], num_sanity_val_steps=0)
    with pytest.raises(NoSegmentError, match=r"no segment is running\. Outside a segment, pass the mask"):
        trainer.fit(ValidatesWithTheAccessor().double(), loader_of(batches), loader_of(batches))
    with pytest.raises(NoSegmentError):
        masked_mean(torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("batches", "match"),
    [
        ([{"x": torch.zeros(2, 4, 3), "y": torch.zeros(2, 4, 1)}], r"no key 'lengths' \(its keys: \['x', 'y'\]\)"),
        (
            [{"x": torch.zeros(2, 4, 3), "y": torch.zeros(2, 4, 1), "lengths": torch.tensor([4, 6])}],
            r"between 0 and the padded length 4 but got values from 4 to 6",
        ),
        (
            [{"x": torch.zeros(2, 4, 3), "y": torch.zeros(2, 4, 1), "lengths": torch.tensor([4.0, 2.0])}],
            r"integer tensor but got dtype torch.float32",
        ),
    ],
    ids=["missing", "too-long", "float"],
)
def test_bad_lengths_in_a_fit(tmp_path, batches, match):
    trainer = make_trainer(tmp_path, [TBPTTCallback(2, lengths="lengths")])
    with pytest.raises(BatchError, match=match):
        trainer.fit(MaskedRegressor(), loader_of(batches))


class CustomSplit(TBPTTCallback):
    def split_batch(self, batch: Any, segment_length: int) -> list[Any]:
        return [batch]


class HiddensModel(SequenceRegressor):
    def training_step(self, batch: Any, batch_idx: int, hiddens: Any) -> Any:
        return None


@pytest.mark.parametrize(
    ("callback", "model", "match"),
    [
        (CustomSplit(5, lengths="lengths"), SequenceRegressor(), r"cannot be combined with a custom `split_batch`"),
        (
            TBPTTCallback(5, lengths="lengths", drop_finished=True),
            HiddensModel(),
            r"\(drop_finished=True\)` cannot work with `hiddens`",
        ),
    ],
    ids=["custom-split", "hiddens"],
)
def test_combinations_that_cannot_work(tmp_path, callback, model, match):
    with pytest.raises(ConfigurationError, match=match):
        make_trainer(tmp_path, [callback]).fit(model, loader_of(padded_batches(LENGTHS)))


def test_drop_finished_needs_lengths():
    with pytest.raises(ConfigurationError, match=r"`lengths` to be set with `drop_finished=True` but got None"):
        TBPTTCallback(5, drop_finished=True)
    with pytest.raises(ConfigurationError, match=r"`drop_finished` to be a bool but got 'yes'"):
        TBPTTCallback(5, lengths=2, drop_finished="yes")  # type: ignore[arg-type]


def test_unmodified_model_with_ignore_index_keeps_working(tmp_path):
    """A classifier whose loss ignores padded labels needs nothing from the library but the skipped tails."""

    class Tagger(SequenceRegressor):
        def __init__(self) -> None:
            super().__init__(log=False)
            self.head = torch.nn.Linear(6, 4)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            out, _ = self.rnn(batch["x"])
            return F.cross_entropy(self.head(out).transpose(1, 2), batch["tags"], ignore_index=-100)

    batches = padded_batches(LENGTHS)
    for batch in batches:
        steps = torch.arange(batch["x"].shape[1])
        tags = (batch["x"][..., 0] > 0).long() + 2 * (batch["x"][..., 1] > 0).long()
        batch["tags"] = tags.masked_fill(steps[None, :] >= batch["lengths"][:, None], -100)
    model = Tagger().double()
    trainer = make_trainer(tmp_path, [TBPTTCallback(5, lengths="lengths")])
    trainer.fit(model, loader_of(batches))
    assert trainer.global_step == 5 + 4 + 4
    assert all(torch.isfinite(p).all() for p in model.parameters()), "no all-padding segment ran (its loss is NaN)"
