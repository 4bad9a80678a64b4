"""Checkpoints in streaming mode: resuming after any batch gives exactly the parameters of an uninterrupted run."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from packaging.version import Version
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_tbptt import BatchError, ConfigurationError, LaneDataModule, TBPTTCallback
from tests.helpers import LR, MOMENTUM, make_trainer, parameters_equal

SEGMENT, STEPS, LANES = 5, 12, 4  # 3 segments (5, 5, 2) and so 3 optimizer steps per batch


class StreamRegressor(pl.LightningModule):
    """Predicts the next value of a stream; nothing about TBPTT or streaming appears in it."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(1, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out, _ = self.rnn(batch["input"].unsqueeze(-1))
        return F.mse_loss(self.head(out).squeeze(-1), batch["target"])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def stream_data(lanes: int = LANES) -> LaneDataModule:
    generator = np.random.default_rng(0)
    sequences = [np.cumsum(generator.normal(size=n)) / 5 for n in (130, 97, 60)]
    return LaneDataModule(sequences, lanes=lanes, steps=STEPS, target_shift=1)


def fit(tmp_path: Path, ckpt_path: Path | None = None, every: int = 0, lanes: int = LANES) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = StreamRegressor().double()
    callbacks: list[Any] = [TBPTTCallback(SEGMENT, streaming=True, resets="starts")]
    if every:
        callbacks.append(ModelCheckpoint(tmp_path, "{epoch}-{step}", every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, enable_checkpointing=bool(every))
    trainer.fit(model, datamodule=stream_data(lanes), ckpt_path=ckpt_path)
    return model, trainer


def checkpoint(tmp_path: Path, name: str) -> Path:
    (path,) = tmp_path.glob(f"{name}.ckpt")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, int]:
    directory = tmp_path_factory.mktemp("uninterrupted")
    model, trainer = fit(directory, every=6)  # a checkpoint after every second batch
    return model, directory, trainer.global_step


@pytest.mark.parametrize(
    "name", ["epoch=0-step=6", "epoch=0-step=12", "epoch=0-step=18", "epoch=1-step=24", "epoch=1-step=30"]
)
def test_resuming_mid_epoch_equals_the_uninterrupted_run(tmp_path, uninterrupted, name):
    model, directory, global_step = uninterrupted
    assert global_step == 2 * 6 * 3, "6 batches per epoch (71 steps per lane), 3 segments each"
    resumed, trainer = fit(tmp_path, ckpt_path=checkpoint(directory, name))
    assert trainer.global_step == global_step
    assert parameters_equal(resumed, model, rtol=0, atol=1e-12)


def test_resuming_without_the_carried_state_would_differ(tmp_path, uninterrupted):
    """Negative control: the carried state in the checkpoint is what makes the resumed run exact."""
    model, directory, _ = uninterrupted
    path = checkpoint(directory, "epoch=0-step=6")
    stripped = torch.load(path, weights_only=False)
    (key,) = [key for key in stripped["callbacks"] if "TBPTTCallback" in key]
    stripped["callbacks"][key]["carried"] = {}
    torch.save(stripped, tmp_path / "stripped.ckpt")
    resumed, _ = fit(tmp_path, ckpt_path=tmp_path / "stripped.ckpt")
    assert not parameters_equal(resumed, model, rtol=0, atol=1e-12)


def test_resuming_with_another_lane_layout(tmp_path, uninterrupted):
    _, directory, _ = uninterrupted
    if Version(pl.__version__) >= Version("2.2"):  # the training loader refuses the 12 batches per epoch of 2 lanes
        error, match = (
            ConfigurationError,
            r"training stream to have the 6 batches per epoch of the checkpoint .* has 12",
        )
    else:  # Lightning restores no loader state: the callback refuses the first batch
        error, match = BatchError, r"which carries the state of 4 lanes, but the batch has 2 rows"
    with pytest.raises(error, match=match):
        fit(tmp_path, ckpt_path=checkpoint(directory, "epoch=0-step=6"), lanes=2)


def test_resuming_with_another_streaming_setting(tmp_path, uninterrupted):
    _, directory, _ = uninterrupted
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEGMENT)], max_epochs=2)
    with pytest.raises(ConfigurationError, match=r"saved with `streaming=True`\. Resume with the same setting"):
        trainer.fit(StreamRegressor(), datamodule=stream_data(), ckpt_path=checkpoint(directory, "epoch=0-step=6"))


