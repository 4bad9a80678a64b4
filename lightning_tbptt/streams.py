"""Streams of batches: what one stream carries from one batch to the next.

Training and evaluation each have a :class:`Stream`: the recurrent state carried into its next segment
(a :class:`~lightning_tbptt.state.CarriedState`), and with ``streaming=True`` the number of rows (*lanes*) its
batches continue, the rows whose sequence ended before their batch did (they must start anew in the next batch), and
whether those came from a checkpoint being resumed. Evaluation streams also remember their dataloader: each
evaluation dataloader streams from zeros with its own state.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_tbptt.errors import BatchError
from lightning_tbptt.plan import SegmentPlan
from lightning_tbptt.state import CarriedState

TRAIN = "train"
EVAL = "eval"


@dataclass
class Stream:
    """Everything one stream of batches carries."""

    name: str
    state: CarriedState = field(default_factory=CarriedState)
    """The recurrent state carried into the stream's next segment."""
    lanes: int | None = None
    """Rows per batch, once a batch has run (with ``streaming``)."""
    unfinished: Tensor | None = None
    """``(B,)`` boolean, on the CPU: the rows whose sequence ended before the last batch did."""
    restored: bool = False
    """Whether ``lanes`` and the state come from a checkpoint (a mismatch then means other data, not a bug)."""
    dataloader: int | None = None
    """The evaluation dataloader the state belongs to."""
    start: dict[str, Any] | None = None
    """The state the stream starts from instead of zeros (module name -> state); ``None``: zeros."""

    def reset(self) -> None:
        """Start anew: from :attr:`start` (zeros without it), no lanes."""
        self.state.clear()
        if self.start:
            self.state.carried.update(self.start)
            self.state.rows.update({name: (None, 0) for name in self.start})
        self.lanes = None
        self.unfinished = None
        self.restored = False
        self.dataloader = None

    def begin_batch(self, plan: SegmentPlan, streaming: bool) -> None:
        """Start a batch: a fresh state, or with ``streaming`` check that the batch continues the lanes.

        Raises:
            BatchError: If the batch has another number of rows than the lanes, or a row whose sequence ended in the
                previous batch does not start anew.

        """
        if not streaming:
            self.reset()
            return
        rows = plan.batch_size
        lanes = self.lanes
        if lanes is not None and rows and rows != lanes and self.restored:
            raise BatchError(
                f"Expected the batches to continue the lanes of the checkpoint being resumed, which carries the"
                f" state of {lanes} lanes, but the batch has {rows} rows. Resume with the data layout"
                " (`lanes`, and the number of processes) the checkpoint was trained with."
            )
        if lanes is not None and rows and rows != lanes:
            raise BatchError(
                f"Expected every batch to have the same number of rows (lanes) with `TBPTTCallback(streaming=True)`,"
                f" since row j continues row j of the previous batch, but got a batch of {rows} rows after batches of"
                f" {lanes}. Give every batch the same rows: `DataLoader(..., drop_last=True)`, or a fixed number of"
                " lanes (`lightning_tbptt.data.LaneStream`)."
            )
        unfinished = self.unfinished
        if unfinished is not None and bool(unfinished.any()):
            restarted = plan.first_resets if plan.first_resets is not None else torch.zeros_like(unfinished)
            missing = torch.nonzero(unfinished & ~restarted).flatten().tolist()
            if missing:
                raise BatchError(
                    f"Expected the rows {missing[:10]} whose sequence ended before the end of the previous batch"
                    " (their lengths were shorter than the batch) to start a new sequence at this batch's first step,"
                    " but their reset markers are not set, so their carried state would include padding. Set"
                    " `resets` and mark those rows' first step, or end sequences only where batches end."
                )
        if rows:
            self.lanes = rows
        self.restored = False
        self.unfinished = None if plan.lengths is None else plan.lengths < plan.time_length

    def restore(self, carried: dict[str, Any], lanes: int | None, unfinished: Tensor | None) -> None:
        """Continue the stream a checkpoint saved: its state (on its device), lanes and unfinished rows."""
        self.reset()
        self.state.carried.update(carried)
        self.state.rows.update({name: (None, 0) for name in carried})
        if lanes:
            self.lanes = lanes
            self.restored = True
        self.unfinished = None if unfinished is None else unfinished.cpu().bool()

    def enter_dataloader(self, dataloader: int) -> None:
        """An evaluation batch of ``dataloader``: a new dataloader streams from zeros (or :attr:`start`)."""
        if dataloader != self.dataloader:
            self.reset()
            self.dataloader = dataloader
