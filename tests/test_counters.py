"""Exact counts: hooks, optimizer steps, ``global_step``, the logger step, schedulers and ``max_steps``."""

from collections import Counter
from typing import Any

import pytest
import torch
from pytorch_lightning.callbacks import (
    Callback,
    GradientAccumulationScheduler,
    LearningRateFinder,
    StochasticWeightAveraging,
)
from pytorch_lightning.loggers.logger import Logger
from torch.utils.data import DataLoader

from lightning_tbptt import TBPTTCallback
from tests.helpers import (
    SequenceRegressor,
    fit_with_twin,
    make_data,
    make_loader,
    make_trainer,
    parameters_equal,
    reference_tbptt,
    twin,
)

# 12 sequences of 23 steps in batches of 4, segments of 5: 3 batches of 5 segments per epoch
BATCHES, SEGMENTS = 3, 5


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))


class CountingModel(SequenceRegressor):
    def __init__(self, scheduler: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: Counter[str] = Counter()
        self.segment_losses: list[float] = []
        self.use_scheduler = scheduler

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls["training_step"] += 1
        loss = super().training_step(batch, batch_idx)
        self.segment_losses.append(loss.item())
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.calls["on_train_batch_start"] += 1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.calls["on_train_batch_end"] += 1
        assert batch[0].shape[1] == 23, "batch hooks see the whole batch"
        # the last segment's loss, divided by `accumulate_grad_batches` as Lightning does
        last = self.segment_losses[-1] / self.trainer.accumulate_grad_batches
        assert outputs["loss"].item() == pytest.approx(last), "outputs are the last segment's"

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.calls["on_before_backward"] += 1

    def on_after_backward(self) -> None:
        self.calls["on_after_backward"] += 1

    def on_before_zero_grad(self, optimizer: Any) -> None:
        self.calls["on_before_zero_grad"] += 1

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.calls["on_before_optimizer_step"] += 1

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, **kwargs: Any) -> None:
        self.calls["configure_gradient_clipping"] += 1
        super().configure_gradient_clipping(optimizer, gradient_clip_val, **kwargs)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self.calls["optimizer_step"] += 1
        super().optimizer_step(*args, **kwargs)

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        if not self.use_scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CallbackCounter(Callback):
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def on_before_backward(self, *args: Any) -> None:
        self.calls["on_before_backward"] += 1

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.calls["on_before_optimizer_step"] += 1

    def on_train_batch_end(self, *args: Any) -> None:
        self.calls["on_train_batch_end"] += 1


# (step_per, accumulate, segment_length) -> optimizer steps, batches after which Lightning steps (its per-batch rule)
CASES = {
    ("segment", 1, 5): (15, 3),
    ("batch", 1, 5): (3, 3),
    # segments 2, 4 | 6, 8, 10 | 12, 14, 15 step (15: the end of a batch after which Lightning steps)
    ("segment", 2, 5): (8, 2),
    # two segments per batch: the optimizer steps in every batch, schedulers and the logger follow Lightning's rule
    # (batches 2 and 3), which is what `trainer.estimated_stepping_batches` counts
    ("segment", 2, 12): (3, 2),
    # batches 2 and 3 (end of epoch)
    ("batch", 2, 5): (2, 2),
}


