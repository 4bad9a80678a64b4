"""Every hook that a user, a callback or the strategy overrides is called as Lightning calls it, fast paths or not.

A module and a callback record each hook call (name, and the batch index or the segment's length where the hook gets
one). With one segment per batch a fit with ``TBPTTCallback`` must make exactly the calls of a plain Lightning fit;
with several segments per batch, the optimisation hooks repeat once per segment. The library's fast paths
(``_lightning_internals.FAST_PATHS``) may only skip the dispatch of Lightning's own default hooks: what they skip
must leave the parameters, the loop's counters and every recorded call unchanged.
"""

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.trainer import call
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tbptt import TBPTTCallback, _lightning_internals

BATCH, INPUT, HIDDEN = 4, 2, 5

MODULE_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_zero_grad",
    "optimizer_zero_grad",
    "on_before_backward",
    "backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "configure_gradient_clipping",
    "optimizer_step",
    "on_before_batch_transfer",
    "transfer_batch_to_device",
    "on_after_batch_transfer",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
)
CALLBACK_HOOKS = tuple(
    name for name in vars(pl.Callback) if name.startswith("on_") and callable(getattr(pl.Callback, name))
)


def _time_length(batch: Any) -> int | None:
    """The time length of a batch or segment ``(x, y)`` of shape ``(B, T, ...)``, if it is one."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[1])
    return None


def _describe(name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What is recorded of a call: the hook, its batch index and (for batches) the time length it sees."""
    if name in ("optimizer_zero_grad", "optimizer_step"):
        return (name, args[1])  # (epoch, batch_idx, ...)
    if name in ("transfer_batch_to_device", "on_before_batch_transfer", "on_after_batch_transfer"):
        return (name, _time_length(args[0]), args[-1])  # the batch, ..., dataloader_idx
    if name.endswith("_batch_start") or name.endswith("_batch_end"):
        batch = args[0] if name.endswith("_start") else args[1]
        return (name, _time_length(batch), args[-1] if name.endswith("_start") else args[2])
    return (name,)


def _recording_module_hook(name: str) -> Any:
    def hook(self: "Base", *args: Any, **kwargs: Any) -> Any:
        self.calls.append(_describe(name, args))
        return getattr(super(type(self), self), name)(*args, **kwargs)

    hook.__name__ = name
    return hook


def _recording_callback_hook(name: str) -> Any:
    def hook(self: "Recorder", trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("cb:" + _describe(name, args)[0], *_describe(name, args)[1:]))

    hook.__name__ = name
    return hook


