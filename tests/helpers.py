"""Shared pieces of the tests: a model written for short sequences, data, and the hand-written reference loops."""

import copy
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from lightning_tbptt.state import detach_state

LR = 0.1
MOMENTUM = 0.9

CELLS: dict[str, Callable[..., nn.Module]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def make_rnn(cell: str = "lstm", input_size: int = 3, hidden_size: int = 6, **kwargs: Any) -> nn.Module:
    return CELLS[cell](input_size, hidden_size, **kwargs)


class SequenceRegressor(pl.LightningModule):
    """A per-step regression model written for sequences that fit in one go: nothing about TBPTT appears in it."""

    def __init__(
        self,
        cell: str = "lstm",
        input_size: int = 3,
        hidden_size: int = 6,
        num_layers: int = 1,
        proj_size: int = 0,
        batch_first: bool = True,
        log: bool = True,
    ) -> None:
        super().__init__()
        extra = {"proj_size": proj_size} if proj_size else {}
        self.rnn = make_rnn(cell, input_size, hidden_size, num_layers=num_layers, batch_first=batch_first, **extra)
        self.head = nn.Linear(proj_size or hidden_size, 1)
        self.do_log = log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if self.do_log:
            self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


def make_data(
    num_sequences: int = 12, length: int = 23, input_size: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_sequences, length, input_size, generator=generator, dtype=dtype)
    # a target that depends on the past, so that carried state matters
    y = torch.cumsum(x[..., :1], dim=1) / length**0.5
    return x, y


def time_first_collate(items: list[Any]) -> Any:
    return tuple(t.transpose(0, 1) for t in default_collate(items))


def make_loader(
    batch_size: int = 4, batch_first: bool = True, **data_kwargs: Any
) -> DataLoader[tuple[torch.Tensor, ...]]:
    x, y = make_data(**data_kwargs)
    collate = default_collate if batch_first else time_first_collate
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, collate_fn=collate)


def make_trainer(tmp_path: Any, callbacks: Iterable[Any] = (), namespace: Any = pl, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU ``Trainer`` of ``namespace`` (``pytorch_lightning`` or ``lightning.pytorch``)."""
    defaults: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    defaults.update(kwargs)
    trainer: pl.Trainer = namespace.Trainer(callbacks=list(callbacks), **defaults)
    return trainer


def parameters_equal(a: nn.Module, b: nn.Module, **tolerances: Any) -> bool:
    pairs = list(zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    return all(torch.allclose(p, q, **tolerances) for p, q in pairs)


def max_difference(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max((p - q).abs().max().item() for p, q in pairs)


def reference_tbptt(
    model: SequenceRegressor,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    segment_length: int,
    epochs: int = 1,
    step_per: str = "segment",
    accumulate: int | list[int] = 1,
    clip: float | None = None,
    time_dim: int = 1,
    carry: bool = True,
) -> dict[str, Any]:
    """The oracle: a plain, hand-written PyTorch TBPTT loop.

    ``step_per="segment"``: one step every ``accumulate`` segments (counted through the epoch), and at the end of
    every batch after which Lightning steps (every ``accumulate`` batches and at the end of the epoch).
    ``step_per="batch"``: one step at the end of every batch after which Lightning steps. Every loss is divided by
    ``accumulate``, which may also be given per epoch. Returns counts and the largest gradient norm before clipping.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    steps, largest_norm = 0, 0.0
    for epoch in range(epochs):
        n = accumulate[epoch] if isinstance(accumulate, list) else accumulate
        batches = list(loader)
        segments_since_step = 0
        for b, (x, y) in enumerate(batches):
            state = None
            length = x.shape[time_dim]
            starts = list(range(0, length, segment_length))
            for s, start in enumerate(starts):
                size = min(segment_length, length - start)
                x_seg, y_seg = x.narrow(time_dim, start, size), y.narrow(time_dim, start, size)
                out, new_state = model.rnn(x_seg, state if carry else None)
                loss = F.mse_loss(model.head(out), y_seg) / n
                loss.backward()
                state = detach_state(new_state)
                last_segment = s == len(starts) - 1
                lightning_steps = (b + 1) % n == 0 or b == len(batches) - 1
                if step_per == "segment":
                    segments_since_step += 1
                    step = segments_since_step == n or (last_segment and lightning_steps)
                else:
                    step = last_segment and lightning_steps
                if step:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
                    largest_norm = max(largest_norm, norm.item())
                    optimizer.step()
                    optimizer.zero_grad()
                    steps += 1
                    segments_since_step = 0
    return {"steps": steps, "largest_norm": largest_norm}


def reference_full_bptt(
    model: SequenceRegressor, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], epochs: int = 1
) -> int:
    """The oracle for segments at least as long as the sequence: plain backpropagation through the whole batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            out, _ = model.rnn(x)
            F.mse_loss(model.head(out), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    return steps


def twin(model: nn.Module) -> nn.Module:
    """An identical copy of ``model`` for the reference loop."""
    return copy.deepcopy(model)


class Fitted(NamedTuple):
    model: Any
    reference: Any
    loader: Any
    trainer: pl.Trainer


def fit_with_twin(
    tmp_path: Any, make_model: Callable[[], nn.Module], callbacks: Iterable[Any], loader: Any = None, **kwargs: Any
) -> Fitted:
    """Seed, build the model, keep an untrained twin of it for the reference loop, then fit the model."""
    torch.manual_seed(0)
    model = make_model()
    reference = twin(model)
    loader = make_loader() if loader is None else loader
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model, loader)
    return Fitted(model, reference, loader, trainer)


PEAK_MIB = """
def peak_mib():
    # the high-water mark of this process's own memory: unlike `ru_maxrss`, which Linux carries over from the parent
    # through fork and exec, so that a child of a large process (pytest) would report the parent's peak
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
"""

GARBAGE = 1e3  # padded steps hold values that would ruin any result they leaked into


def padded_batches(
    lengths: list[list[int]], pad_to: int | None = None, input_size: int = 3, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for batch_lengths in lengths:
        padded = pad_to or max(batch_lengths)
        x = torch.full((len(batch_lengths), padded, input_size), GARBAGE, dtype=torch.float64)
        y = torch.full((len(batch_lengths), padded, 1), GARBAGE, dtype=torch.float64)
        for row, n in enumerate(batch_lengths):
            x[row, :n] = torch.randn(n, input_size, generator=generator, dtype=torch.float64)
            y[row, :n] = torch.cumsum(x[row, :n, :1], dim=0) / 5
        batches.append({"x": x, "y": y, "lengths": torch.tensor(batch_lengths)})
    return batches


LENGTHS = [[23, 7, 12, 1], [9, 9, 3, 16], [5, 20, 11, 2]]


def loader_of(batches: list[Any]) -> DataLoader[Any]:
    return DataLoader(batches, batch_size=None)