@pytest.mark.parametrize("log_every", ["step", "batch"])
@pytest.mark.parametrize(
    ("step_per", "accumulate", "segment_length"), list(CASES), ids=[f"{s}-accumulate={a}-k={k}" for s, a, k in CASES]
)
def test_hook_and_step_counts(tmp_path, step_per, accumulate, segment_length, log_every):
    steps, stepping_batches = CASES[(step_per, accumulate, segment_length)]
    model = CountingModel(scheduler=True).double()
    logger, counter = RecordingLogger(), CallbackCounter()
    trainer = make_trainer(
        tmp_path,
        [TBPTTCallback(segment_length, step_per=step_per, log_every=log_every), counter],
        logger=logger,
        log_every_n_steps=1,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=10.0,
    )
    trainer.fit(model, make_loader())

    segments = BATCHES * -(-23 // segment_length)
    assert model.calls == {
        "training_step": segments,
        "on_before_backward": segments,
        "on_after_backward": segments,
        "on_train_batch_start": BATCHES,
        "on_train_batch_end": BATCHES,
        "on_before_zero_grad": steps,
        "on_before_optimizer_step": steps,
        "configure_gradient_clipping": steps,
        # Lightning calls the `optimizer_step` hook only for steps, not for accumulating segments
        "optimizer_step": steps,
    }
    assert counter.calls == {"on_before_backward": segments, "on_before_optimizer_step": steps, "on_train_batch_end": 3}
    assert trainer.global_step == steps
    # step-interval schedulers and the logger's step advance once per batch after which Lightning steps
    assert trainer.estimated_stepping_batches == stepping_batches
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == stepping_batches
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**stepping_batches)
    logged_steps = [step for step, metrics in logger.records if "train_loss_step" in metrics]
    # "step": a row after every optimizer step, at `global_step - 1` (where plain Lightning puts the row of its
    # optimizer step); "batch": a row per batch after which Lightning steps, at the count of such batches
    assert logged_steps == list(range(steps if log_every == "step" else stepping_batches))
    (epoch_row,) = [step for step, metrics in logger.records if "train_loss_epoch" in metrics]
    # the epoch row goes where the row of the last step went, as Lightning does
    assert epoch_row == (steps if log_every == "step" else stepping_batches) - 1


@pytest.mark.parametrize("log_every", ["step", "batch"])
def test_logged_step_value_is_last_segment_and_epoch_value_is_mean_over_time_steps(tmp_path, log_every):
    model = CountingModel().double()
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, [TBPTTCallback(5, log_every=log_every)], logger=logger, log_every_n_steps=1)
    trainer.fit(model, make_loader())
    step_values = [metrics["train_loss_step"] for _, metrics in logger.records if "train_loss_step" in metrics]
    if log_every == "step":  # every segment's own value
        assert step_values == pytest.approx(model.segment_losses)
    else:  # the last segment's value of every batch
        assert step_values == pytest.approx(model.segment_losses[SEGMENTS - 1 :: SEGMENTS])
    (epoch_value,) = [metrics["train_loss_epoch"] for _, metrics in logger.records if "train_loss_epoch" in metrics]
    # each segment's mean is weighted by its time steps (4 sequences x 5, 5, 5, 5, 3 steps): the mean over all steps
    steps = [4 * n for n in (5, 5, 5, 5, 3)] * BATCHES
    weighted = sum(loss * n for loss, n in zip(model.segment_losses, steps, strict=True)) / sum(steps)
    assert epoch_value == pytest.approx(weighted)
    assert epoch_value != pytest.approx(sum(model.segment_losses) / len(model.segment_losses))


@pytest.mark.parametrize(
    ("step_per", "max_steps", "segments_run", "batches_started"),
    [("segment", 7, 7, 2), ("segment", 10, 10, 2), ("batch", 2, 10, 2)],
    ids=["segment-mid-batch", "segment-batch-boundary", "batch"],
)
def test_max_steps_stops_after_exactly_that_many_optimizer_steps(
    tmp_path, step_per, max_steps, segments_run, batches_started
):
    model = CountingModel().double()
    trainer = make_trainer(tmp_path, [TBPTTCallback(5, step_per=step_per)], max_epochs=-1, max_steps=max_steps)
    trainer.fit(model, make_loader())
    assert trainer.global_step == max_steps
    assert model.calls["training_step"] == segments_run
    assert model.calls["on_train_batch_start"] == batches_started