class Recording(StreamRegressor):
    """Records the `batch_idx` and first value of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, batch_idx, float(batch["input"][0, 0])))
        return super().training_step(batch, batch_idx)


def fit_recording(tmp_path: Path, callbacks: list[Any], ckpt_path: Path | None = None, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    model = Recording().double()
    trainer = make_trainer(tmp_path, callbacks, **{"max_epochs": 2, **kwargs})
    trainer.fit(model, datamodule=stream_data(), ckpt_path=ckpt_path)
    return model, trainer


def streaming(**kwargs: Any) -> TBPTTCallback:
    return TBPTTCallback(SEGMENT, streaming=True, resets="starts", **kwargs)


class SavesEveryBatch(pl.Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.saved = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.saved += 1
        trainer.save_checkpoint(self.directory / f"batch={self.saved}.ckpt")


@pytest.mark.parametrize(
    "options", [{"step_per": "segment"}, {"step_per": "batch"}, {"exact": True}], ids=["segment", "batch", "exact"]
)
def test_resuming_in_the_middle_of_an_accumulation_restores_the_pending_gradients(tmp_path, options):
    every = SavesEveryBatch(tmp_path)
    model, trainer = fit_recording(tmp_path, [streaming(**options), every], accumulate_grad_batches=2)
    checkpoints = sorted(tmp_path.glob("batch=*.ckpt"), key=lambda path: int(path.stem.split("=")[1]))
    pending = [
        path
        for path in checkpoints
        if "gradients" in torch.load(path, weights_only=False)["callbacks"]["TBPTTCallback"]
    ]
    assert pending, "some checkpoints are taken while gradients are accumulated"
    for path in pending[:3]:
        resumed, resumed_trainer = fit_recording(
            tmp_path / path.stem, [streaming(**options)], path, accumulate_grad_batches=2
        )
        assert resumed_trainer.global_step == trainer.global_step
        assert parameters_equal(resumed, model, rtol=0, atol=1e-12), path.name
        assert resumed.seen == [seen for seen in model.seen if seen in resumed.seen][-len(resumed.seen) :]


def test_the_resumed_epoch_sees_the_batch_indices_of_the_uninterrupted_run(tmp_path, uninterrupted):
    model, _ = fit_recording(tmp_path, [streaming()])
    _, directory, _ = uninterrupted
    resumed, _ = fit_recording(tmp_path / "resumed", [streaming()], checkpoint(directory, "epoch=0-step=6"))
    assert resumed.seen == model.seen[len(model.seen) - len(resumed.seen) :]
    assert resumed.seen[0][:2] == (0, 2)


def test_a_checkpoint_saved_after_the_fit_resumes_where_lightning_does(tmp_path):
    """After `max_steps`, Lightning counts the epoch as finished: the resumed fit starts the next one at batch 0."""
    _, trainer = fit_recording(tmp_path, [streaming()], max_steps=6)  # stops after 2 whole batches
    trainer.save_checkpoint(tmp_path / "after.ckpt")  # after the fit: the callback has torn down its hooks
    resumed, _ = fit_recording(tmp_path, [streaming()], tmp_path / "after.ckpt")
    whole, _ = fit_recording(tmp_path, [streaming()])
    assert resumed.seen == whole.seen[len(whole.seen) // 2 :], "epoch 1, from its first batch"


class SavesFirst(pl.Callback):
    """A callback placed before the TBPTT callback that saves a checkpoint at the end of batch 1."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 6:
            trainer.save_checkpoint(self.path)


def test_the_saved_position_does_not_depend_on_the_order_of_callbacks(tmp_path):
    model, _ = fit_recording(tmp_path, [SavesFirst(tmp_path / "first.ckpt"), streaming()])
    resumed, _ = fit_recording(tmp_path, [streaming()], tmp_path / "first.ckpt")
    assert parameters_equal(resumed, model, rtol=0, atol=1e-12)


def test_a_failed_resume_leaves_nothing_for_the_next_fit(tmp_path, uninterrupted):
    class FailsAtStart(Recording):
        def on_train_start(self) -> None:
            raise RuntimeError("stop")

    _, directory, _ = uninterrupted
    callback = streaming()
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    with pytest.raises(RuntimeError, match="stop"):
        trainer.fit(
            FailsAtStart().double(), datamodule=stream_data(), ckpt_path=checkpoint(directory, "epoch=0-step=6")
        )
    assert callback.resume_batch == 0
    fresh, _ = fit_recording(tmp_path, [callback])
    assert fresh.seen[0][:2] == (0, 0)
    assert fresh.seen[0] == fit_recording(tmp_path, [streaming()])[0].seen[0]


def test_resuming_after_max_steps_stopped_inside_a_batch_warns(tmp_path):
    every = ModelCheckpoint(tmp_path, "partial", every_n_train_steps=4)
    fit_recording(tmp_path, [streaming(), every], max_steps=4, enable_checkpointing=True)  # stops inside batch 1
    with pytest.warns(UserWarning, match=r"`max_steps` stopped batch 1 of its epoch before its last segment"):
        fit_recording(tmp_path, [streaming()], tmp_path / "partial.ckpt")


