"""``torch.compile``: of the whole ``LightningModule`` or of its recurrent module, equal to the uncompiled run."""

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tbptt import TBPTTCallback
from lightning_tbptt._lightning_internals import patched_loop_attributes
from tests.helpers import make_trainer

pytestmark = pytest.mark.slow  # each compilation takes seconds


class Elman(nn.Module):
    """A custom recurrent module that `torch.compile` traces (an `nn.LSTM` it would run eagerly)."""

    def __init__(self, input_size: int = 3, hidden_size: int = 8) -> None:
        super().__init__()
        self.input = nn.Linear(input_size, hidden_size)
        self.recurrent = nn.Linear(hidden_size, hidden_size, bias=False)
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if state is None:
            state = x.new_zeros(x.shape[0], self.hidden_size)
        outputs = []
        for t in range(x.shape[1]):
            state = torch.tanh(self.input(x[:, t]) + self.recurrent(state))
            outputs.append(state)
        return torch.stack(outputs, dim=1), state


class Model(pl.LightningModule):
    def __init__(self, rnn: str = "elman", compile_inner: bool = False) -> None:
        super().__init__()
        inner = Elman() if rnn == "elman" else nn.LSTM(3, 8, batch_first=True)
        self.rnn = torch.compile(inner) if compile_inner else inner
        self.head = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out, _ = self.rnn(x)
        loss = F.mse_loss(self.head(out), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)  # fails when traced: run eagerly by the callback
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 24, 3, generator=generator, dtype=torch.float64)
    return DataLoader(TensorDataset(x, x.cumsum(1)[..., :1] / 5), batch_size=4)  # segments of 10, 10, 4


def fit(tmp_path: Any, rnn: str, compiled: str) -> tuple[Any, Any]:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Model(rnn, compile_inner=compiled == "inner").double()
    trainer = make_trainer(tmp_path, [TBPTTCallback(10, recurrent_modules=["rnn"] if rnn == "elman" else [])])
    trainer.fit(torch.compile(model) if compiled == "whole" else model, loader())
    return model, trainer


@pytest.mark.parametrize(("rnn", "compiled"), [("elman", "whole"), ("elman", "inner"), ("lstm", "whole")])
def test_a_compiled_module_trains_as_the_uncompiled_one(tmp_path, rnn, compiled):
    expected, plain = fit(tmp_path, rnn, "none")
    model, trainer = fit(tmp_path, rnn, compiled)
    assert trainer.global_step == plain.global_step == 2 * 3
    for p, q in zip(model.state_dict().values(), expected.state_dict().values(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    assert trainer.callback_metrics["train_loss_epoch"] == pytest.approx(plain.callback_metrics["train_loss_epoch"])
    assert patched_loop_attributes(trainer) == []
    assert "log" not in vars(model) and "log_dict" not in vars(model), "the eager `log` is gone after the fit"
