"""Bad input gets a clear error naming the argument, the value and the fix; failures leave no trace behind."""

import contextlib
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tbptt import BatchError, ConfigurationError, ModelError, TBPTTCallback, TBPTTError
from lightning_tbptt._lightning_internals import patched_loop_attributes
from tests.helpers import SequenceRegressor, make_loader, make_trainer, parameters_equal, twin


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"segment_length": 0}, r"`segment_length` to be a positive integer but got 0\. Pass"),
        ({"segment_length": -3}, r"`segment_length` to be a positive integer but got -3\."),
        ({"segment_length": 2.5}, r"`segment_length` to be a positive integer but got 2\.5\."),
        ({"segment_length": True}, r"`segment_length` to be a positive integer but got True\."),
        ({"segment_length": 8, "time_dim": -1}, r"`time_dim` to be a non-negative integer but got -1\. Pass 1"),
        ({"segment_length": 8, "step_per": "epoch"}, r"`step_per` to be one of \('segment', 'batch'\) but got 'epoch'"),
        ({"segment_length": 8, "recurrent_modules": "cell"}, r"`recurrent_modules` to be a list .* but got 'cell'"),
        ({"segment_length": 8, "exclude_modules": [1]}, r"`exclude_modules` to be a list .* but got \[1\]"),
        ({"segment_length": 8, "recurrent_modules": None}, r"`recurrent_modules` to be a list .* but got None"),
        ({"segment_length": 8, "log_every": "segment"}, r"`log_every` to be one of \('step', 'batch'\) but got 'seg"),
        ({"segment_length": 8, "nonfinite_state": "zero"}, r"`nonfinite_state` to be one of \('keep', 'reset'\)"),
    ],
    ids=[
        "zero",
        "negative",
        "float",
        "bool",
        "time_dim",
        "step_per",
        "recurrent_modules",
        "exclude_modules",
        "None",
        "log_every",
        "nonfinite_state",
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        TBPTTCallback(**kwargs)


def test_error_hierarchy():
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(BatchError, ValueError)
    assert issubclass(ModelError, TypeError)
    assert all(issubclass(e, TBPTTError) for e in (ConfigurationError, BatchError, ModelError))


def assert_no_traces(trainer: Any, model: nn.Module) -> None:
    assert patched_loop_attributes(trainer) == []
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name


def fit_raises(tmp_path: Any, model: nn.Module, callback: Any, loader: Any, error: type, match: str, **kw: Any) -> Any:
    callbacks = callback if isinstance(callback, list) else [callback]
    trainer = make_trainer(tmp_path, callbacks, **kw)
    with pytest.raises(error, match=match):
        trainer.fit(model, loader)
    assert_no_traces(trainer, model)
    return trainer


def loader_of(*tensors: torch.Tensor, batch_size: int = 4) -> DataLoader[Any]:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


def test_time_dim_out_of_range_for_every_tensor(tmp_path):
    fit_raises(
        tmp_path,
        SequenceRegressor(),
        TBPTTCallback(5, time_dim=3),
        make_loader(dtype=torch.float32),
        BatchError,
        r"at least one tensor of the batch to have dimension `time_dim=3` but got tensors of shapes "
        r"\[\(4, 23, 3\), \(4, 23, 1\)\]\. Set `time_dim`",
    )


def test_batch_without_sequence_tensor(tmp_path):
    fit_raises(
        tmp_path,
        SequenceRegressor(),
        TBPTTCallback(5),
        loader_of(torch.zeros(8), torch.zeros(8)),
        BatchError,
        r"dimension `time_dim=1` but got tensors of shapes \[\(4,\), \(4,\)\]",
    )


def test_batch_without_any_tensor(tmp_path):
    loader = DataLoader(["a", "b"], batch_size=2)
    fit_raises(
        tmp_path,
        SequenceRegressor(),
        TBPTTCallback(5),
        loader,
        BatchError,
        r"at least one tensor to cut along `time_dim=1` but got a batch of type list without tensors",
    )


def test_tensors_with_different_sequence_lengths(tmp_path):
    class Pair(torch.utils.data.Dataset[Any]):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": torch.zeros(23, 3), "y": torch.zeros(20, 1)}

    fit_raises(
        tmp_path,
        SequenceRegressor(),
        TBPTTCallback(5),
        DataLoader(Pair(), batch_size=4),
        BatchError,
        r"same size along dimension 1 but got sizes \[23, 20\] for tensors of shapes \[\(4, 23, 3\), \(4, 20, 1\)\]",
    )


class BidirectionalModel(SequenceRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.context = nn.GRU(3, 2, bidirectional=True, batch_first=True)


def test_bidirectional_rnn_fails_at_fit_start(tmp_path):
    model = BidirectionalModel()
    steps = []
    model.training_step = lambda *a: steps.append(1)  # type: ignore[method-assign]
    fit_raises(
        tmp_path,
        model,
        TBPTTCallback(5),
        make_loader(dtype=torch.float32),
        ModelError,
        r"bidirectional module `context` \(GRU\).*`TBPTTCallback\(exclude_modules=\['context'\]\)`",
    )
    assert steps == [], "no training step ran"


def test_excluded_bidirectional_rnn_trains(tmp_path):
    trainer = make_trainer(tmp_path, [TBPTTCallback(5, exclude_modules=["context"])])
    trainer.fit(BidirectionalModel(), make_loader(dtype=torch.float32))
    assert trainer.global_step == 15


def test_unknown_opt_in_module(tmp_path):
    fit_raises(
        tmp_path,
        SequenceRegressor(),
        TBPTTCallback(5, recurrent_modules=["cell"]),
        make_loader(),
        ModelError,
        r"`recurrent_modules` to be a submodule of SequenceRegressor but got \['cell'\]\. Use names .*'rnn', 'head'",
    )


class OtherTBPTTCallback(TBPTTCallback):
    pass


def test_callback_added_twice(tmp_path):
    # Two instances of one class share a checkpoint key, which Lightning itself refuses when building the Trainer.
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `TBPTTCallback`"):
        make_trainer(tmp_path, [TBPTTCallback(5), TBPTTCallback(7)])
    # A subclass has its own key, so it is the callback that refuses the pair.
    fit_raises(
        tmp_path,
        SequenceRegressor(),
        [TBPTTCallback(5), OtherTBPTTCallback(7)],
        make_loader(),
        ConfigurationError,
        r"one `TBPTTCallback` in `Trainer\(callbacks=...\)` but got 2",
    )


class IteratorModel(SequenceRegressor):
    def training_step(self, dataloader_iter: Iterator[Any]) -> torch.Tensor:  # type: ignore[override]
        x, y = next(dataloader_iter)
        return torch.nn.functional.mse_loss(self(x), y)


def test_dataloader_iter_training_step(tmp_path):
    fit_raises(
        tmp_path,
        IteratorModel(),
        TBPTTCallback(5),
        make_loader(dtype=torch.float32),
        ModelError,
        r"`IteratorModel.training_step\(dataloader_iter\)` fetches its own batches",
    )


def test_no_segment_length_anywhere(tmp_path):
    fit_raises(
        tmp_path,
        SequenceRegressor(),
        TBPTTCallback(),
        make_loader(),
        ConfigurationError,
        r"`segment_length` of `TBPTTCallback` or the attribute `truncated_bptt_steps` of SequenceRegressor",
    )


def test_invalid_truncated_bptt_steps(tmp_path):
    model = SequenceRegressor()
    model.truncated_bptt_steps = 0
    fit_raises(
        tmp_path,
        model,
        TBPTTCallback(),
        make_loader(),
        ConfigurationError,
        r"`truncated_bptt_steps` to be a positive integer but got 0",
    )


class MisplacedHiddens(SequenceRegressor):
    def training_step(self, batch: Any, hiddens: Any, batch_idx: int) -> Any:  # type: ignore[override]
        return None


def test_hiddens_in_the_wrong_position(tmp_path):
    fit_raises(
        tmp_path,
        MisplacedHiddens(),
        TBPTTCallback(5),
        make_loader(),
        ModelError,
        r"`hiddens` as its argument after `batch` and `batch_idx`",
    )


class ForgetsHiddens(SequenceRegressor):
    def training_step(self, batch: Any, batch_idx: int, hiddens: Any) -> Any:  # type: ignore[override]
        return {"loss": super().training_step(batch, batch_idx)}


def test_hiddens_not_returned(tmp_path):
    fit_raises(
        tmp_path,
        ForgetsHiddens(log=False),
        TBPTTCallback(5),
        make_loader(dtype=torch.float32),
        ModelError,
        r"return a dict with the key 'hiddens' but segment 0 returned the keys \['loss'\]",
    )


class SkipsWithHiddens(SequenceRegressor):
    def training_step(self, batch: Any, batch_idx: int, hiddens: Any) -> Any:  # type: ignore[override]
        return None


def test_hiddens_module_that_skips_a_step(tmp_path):
    fit_raises(
        tmp_path,
        SkipsWithHiddens(),
        TBPTTCallback(5),
        make_loader(dtype=torch.float32),
        ModelError,
        r"key 'hiddens' but segment 0 returned nothing, so the state of the next segment is unknown",
    )


class EmptySplit(TBPTTCallback):
    def split_batch(self, batch: Any, segment_length: int) -> Sequence[Any]:
        return []


def test_split_returning_nothing(tmp_path):
    fit_raises(
        tmp_path,
        SequenceRegressor(),
        EmptySplit(5),
        make_loader(dtype=torch.float32),
        BatchError,
        r"`EmptySplit.split_batch` to return a non-empty sequence of segments but got \[\]",
    )


class SplitBoth(SequenceRegressor):
    def tbptt_split_batch(self, batch: Any, split_size: int) -> list[Any]:
        return [batch]


def test_two_ways_of_splitting(tmp_path):
    fit_raises(
        tmp_path,
        SplitBoth(),
        EmptySplit(5),
        make_loader(),
        ConfigurationError,
        r"Both `EmptySplit.split_batch` and `SplitBoth.tbptt_split_batch` are defined",
    )


class FailsMidBatch(SequenceRegressor):
    def __init__(self, error: BaseException) -> None:
        super().__init__(log=False)
        self.error = error
        self.segments = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.segments += 1
        if batch_idx == 1 and self.segments == 8:  # third segment of the second batch
            raise self.error
        return super().training_step(batch, batch_idx)


def test_exception_mid_batch_leaves_no_trace_and_plain_lightning_still_works(tmp_path):
    model = FailsMidBatch(RuntimeError("boom in training_step"))
    loader = make_loader(dtype=torch.float32)
    fit_raises(tmp_path, model, TBPTTCallback(5), loader, RuntimeError, "boom in training_step")
    assert model.segments == 8

    # afterwards, a Trainer without the callback trains the module exactly as plain Lightning does a twin
    model.error = None  # type: ignore[assignment]
    plain_twin = twin(model)
    make_trainer(tmp_path, []).fit(model, loader)
    make_trainer(tmp_path, []).fit(plain_twin, loader)
    assert parameters_equal(model, plain_twin)


def test_keyboard_interrupt_mid_batch_leaves_no_trace(tmp_path):
    model = FailsMidBatch(KeyboardInterrupt())
    trainer = make_trainer(tmp_path, [TBPTTCallback(5)])
    previous_handler = signal.getsignal(signal.SIGINT)
    try:
        # Lightning handles the interrupt, then returns (older releases) or exits (newer ones)
        with contextlib.suppress(SystemExit):
            trainer.fit(model, make_loader(dtype=torch.float32))
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    assert trainer.interrupted
    assert_no_traces(trainer, model)


def test_successful_fit_leaves_no_trace_and_can_run_again(tmp_path):
    model = SequenceRegressor(log=False)
    callback = TBPTTCallback(5)
    for _ in range(2):
        trainer = make_trainer(tmp_path, [callback])
        trainer.fit(model, make_loader(dtype=torch.float32))
        assert trainer.global_step == 15
        assert_no_traces(trainer, model)


class TimeFirstModel(SequenceRegressor):
    """The layout of pytorch/examples' word language model: time-first batches, `nn.LSTM(batch_first=False)`."""

    def __init__(self) -> None:
        super().__init__(batch_first=False, log=False)


@pytest.mark.parametrize("batch_size", [4, 12], ids=["B<k", "B>k"])
def test_time_first_batches_without_time_dim_0_are_refused_at_the_first_segment(tmp_path, batch_size):
    loader = make_loader(batch_size=batch_size, batch_first=False, num_sequences=12, length=23)  # (23, B, 3)
    trainer = make_trainer(tmp_path, [TBPTTCallback(8)])
    match = (
        r"`rnn` \(LSTM, batch_first=False\) to read time along the dimension the batch was cut along, `time_dim=1`,"
        r" but it reads time along dimension 0 .* For time-first `\(T, B, \.\.\.\)` batches pass"
        r" `TBPTTCallback\(time_dim=0\)`; for batch-first batches construct the module with `batch_first=True`\."
    )
    with pytest.raises(ModelError, match=match):
        trainer.fit(TimeFirstModel().double(), loader)
    assert trainer.global_step == 0
    trainer = make_trainer(tmp_path, [TBPTTCallback(8, time_dim=0)])
    trainer.fit(TimeFirstModel().double(), loader)
    assert trainer.global_step == 3 * (12 // batch_size)


class Downsampled(SequenceRegressor):
    """A transformed input: every other step of the segment reaches the LSTM (no false alarm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x[:, ::2])
        return self.head(out).repeat_interleave(2, dim=1)[:, : x.shape[1]]


class Embedded(SequenceRegressor):
    """Token batches `(B, T)` embedded to `(B, T, E)` before the LSTM: the segment's length, transformed."""

    def __init__(self) -> None:
        super().__init__(input_size=4, log=False)
        self.embed = nn.Embedding(5, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, y = batch
        out, _ = self.rnn(self.embed(tokens))
        return torch.nn.functional.mse_loss(self.head(out), y)


def test_a_module_fed_a_transformed_input_is_no_false_alarm(tmp_path):
    # batches of 8 rows cut into segments of 8: the row count equals the segment length, the layout is right
    trainer = make_trainer(tmp_path, [TBPTTCallback(8)])
    trainer.fit(Downsampled(log=False).double(), make_loader(batch_size=8, num_sequences=16, length=24))
    assert trainer.global_step == 2 * 3
    tokens = torch.randint(0, 5, (8, 24))
    loader = DataLoader(TensorDataset(tokens, torch.randn(8, 24, 1)), batch_size=8)
    trainer = make_trainer(tmp_path, [TBPTTCallback(8)])
    trainer.fit(Embedded(), loader)
    assert trainer.global_step == 3


class ShrinkingRows(SequenceRegressor):
    """Drops the last row itself after the first segment: the carried state then has a row too many."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trainer is not None and self._segments_seen:
            x = x[:-1]
        self._segments_seen = True
        out, _ = self.rnn(x)
        return self.head(out)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        return torch.nn.functional.mse_loss(out, y[: out.shape[0]])

    _segments_seen = False


def test_a_module_called_on_other_rows_than_its_carried_state_is_named(tmp_path):
    trainer = make_trainer(tmp_path, [TBPTTCallback(5)])
    match = (
        r"`rnn` \(LSTM\) to be called on the 4 rows \(sequences\) whose state the previous segment left, but it got an"
        r" input of 3 rows: .*drop_finished=True.*exclude_modules=\['rnn'\]"
    )
    with pytest.raises(ModelError, match=match):
        trainer.fit(ShrinkingRows(log=False), make_loader(dtype=torch.float32))


class ScriptedCell(SequenceRegressor):
    def __init__(self) -> None:
        super().__init__(log=False)
        self.cell = torch.jit.script(nn.GRUCell(3, 4))


@pytest.mark.parametrize("named", [True, False], ids=["named", "found"])
def test_a_torchscript_module_is_refused_and_no_module_keeps_a_hook(tmp_path, named):
    model = ScriptedCell()
    callback = TBPTTCallback(5, recurrent_modules=["cell"] if named else [])
    match = r"Cannot carry the state of `cell` \(a TorchScript GRUCell\): TorchScript modules take no forward hooks"
    fit_raises(tmp_path, model, callback, make_loader(dtype=torch.float32), ModelError, match)
    assert not model.rnn._forward_hooks and not model.rnn._forward_pre_hooks
    trainer = make_trainer(tmp_path, [TBPTTCallback(5, exclude_modules=["cell"])])
    trainer.fit(model, make_loader(dtype=torch.float32))
    assert trainer.global_step == 15


def test_hooks_are_all_or_nothing_when_one_cannot_be_added():
    from lightning_tbptt.state import StateCarrier

    class Refuses(nn.GRU):
        def register_forward_hook(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("no hooks here")

    lstm, refuses = nn.LSTM(3, 4), Refuses(3, 4)
    match = r"Cannot carry the state of `refuses` \(Refuses\): adding its forward hooks failed with RuntimeError"
    with pytest.raises(ModelError, match=match):
        StateCarrier({"lstm": lstm, "refuses": refuses})
    assert not lstm._forward_hooks and not lstm._forward_pre_hooks
    assert not refuses._forward_pre_hooks


class RaisesInOnException(pl.Callback):
    """A callback listed before the library's whose `on_exception` fails: Lightning then calls no later one."""

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        raise RuntimeError("on_exception failed too")


def test_a_failing_on_exception_before_ours_leaves_no_trace(tmp_path):
    model = FailsMidBatch(RuntimeError("boom in training_step"))
    callbacks = [RaisesInOnException(), TBPTTCallback(5)]
    fit_raises(tmp_path, model, callbacks, make_loader(dtype=torch.float32), RuntimeError, "on_exception failed too")


class FailsAtFitStart(pl.Callback):
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        raise RuntimeError("boom at fit start")


def test_hooks_left_by_a_fit_that_failed_outside_the_loops_remove_themselves(tmp_path):
    # the hooks are added in our `on_fit_start`; a later callback fails there, before the loops start, and the
    # failing `on_exception` keeps ours from running
    model = SequenceRegressor(log=False)
    trainer = make_trainer(tmp_path, [RaisesInOnException(), TBPTTCallback(5), FailsAtFitStart()])
    with pytest.raises(RuntimeError, match="on_exception failed too"):
        trainer.fit(model, make_loader(dtype=torch.float32))
    assert model.rnn._forward_pre_hooks, "left behind: no hook of the library ran after the failure"
    model(torch.zeros(2, 3, 3))  # the first call outside the failed fit removes them
    assert_no_traces(make_trainer(tmp_path), model)
    # and the trainer's loops are clean again when the callback sets up the next fit
    trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, FailsAtFitStart)]
    trainer.fit(model, make_loader(dtype=torch.float32))
    assert_no_traces(trainer, model)
