"""Lightning 1.x TBPTT modules (``hiddens``, ``truncated_bptt_steps``, ``tbptt_split_batch``), manual optimization and
custom splitting."""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lightning_tbptt import TBPTTCallback
from lightning_tbptt.state import detach_state
from tests.helpers import (
    LR,
    MOMENTUM,
    SequenceRegressor,
    fit_with_twin,
    parameters_equal,
    reference_tbptt,
)


class HiddensModel(SequenceRegressor):
    """A Lightning 1.x TBPTT module: it takes ``hiddens`` and returns the new ones."""

    def __init__(self) -> None:
        super().__init__(num_layers=2)
        self.truncated_bptt_steps = 5
        self.received: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int, hiddens: Any) -> dict[str, Any]:
        self.received.append(hiddens)
        x, y = batch
        out, hiddens = self.rnn(x, hiddens)
        return {"loss": F.mse_loss(self.head(out), y), "hiddens": hiddens}


def test_hiddens_module_with_truncated_bptt_steps_equals_reference(tmp_path):
    model, reference, loader, trainer = fit_with_twin(
        tmp_path, lambda: HiddensModel().double(), [TBPTTCallback()], max_epochs=2
    )
    reference_tbptt(reference, loader, segment_length=5, epochs=2)
    assert trainer.global_step == 30
    assert parameters_equal(model, reference)
    # hiddens are None at the start of every batch and detached afterwards
    assert len(model.received) == 30
    for i, hiddens in enumerate(model.received):
        if i % 5 == 0:
            assert hiddens is None
        else:
            assert all(h.grad_fn is None for h in hiddens)


class SplitHookModel(SequenceRegressor):
    """Defines Lightning 1.x's ``tbptt_split_batch``: here, segments of twice the requested size."""

    def __init__(self) -> None:
        super().__init__()
        self.split_sizes: list[int] = []

    def tbptt_split_batch(self, batch: Any, split_size: int) -> list[Any]:
        self.split_sizes.append(split_size)
        x, y = batch
        return [
            (x[:, t : t + 2 * split_size], y[:, t : t + 2 * split_size]) for t in range(0, x.shape[1], 2 * split_size)
        ]


def test_module_tbptt_split_batch_is_honoured(tmp_path):
    model, reference, loader, trainer = fit_with_twin(tmp_path, lambda: SplitHookModel().double(), [TBPTTCallback(5)])
    assert model.split_sizes == [5, 5, 5]
    reference_tbptt(reference, loader, segment_length=10)
    assert trainer.global_step == 3 * 3
    assert parameters_equal(model, reference)


class UnevenSplit(TBPTTCallback):
    """Takes over splitting: a short first segment, then the rest."""

    def split_batch(self, batch: Any, segment_length: int) -> Sequence[Any]:
        x, y = batch
        return [(x[:, :segment_length], y[:, :segment_length]), (x[:, segment_length:], y[:, segment_length:])]


def test_overridden_split_batch_is_used(tmp_path):
    model, reference, loader, trainer = fit_with_twin(tmp_path, lambda: SequenceRegressor().double(), [UnevenSplit(3)])
    assert trainer.global_step == 3 * 2

    optimizer = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in loader:
        state = None
        for part in (slice(0, 3), slice(3, None)):
            out, state = reference.rnn(x[:, part], state)
            F.mse_loss(reference.head(out), y[:, part]).backward()
            state = detach_state(state)
            optimizer.step()
            optimizer.zero_grad()
    assert parameters_equal(model, reference)


class ManualModel(SequenceRegressor):
    """Manual optimization: the module steps its own optimizer, once per call of ``training_step``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls += 1
        optimizer = self.optimizers()
        x, y = batch
        loss = F.mse_loss(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_manual_optimization_module_runs_once_per_segment(tmp_path):
    model, reference, loader, trainer = fit_with_twin(
        tmp_path, lambda: ManualModel().double(), [TBPTTCallback(5)], max_epochs=2
    )
    assert model.calls == 30
    assert trainer.global_step == 30
    reference_tbptt(reference, loader, segment_length=5, epochs=2)
    assert parameters_equal(model, reference)


class Wrapped(HiddensModel):
    """A wrapper or mixin that forwards `*args`, as many 1.x code bases have: 1.x passed `hiddens` to it."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_end_outputs: list[Any] = []

    def training_step(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return super().training_step(*args, **kwargs)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batch_end_outputs.append(outputs)


def test_a_training_step_taking_args_receives_hiddens_as_in_lightning_1x(tmp_path):
    model, reference, loader, trainer = fit_with_twin(tmp_path, lambda: Wrapped().double(), [TBPTTCallback()])
    reference_tbptt(reference, loader, segment_length=5)
    assert trainer.global_step == 15
    assert parameters_equal(model, reference)
    assert [hiddens is None for hiddens in model.received] == [i % 5 == 0 for i in range(15)]
    # as in 1.x, the outputs handed to `on_train_batch_end` do not hold the hiddens
    assert [sorted(outputs) for outputs in model.batch_end_outputs] == [["loss"]] * 3
