"""Recurrent modules that carry other kinds of state than ``torch.nn`` RNNs, and the models the tests train.

Each module comes with its state spec (how the callback finds the state) and a ``call`` that passes the state by hand,
the way a hand-written loop would; the tests compare the callback against loops built on ``call``.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.helpers import SequenceRegressor

INPUT, HIDDEN = 3, 6


class CellLoop(nn.Module):
    """An ``nn.LSTMCell`` stepped over time by the module: ``forward(x, state=None) -> (outputs, (h, c))``."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(INPUT, HIDDEN)

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        outputs = []
        for step in x.unbind(1):
            state = self.cell(step, state)
            outputs.append(state[0])
        return torch.stack(outputs, 1), state


def scan(a: Tensor, b: Tensor) -> Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` from ``h_{-1} = 0`` for every ``t`` at once: a Hillis-Steele parallel scan over
    dimension 1 (``log2 T`` rounds of the associative step ``(a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2)``)."""
    shift = 1
    while shift < a.shape[1]:
        a_prev = F.pad(a[:, :-shift], (0, 0, shift, 0), value=1.0)
        b_prev = F.pad(b[:, :-shift], (0, 0, shift, 0), value=0.0)
        a, b = a * a_prev, a * b_prev + b
        shift *= 2
    return b


class MinGRU(nn.Module):
    """A minGRU-style layer (a diagonal linear recurrence with an input-dependent gate), computed by a parallel scan.

    ``h_t = (1 - z_t) * h_{t-1} + z_t * v_t`` with ``z_t = sigmoid(W_z x_t)``, ``v_t = W_v x_t``. Like linear-RNN and
    state-space layers, it takes its state as the keyword ``initial_state`` and returns ``(output, final_state)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(INPUT, HIDDEN)
        self.value = nn.Linear(INPUT, HIDDEN)

    def forward(self, x: Tensor, *, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = torch.sigmoid(self.gate(x))
        a, b = 1 - z, z * self.value(x)
        if initial_state is not None:  # the state enters as the first step's b: a_0 * h_{-1} + b_0
            b = torch.cat([b[:, :1] + a[:, :1] * initial_state.unsqueeze(1), b[:, 1:]], dim=1)
        h = scan(a, b)
        return h, h[:, -1]


class MemoryAttention(nn.Module):
    """A Transformer-XL-style layer: causal attention over the segment and a memory of the last hidden states.

    ``forward(x, mems=None) -> {"hidden": (B, T, H), "mems": (memory, seen)}``: the memory ``(M, B, H)`` is time-first
    (its batch axis is dimension 1), holds the ``M = memory`` latest hidden states, and ``seen`` ``(M, B)`` marks which
    of them exist: a row whose state is zeroed (a new sequence) has none, as at the start.
    """

    def __init__(self, memory: int = 5) -> None:
        super().__init__()
        self.memory = memory
        self.embed = nn.Linear(INPUT, HIDDEN)
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: Tensor, mems: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
        h = self.embed(x)  # (B, T, H)
        rows, steps, _ = h.shape
        if mems is None:
            past, seen = h[:, :0], torch.ones(rows, 0, dtype=torch.bool, device=x.device)
        else:
            past, seen = mems[0].transpose(0, 1), mems[1].transpose(0, 1)
        context = torch.cat([past, h], dim=1)  # (B, M + T, H)
        known = torch.cat([seen, torch.ones(rows, steps, dtype=torch.bool, device=x.device)], dim=1)
        causal = torch.ones(steps, context.shape[1], dtype=torch.bool, device=x.device).tril(past.shape[1])
        allowed = causal & known[:, None, :]
        scores = self.query(h) @ self.key(context).transpose(1, 2) / HIDDEN**0.5
        hidden = h + torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ self.value(context)
        memory = (context[:, -self.memory :].transpose(0, 1), known[:, -self.memory :].transpose(0, 1))
        return {"hidden": hidden, "mems": memory}


@dataclass
class Output:
    """What :class:`NamedOutput` returns: the sequence and the state under names."""

    sequence: Tensor
    last_state: Tensor


class NamedOutput(nn.Module):
    """A GRU behind a forward that returns a dataclass: ``forward(x, state=None) -> Output(sequence, last_state)``."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(INPUT, HIDDEN, batch_first=True)

    def forward(self, x: Tensor, state: Tensor | None = None) -> Output:
        sequence, last = self.gru(x, state)
        return Output(sequence, last)


KINDS: dict[str, dict[str, Any]] = {
    "lstm-cell-loop": {"module": CellLoop, "spec": None, "batch_dim": 0},
    "min-gru": {"module": MinGRU, "spec": "initial_state -> 1", "batch_dim": 0},
    "memory-attention": {
        "module": MemoryAttention,
        "spec": {"state_in": "mems", "state_out": "mems", "output": "hidden", "batch_dim": 1},
        "batch_dim": 1,
    },
    "named-output": {
        "module": NamedOutput,
        "spec": {"state_in": "state", "state_out": "last_state", "output": "sequence"},
        "batch_dim": 1,
    },
}
"""Each kind: its module, the spec passed as ``recurrent_modules={"rnn": spec}`` (``None``: a list of the name) and
the batch dimension of its state tensors."""


def call(kind: str, module: nn.Module, x: Tensor, state: Any) -> tuple[Tensor, Any]:
    """Run ``module`` on ``x`` from ``state``, passing it by hand: ``(output, new_state)``."""
    if kind in ("lstm-cell-loop", "tuple"):
        returned = module(x, state)
        return returned[0], returned[1]
    if kind == "min-gru":
        return module(x, initial_state=state)
    if kind == "memory-attention":
        returned = module(x, mems=state)
        return returned["hidden"], returned["mems"]
    returned = module(x, state)
    return returned.sequence, returned.last_state


class KindRegressor(SequenceRegressor):
    """``SequenceRegressor`` with one of the kinds as its recurrent module ``rnn``."""

    def __init__(self, kind: str, **kwargs: Any) -> None:
        super().__init__(log=False, **kwargs)
        self.kind = kind
        self.rnn = KINDS[kind]["module"]()
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = call(self.kind, self.rnn, x, None)
        prediction: Tensor = self.head(out)
        return prediction


def recurrent_modules(kind: str) -> Any:
    """What ``TBPTTCallback(recurrent_modules=...)`` takes for ``kind``."""
    spec = KINDS[kind]["spec"]
    return ["rnn"] if spec is None else {"rnn": spec}