DDP_PROBE = """
import sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from lightning_tbptt import TBPTTCallback
from tests.helpers import make_trainer
from tests.test_resume import SEGMENT, StreamRegressor, stream_data

mode, root = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
model = StreamRegressor().double()
callbacks = [TBPTTCallback(SEGMENT, streaming=True, resets="starts")]
if mode == "uninterrupted":
    callbacks.append(ModelCheckpoint(root, "{step}", every_n_train_steps=6, save_top_k=-1))
trainer = make_trainer(
    root, callbacks, max_epochs=1, enable_checkpointing=mode == "uninterrupted", strategy="ddp", devices=2
)
trainer.fit(model, datamodule=stream_data(), ckpt_path=None if mode == "uninterrupted" else root / "step=6.ckpt")
if trainer.global_rank == 0:
    torch.save(model.state_dict(), root / f"{mode}.pt")
"""


@pytest.mark.slow  # two DDP fits in subprocesses
def test_a_streaming_checkpoint_of_two_processes_resumes_each_process_exactly(tmp_path):
    script = tmp_path / "ddp_probe.py"
    script.write_text(DDP_PROBE)
    root = Path(__file__).resolve().parent.parent
    environment = {**os.environ, "PYTHONPATH": str(root)}
    for mode in ("uninterrupted", "resumed"):
        subprocess.run(
            [sys.executable, str(script), mode, str(tmp_path)],
            cwd=root,
            env=environment,
            check=True,
            timeout=300,
            capture_output=True,
        )
    state = torch.load(tmp_path / "step=6.ckpt", weights_only=False)["callbacks"]["TBPTTCallback"]
    assert state["world_size"] == 2
    assert state["carried"]["rnn"][0].shape == (2, 1, 2, 8), "(rank, layers, lanes of the rank, hidden)"
    assert not torch.equal(state["carried"]["rnn"][0][0], state["carried"]["rnn"][0][1])
    uninterrupted = torch.load(tmp_path / "uninterrupted.pt")
    resumed = torch.load(tmp_path / "resumed.pt")
    assert all(torch.allclose(uninterrupted[key], resumed[key], rtol=0, atol=1e-12) for key in uninterrupted)


class StopsAt(pl.Callback):
    """Raises at the end (or, with `at_start`, the start) of a given batch, as a pre-empted job would stop."""

    def __init__(self, batch: int, at_start: bool = False) -> None:
        self.batch, self.at_start = batch, at_start

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if self.at_start and batch_idx == self.batch:
            raise InterruptedError("stop")

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.at_start and batch_idx == self.batch:
            raise InterruptedError("stop")


def stop_and_save(tmp_path: Path, stopper: StopsAt, name: str, ckpt_path: Path | None = None, **kwargs: Any) -> Path:
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [streaming(**kwargs.pop("callback", {})), stopper], max_epochs=2, **kwargs)
    with pytest.raises(InterruptedError):
        trainer.fit(Recording().double(), datamodule=stream_data(), ckpt_path=ckpt_path)
    trainer.save_checkpoint(tmp_path / name)  # as OnExceptionCheckpoint does: after the callback has torn down
    return tmp_path / name


@pytest.mark.parametrize("batch", [1, 2])
def test_a_checkpoint_saved_after_an_exception_between_batches_resumes_exactly(tmp_path, batch):
    model, _ = fit_recording(tmp_path, [streaming()], accumulate_grad_batches=2)
    path = stop_and_save(tmp_path, StopsAt(batch), "stopped.ckpt", accumulate_grad_batches=2)
    state = torch.load(path, weights_only=False)["callbacks"]["TBPTTCallback"]
    assert ("gradients" in state) == (batch == 2), "batch 2 ends in the middle of an accumulation of 2 x 3 segments"
    resumed, _ = fit_recording(tmp_path, [streaming()], path, accumulate_grad_batches=2)
    assert parameters_equal(resumed, model, rtol=0, atol=1e-12)


def test_a_checkpoint_saved_before_the_first_resumed_batch_ends_resumes_exactly(tmp_path, uninterrupted):
    model, directory, _ = uninterrupted
    path = stop_and_save(tmp_path, StopsAt(2, at_start=True), "again.ckpt", checkpoint(directory, "epoch=0-step=6"))
    resumed, _ = fit_recording(tmp_path, [streaming()], path)
    assert parameters_equal(resumed, model, rtol=0, atol=1e-12)


class SavesInsideBatch(Recording):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 2 and len(self.seen) == 7:  # the second segment of batch 2
            self.trainer.save_checkpoint(self.trainer.default_root_dir + "/inside.ckpt")
        return super().training_step(batch, batch_idx)


