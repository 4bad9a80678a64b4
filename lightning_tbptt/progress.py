"""Where a long batch stands: ``segment i/k`` in the Trainer's progress bar while the batch's segments run.

Lightning's progress bars advance once per batch, so with batches of many segments the bar would sit still for a
whole batch. While a batch of several segments runs, the description of the bar of the running stage reads e.g.
``Epoch 0 (segment 3/20)``, and reverts once the batch ends. The text is updated at every segment (an assignment); a
TQDM bar writing to a terminal with ``refresh_rate=1`` is redrawn at most every :data:`REFRESH_SECONDS` (elsewhere the
text waits for Lightning's own redraw, so logs grow no faster), so segments cost no per-step logging or drawing.

Supported: Lightning's ``TQDMProgressBar`` and ``RichProgressBar`` (and subclasses) of either namespace, through
their public attributes (``train_progress_bar``/``val_progress_bar``/... and ``progress`` with
``train_progress_bar_id``/...). Other progress bars are left alone; they can read
:func:`~lightning_tbptt.current_segment` (``index``, ``count``).
"""

import time
from typing import Any

REFRESH_SECONDS = 0.1
"""The shortest time between two redraws of the bar for segment progress."""

_STAGES = ("train", "sanity", "val", "test", "predict")


def _stage(trainer: Any) -> str:
    if trainer.training:
        return "train"
    if trainer.sanity_checking:
        return "sanity"
    if trainer.validating:
        return "val"
    return "test" if trainer.testing else "predict"


def _kind(bar: Any) -> str | None:
    names = {cls.__name__ for cls in type(bar).__mro__}
    if "TQDMProgressBar" in names:
        return "tqdm"
    if "RichProgressBar" in names:
        return "rich"
    return None


def _is_terminal(bar: Any) -> bool:
    isatty = getattr(getattr(bar, "fp", None), "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


class SegmentProgress:
    """Shows the running segment of a batch in the progress bar of ``trainer`` (if it has a supported one)."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer
        self._base: tuple[str, Any, str] | None = None
        """The kind of bar, the bar (tqdm bar, or Rich task id) being annotated and its description before the batch."""
        self._drawn = 0.0

    def _target(self) -> tuple[str, Any] | None:
        callback = self._trainer.progress_bar_callback
        if callback is None or not callback.is_enabled:
            return None
        kind = _kind(callback)
        stage = _stage(self._trainer)
        if kind == "tqdm":
            name = "val" if stage == "sanity" else stage
            try:
                return kind, getattr(callback, f"{name}_progress_bar")
            except (AttributeError, TypeError):  # the bar of this stage does not exist (yet)
                return None
        if kind == "rich":
            task = getattr(callback, f"{'val_sanity' if stage == 'sanity' else stage}_progress_bar_id", None)
            if callback.progress is None or task is None:
                return None
            return kind, task
        return None

    def show(self, index: int, count: int, recomputing: bool = False) -> None:
        """Before segment ``index`` (from 0) of ``count`` runs: show ``(segment index+1/count)``.

        ``recomputing``: the segment is run again with gradient (``exact=True``): show ``(segment 3/4, recomputing)``.
        """
        if count <= 1:
            return
        target = self._target()
        if target is None:
            return
        kind, bar = target
        callback = self._trainer.progress_bar_callback
        if self._base is None:
            if kind == "tqdm":
                self._base = (kind, bar, bar.desc[:-2] if bar.desc.endswith(": ") else bar.desc)
            else:
                self._base = (kind, bar, callback.progress.tasks[bar].description)
        again = ", recomputing" if recomputing else ""
        text = f"{self._base[2].rstrip()} (segment {index + 1}/{count}{again})"
        now = time.monotonic()
        redraw = now - self._drawn >= REFRESH_SECONDS
        if redraw:
            self._drawn = now
        if kind == "tqdm":
            # redrawn only on a terminal and when Lightning redraws after every batch: elsewhere (a log file, a large
            # `refresh_rate`) each redraw would add output, so the text waits for Lightning's next redraw
            live = redraw and callback.refresh_rate == 1 and _is_terminal(bar)
            bar.set_description(text, refresh=live)
        else:
            callback.progress.update(bar, description=text)
            if redraw:
                callback.refresh()

    def done(self) -> None:
        """After the batch: restore the description (Lightning redraws the bar as the batch ends)."""
        if self._base is None:
            return
        kind, bar, description = self._base
        self._base = None
        callback = self._trainer.progress_bar_callback
        if kind == "tqdm":
            bar.set_description(description, refresh=False)
        elif callback is not None and callback.progress is not None:
            callback.progress.update(bar, description=description)