def test_validation_between_batches_does_not_clear_accumulated_gradients(tmp_path):
    """With segments accumulated across batches, nothing is pending when Lightning zeroes before validation."""

    class WithValidation(SequenceRegressor):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    # batches of 10, 15, 10 and 15 steps: 2, 3, 2, 3 segments of 5. With accumulate_grad_batches=2, batch 2 ends
    # with segment 5 alone in its group, and Lightning (2 % 2 == 0) zeroes the gradients before validation: the
    # schedule must have stepped on it
    batches = [make_data(num_sequences=4, length=n, seed=i) for i, n in enumerate([10, 15, 10, 15])]
    torch.manual_seed(0)
    model = WithValidation().double()
    reference = twin(model)
    trainer = make_trainer(
        tmp_path,
        [TBPTTCallback(5, step_per="segment")],
        accumulate_grad_batches=2,
        val_check_interval=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    counts = reference_tbptt(reference, batches, segment_length=5, accumulate=2)
    assert trainer.global_step == counts["steps"] == 6  # segments 2, 4, 5 | 7 | 9, 10
    assert parameters_equal(model, reference)


@pytest.mark.parametrize("step_per", [pytest.param("segment", marks=pytest.mark.slow), "batch"])
def test_accumulation_changed_by_a_gradient_accumulation_scheduler(tmp_path, step_per):
    scheduler = GradientAccumulationScheduler({0: 1, 1: 3})
    model, reference, loader, trainer = fit_with_twin(
        tmp_path, lambda: SequenceRegressor().double(), [TBPTTCallback(5, step_per=step_per), scheduler], max_epochs=2
    )
    counts = reference_tbptt(reference, loader, segment_length=5, epochs=2, step_per=step_per, accumulate=[1, 3])
    assert trainer.global_step == counts["steps"] == {"segment": 15 + 5, "batch": 3 + 1}[step_per]
    assert parameters_equal(model, reference)


class UnusedBatchNorm(SequenceRegressor):
    """A BatchNorm makes StochasticWeightAveraging add an epoch that only updates its statistics (no backward)."""

    def __init__(self) -> None:
        super().__init__(log=False)
        self.bn = torch.nn.BatchNorm1d(6)
        self.steps_per_epoch: list[int] = []

    def on_train_epoch_start(self) -> None:
        self.first_step = self.trainer.global_step

    def on_train_epoch_end(self) -> None:
        self.steps_per_epoch.append(self.trainer.global_step - self.first_step)


@pytest.mark.parametrize("step_per", [pytest.param("segment", marks=pytest.mark.slow), "batch"])
def test_epoch_without_backward_steps_like_lightning(tmp_path, step_per):
    """In StochasticWeightAveraging's BatchNorm epoch Lightning runs no backward and steps once, at the end."""
    model = UnusedBatchNorm().double()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    make_trainer(tmp_path, [TBPTTCallback(5, step_per=step_per), swa], max_epochs=2).fit(model, make_loader())
    per_batch = {"segment": 15, "batch": 3}[step_per]
    assert model.steps_per_epoch == [per_batch, per_batch, 1]


class RecordsSegmentLengths(SequenceRegressor):
    def __init__(self) -> None:
        super().__init__(log=False)
        self.lr = 0.1
        self.seen: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[0].shape[1])
        return super().training_step(batch, batch_idx)


def test_learning_rate_finder_trains_on_segments_too(tmp_path):
    """Tuner callbacks run their trial fit before any other callback's `on_fit_start`."""
    model = RecordsSegmentLengths().double()
    finder = LearningRateFinder(num_training_steps=4, early_stop_threshold=None)
    make_trainer(tmp_path, [TBPTTCallback(5), finder]).fit(model, make_loader())
    assert model.seen[:4] == [5, 5, 5, 5], "the finder's trial steps"
    # (how many batches the fit then runs after the trial differs between Lightning releases)
    assert set(model.seen[4:]) == {5, 3}, "whole sequences have 23 steps"


class ValidatingCountingModel(CountingModel):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.calls["validation_step"] += 1
        self(batch[0])


@pytest.mark.parametrize(("fast_dev_run", "batches"), [(True, 1), (2, 2)])
def test_fast_dev_run_runs_whole_batches_and_one_validation_batch_each(tmp_path, fast_dev_run, batches):
    model = ValidatingCountingModel().double()
    trainer = make_trainer(tmp_path, [TBPTTCallback(5)], fast_dev_run=fast_dev_run)
    loader = make_loader()
    trainer.fit(model, loader, loader)
    # every segment of each batch trains: Lightning alone would stop after `fast_dev_run` optimizer steps
    assert trainer.global_step == batches * SEGMENTS
    assert model.calls["training_step"] == batches * SEGMENTS
    assert model.calls["on_train_batch_end"] == batches
    assert model.calls["validation_step"] == batches * SEGMENTS  # `batches` validation batches, segmented
    # the Trainer's own limit is back once the fit is over
    assert trainer.fit_loop.epoch_loop.max_steps == batches


def test_max_steps_keeps_its_meaning_next_to_fast_dev_run_off(tmp_path):
    trainer = make_trainer(tmp_path, [TBPTTCallback(5)], max_steps=1)
    trainer.fit(CountingModel().double(), make_loader())
    assert trainer.global_step == 1