def test_resuming_a_checkpoint_saved_inside_a_batch_warns(tmp_path):
    trainer = make_trainer(tmp_path, [streaming()], max_epochs=1)
    trainer.fit(SavesInsideBatch().double(), datamodule=stream_data())
    with pytest.warns(UserWarning, match=r"saved while batch 2 of epoch 0 was running"):
        fit_recording(tmp_path, [streaming()], tmp_path / "inside.ckpt")


class FailsInsideBatch(Recording):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 0 and len(self.seen) == 1:  # the second segment of the epoch's first batch
            raise InterruptedError("stop")
        return super().training_step(batch, batch_idx)


def test_resuming_a_checkpoint_saved_inside_the_first_batch_warns(tmp_path):
    trainer = make_trainer(tmp_path, [streaming()], max_epochs=1)
    with pytest.raises(InterruptedError):
        trainer.fit(FailsInsideBatch().double(), datamodule=stream_data())
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    with pytest.warns(UserWarning, match=r"saved while batch 0 of epoch 0 was running"):
        fit_recording(tmp_path, [streaming()], tmp_path / "first.ckpt")


class HidesResumeBatch(TBPTTCallback):
    """The callback with `resume_batch` always 0: the data module must resume its stream without reading it."""

    @property
    def resume_batch(self) -> int:
        return 0

    @property
    def state_key(self) -> str:
        return "TBPTTCallback"  # the checkpoint's entry of the callback


@pytest.mark.parametrize("name", ["epoch=0-step=6", "epoch=1-step=30"])
def test_the_data_module_resumes_its_stream_without_the_callbacks_resume_batch(tmp_path, uninterrupted, name):
    model, directory, _ = uninterrupted
    torch.manual_seed(0)
    resumed = StreamRegressor().double()
    trainer = make_trainer(tmp_path, [HidesResumeBatch(SEGMENT, streaming=True, resets="starts")], max_epochs=2)
    trainer.fit(resumed, datamodule=stream_data(), ckpt_path=checkpoint(directory, name))
    assert parameters_equal(resumed, model, rtol=0, atol=1e-12)


def test_resume_batch_reads_the_same_throughout_the_resumed_epoch(tmp_path):
    # the documented recipe for a plain DataLoader: its sampler skips the batches the checkpoint had trained; other
    # callbacks may read the value too, in hooks that run after the TBPTTCallback's `on_train_start`
    from torch.utils.data import DataLoader, Sampler, TensorDataset

    from tests.helpers import SequenceRegressor, make_data

    class Skipping(Sampler[list[int]]):
        def __init__(self, callback: TBPTTCallback) -> None:
            self.callback, self.seen = callback, []

        def __len__(self) -> int:
            return 3

        def __iter__(self) -> Any:
            skip = self.callback.resume_batch
            self.seen.append(skip)
            return iter([list(range(4 * b, 4 * b + 4)) for b in range(skip, 3)])

    class SavesAfterFirstBatch(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 5:  # 5 segments of 5 steps in a batch of 23
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    def loader(callback: TBPTTCallback) -> tuple[DataLoader[Any], Skipping]:
        sampler = Skipping(callback)
        return DataLoader(TensorDataset(*make_data()), batch_sampler=sampler), sampler

    first = TBPTTCallback(5)
    data, _ = loader(first)
    make_trainer(tmp_path, [first, SavesAfterFirstBatch()]).fit(SequenceRegressor(log=False).double(), data)

    class Reads(pl.Callback):  # after the TBPTTCallback in the list: its hooks run later
        def __init__(self) -> None:
            self.seen: list[tuple[str, int]] = []

        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.seen.append(("train start", resumed.resume_batch))

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.seen.append((f"epoch {trainer.current_epoch}", resumed.resume_batch))

    resumed, reads = TBPTTCallback(5), Reads()
    data, sampler = loader(resumed)
    trainer = make_trainer(tmp_path, [resumed, reads], max_epochs=2)
    trainer.fit(SequenceRegressor(log=False).double(), data, ckpt_path=tmp_path / "mid.ckpt")
    assert sampler.seen == [1, 0]  # the resumed epoch skips the batch trained before the checkpoint; the next none
    # the same value wherever it is read during the resumed epoch (whatever the order of hooks), 0 afterwards
    epoch_starts = [entry for entry in reads.seen if entry[0] != "train start"]
    assert reads.seen[0] == ("train start", 1)
    assert epoch_starts[-1] == ("epoch 1", 0)
    assert all(value == 1 for name, value in epoch_starts if name == "epoch 0")
    assert trainer.global_step == 5 + 2 * 5 + 3 * 5  # the checkpoint's batch, the rest of its epoch, one more epoch