class Base(pl.LightningModule):
    """A model written for short sequences; ``calls`` is shared with the recorder."""

    def __init__(self, calls: list[Any]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(INPUT, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)
        self.calls = calls

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls.append(("training_step", _time_length(batch), batch_idx))
        x, y = batch
        out, _ = self.rnn(x)
        return F.mse_loss(self.head(out), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.calls.append(("validation_step", _time_length(batch), batch_idx))
        x, y = batch
        out, _ = self.rnn(x)
        self.log("val_loss", F.mse_loss(self.head(out), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def recording_module(*hooks: str) -> type[Base]:
    """A subclass of ``Base`` that records (and otherwise leaves to Lightning) each of ``hooks``."""
    return type("Recorded", (Base,), {name: _recording_module_hook(name) for name in hooks})


class Recorder(Callback):
    def __init__(self, calls: list[Any], hooks: tuple[str, ...]) -> None:
        self.calls = calls
        for name in hooks:
            setattr(self, name, _recording_callback_hook(name).__get__(self))


def _loaders(length: int, batches: int = 3) -> tuple[DataLoader[Any], DataLoader[Any]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * batches, length, INPUT, generator=generator)
    y = torch.cumsum(x[..., :1], dim=1)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=BATCH), DataLoader(data, batch_size=BATCH)


def fit(
    tmp_path: Any,
    module: pl.LightningModule,
    calls: list[Any],
    *,
    tbptt: TBPTTCallback | None,
    length: int,
    callback_hooks: tuple[str, ...] = CALLBACK_HOOKS,
    validate: bool = True,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    callbacks: list[Any] = [Recorder(calls, callback_hooks)] + ([tbptt] if tbptt is not None else [])
    trainer_kwargs.setdefault("accelerator", "cpu")
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2 if validate else 0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    train, val = _loaders(length)
    trainer.fit(module, train, val if validate else None)
    return trainer


def _batches(calls: list[Any]) -> list[list[Any]]:
    """The calls of each training batch, from its ``on_before_batch_transfer`` (or batch start) to its batch end."""
    batches: list[list[Any]] = []
    current: list[Any] | None = None
    for entry in calls:
        if current is None and entry[0] in ("on_before_batch_transfer", "cb:on_train_batch_start"):
            current = []
        if current is not None:
            current.append(entry)
            if entry[0] == "on_train_batch_end":
                batches.append(current)
                current = None
    return batches


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.fixture(params=[True, False], ids=["fast-paths", "lightning-paths"])
def fast_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(_lightning_internals, "FAST_PATHS", request.param)
    return bool(request.param)


@pytest.mark.parametrize(
    "trainer_kwargs",
    [{}, {"accumulate_grad_batches": 2}, {"gradient_clip_val": 0.5}],
    ids=["default", "accumulate", "clip"],
)
@pytest.mark.usefixtures("fast_paths")
def test_one_segment_per_batch_makes_the_calls_of_a_plain_fit(tmp_path, trainer_kwargs):
    """Every hook recorded: with segment_length >= T the fit is, call for call, a plain Lightning fit."""
    cls = recording_module(*MODULE_HOOKS)
    plain: list[Any] = []
    plain_trainer = fit(tmp_path, cls(plain), plain, tbptt=None, length=8, **trainer_kwargs)
    with_callback: list[Any] = []
    module = cls(with_callback)
    fit(tmp_path, module, with_callback, tbptt=TBPTTCallback(segment_length=8), length=8, **trainer_kwargs)
    assert with_callback == plain
    assert len(_batches(plain)) == 3
    torch.testing.assert_close(_params(module), _params(plain_trainer.lightning_module), rtol=0, atol=0)


@pytest.mark.usefixtures("fast_paths")
def test_several_segments_repeat_the_optimisation_hooks_once_per_segment(tmp_path):
    cls = recording_module(*MODULE_HOOKS)
    plain: list[Any] = []
    fit(tmp_path, cls(plain), plain, tbptt=None, length=8, validate=False)
    with_callback: list[Any] = []
    fit(tmp_path, cls(with_callback), with_callback, tbptt=TBPTTCallback(segment_length=8), length=24, validate=False)
    plain_batches, segmented = _batches(plain), _batches(with_callback)
    assert len(segmented) == len(plain_batches) == 3
    for plain_batch, batch in zip(plain_batches, segmented, strict=True):
        # the plain batch: before the step, the optimisation (optimizer_step and all it runs), after it
        start = plain_batch.index(("optimizer_step", plain_batch[-1][2]))
        end = plain_batch.index(("cb:on_train_batch_end", 8, plain_batch[-1][2]))
        before, step, after = plain_batch[:start], plain_batch[start:end], plain_batch[end:]

        def long(entries: list[Any]) -> list[Any]:
            # the whole batch (T=24) where the plain fit's hook saw T=8; the segments keep T=8
            return [(e[0], 24, *e[2:]) if len(e) > 1 and e[1] == 8 else e for e in entries]

        assert batch == long(before) + step * 3 + long(after)
        assert [e for e in step if e[0] == "training_step"] == [("training_step", 8, plain_batch[-1][2])]


@pytest.mark.parametrize(
    ("module_hooks", "callback_hooks"),
    [
        (("optimizer_zero_grad",), ()),
        (("on_before_zero_grad",), ()),
        ((), ("on_before_zero_grad",)),
        (("transfer_batch_to_device",), ()),
        (("on_after_batch_transfer",), ()),
        (("optimizer_step",), ()),
        (("configure_gradient_clipping",), ()),
        ((), ("on_before_optimizer_step",)),
        (("on_before_backward",), ()),
        ((), ("on_before_backward",)),
        (("on_after_backward",), ()),
        ((), ("on_after_backward",)),
        (("on_before_optimizer_step",), ()),
    ],
    ids=[
        "optimizer_zero_grad",
        "module-on_before_zero_grad",
        "callback-on_before_zero_grad",
        "transfer",
        "after",
        "step",
        "clipping",
        "callback-on_before_optimizer_step",
        "module-on_before_backward",
        "callback-on_before_backward",
        "module-on_after_backward",
        "callback-on_after_backward",
        "module-on_before_optimizer_step",
    ],
)
@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.usefixtures("fast_paths")
def test_a_single_overridden_hook_is_still_called_as_lightning_calls_it(
    tmp_path, module_hooks, callback_hooks, segments
):
    """Only one hook overridden, so that every fast path that does not involve it is open."""
    cls = recording_module(*module_hooks)
    plain: list[Any] = []
    fit(tmp_path, cls(plain), plain, tbptt=None, length=8, callback_hooks=callback_hooks)
    calls: list[Any] = []
    fit(
        tmp_path,
        cls(calls),
        calls,
        tbptt=TBPTTCallback(segment_length=8),
        length=8 * segments,
        callback_hooks=callback_hooks,
    )
    recorded = [entry for entry in calls if entry[0] not in ("training_step", "validation_step")]
    expected = [entry for entry in plain if entry[0] not in ("training_step", "validation_step")]
    if segments == 1 or "on_after_batch_transfer" in module_hooks:  # whole batches are moved (transfer="batch")
        # ... and each segment's optimisation hooks once per segment
        per_batch = {"on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer"}
        expected = [
            entry
            for plain_entry in expected
            for entry in ([plain_entry] if plain_entry[0] in per_batch else [plain_entry] * segments)
        ]
        expected = [(e[0], 8 * segments, *e[2:]) if e[0] in per_batch and e[1] == 8 else e for e in expected]
    else:
        # each segment (of T=8) moved by itself, right before it runs: one transfer per segment, training and
        # validation alike; and each segment's optimisation hooks once per segment
        expected = [entry for entry in expected for _ in range(segments)]
    assert recorded == expected, (module_hooks, callback_hooks)
    assert recorded, "the overridden hook was called"


SKIPPED = (
    "optimizer_zero_grad",
    "transfer_batch_to_device",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "configure_gradient_clipping",
)


def count_dispatch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the module hooks Lightning dispatches from now on, in order."""
    dispatched: list[str] = []
    original = call._call_lightning_module_hook

    def counting(trainer: Any, hook_name: str, *args: Any, **kwargs: Any) -> Any:
        dispatched.append(hook_name)
        return original(trainer, hook_name, *args, **kwargs)

    monkeypatch.setattr(call, "_call_lightning_module_hook", counting)
    return dispatched


def test_fast_paths_change_nothing_but_the_dispatch(tmp_path, monkeypatch):
    """Nothing overridden: the same parameters and loop counters, and the default hooks were not dispatched."""
    dispatched = count_dispatch(monkeypatch)
    results = {}
    for fast in (True, False):
        monkeypatch.setattr(_lightning_internals, "FAST_PATHS", fast)
        dispatched.clear()
        trainer = fit(tmp_path, Base([]), [], tbptt=TBPTTCallback(segment_length=8), length=24, callback_hooks=())
        loop = trainer.fit_loop.epoch_loop.automatic_optimization
        results[fast] = (
            _params(trainer.lightning_module),
            copy.deepcopy(loop.optim_progress.state_dict()),
            trainer.global_step,
            {name: dispatched.count(name) for name in SKIPPED},
        )
    fast, slow = results[True], results[False]
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=0)
    assert fast[1] == slow[1]
    assert fast[2] == slow[2] == 9
    assert slow[3] == {name: 9 + 2 * 3 if name == "transfer_batch_to_device" else 9 for name in SKIPPED}
    assert fast[3] == dict.fromkeys(SKIPPED, 0)


def test_a_profiler_sees_every_hook(tmp_path):
    """With a profiler the fast paths are off: it records the default hooks as it does without the callback."""
    trainer = fit(
        tmp_path,
        Base([]),
        [],
        tbptt=TBPTTCallback(segment_length=8),
        length=24,
        callback_hooks=(),
        profiler="simple",
    )
    actions = trainer.profiler.recorded_durations  # type: ignore[attr-defined]
    zero = [name for name in actions if name.endswith(".optimizer_zero_grad")]
    transfer = [name for name in actions if name.endswith(".transfer_batch_to_device")]
    assert zero and len(actions[zero[0]]) == 9
    assert transfer and len(actions[transfer[0]]) == 9 + 2 * 3
    callback = [name for name in actions if name.endswith(".on_before_zero_grad") and "[Callback]" in name]
    assert callback and all(len(actions[name]) == 9 for name in callback)


class RecordingStrategy(SingleDeviceStrategy):
    def __init__(self, calls: list[Any]) -> None:
        super().__init__(device=torch.device("cpu"))
        self.calls = calls

    def batch_to_device(self, batch: Any, device: Any = None, dataloader_idx: int = 0) -> Any:
        self.calls.append(("strategy.batch_to_device", _time_length(batch), dataloader_idx))
        return super().batch_to_device(batch, device, dataloader_idx)


@pytest.mark.usefixtures("fast_paths")
def test_a_strategy_that_overrides_batch_to_device_moves_every_segment(tmp_path):
    calls: list[Any] = []
    fit(
        tmp_path,
        Base(calls),
        calls,
        tbptt=TBPTTCallback(segment_length=8),
        length=24,
        callback_hooks=(),
        strategy=RecordingStrategy(calls),
    )
    moved = [entry for entry in calls if entry[0] == "strategy.batch_to_device"]
    # batches stay on the host (the library answers the loop's call per batch): the strategy's own method moves each
    # segment, 3 per batch, 3 training and 2 validation batches
    assert moved == [("strategy.batch_to_device", 8, 0)] * 3 * 5


class TransferDataModule(pl.LightningDataModule):
    def __init__(self, calls: list[Any]) -> None:
        super().__init__()
        self.calls = calls

    def train_dataloader(self) -> DataLoader[Any]:
        return _loaders(24)[0]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        self.calls.append(("datamodule.transfer_batch_to_device", _time_length(batch), dataloader_idx))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


@pytest.mark.usefixtures("fast_paths")
def test_a_datamodule_that_overrides_transfer_batch_to_device_moves_every_segment(tmp_path):
    calls: list[Any] = []
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[TBPTTCallback(segment_length=8)],
    )
    trainer.fit(Base([]), datamodule=TransferDataModule(calls))
    assert calls == [("datamodule.transfer_batch_to_device", 8, 0)] * 9


def test_a_clip_value_keeps_the_clipping_hook_and_clips_alike(tmp_path, monkeypatch):
    """With `gradient_clip_val` set, the clipping after `on_before_optimizer_step` runs: fast paths or not, and
    the result is the clipped one (not that of a fit without clipping)."""
    dispatched = count_dispatch(monkeypatch)
    results = {}
    for fast, clip in ((True, 0.01), (False, 0.01), (True, None)):
        monkeypatch.setattr(_lightning_internals, "FAST_PATHS", fast)
        dispatched.clear()
        trainer = fit(
            tmp_path, Base([]), [], tbptt=TBPTTCallback(8), length=24, callback_hooks=(), gradient_clip_val=clip
        )
        results[fast, clip] = (_params(trainer.lightning_module), dispatched.count("configure_gradient_clipping"))
    torch.testing.assert_close(results[True, 0.01][0], results[False, 0.01][0], rtol=0, atol=0)
    assert results[True, 0.01][1] == results[False, 0.01][1] == 9
    assert results[True, None][1] == 0
    unclipped, clipped = results[True, None][0], results[True, 0.01][0]
    assert any(not torch.equal(a, b) for a, b in zip(unclipped, clipped, strict=True))


def test_a_batch_is_left_where_it_is_only_when_everything_movable_is_on_the_device(monkeypatch):
    """Per batch: the segments are moved unless every object with a `to` method is a tensor on the device already."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(Base([]))
    patch = _lightning_internals.StrategyPatch(trainer, lambda: True, None)
    on_cpu, on_meta = torch.zeros(2, 3), torch.zeros(2, 3, device="meta")

    class Movable:
        def to(self, device: Any) -> "Movable":
            return self

    assert not patch.moves((on_cpu, {"y": [on_cpu]}, "label", 3))  # training on the CPU: nothing to move
    assert patch.moves((on_cpu, {"y": [on_cpu, Movable()]}))  # Lightning would call its `to`
    monkeypatch.setattr(SingleDeviceStrategy, "root_device", property(lambda self: torch.device("meta")))
    assert patch.moves((on_cpu, {"y": on_cpu}))  # nested tensors on the host: moved
    assert patch.moves({"x": [on_meta, on_cpu]})
    assert not patch.moves({"x": [on_meta], "n": on_meta})
