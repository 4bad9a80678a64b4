"""The exceptions the library raises: one base class and one class per kind of mistake.

Every message is a single line that names the argument (or the part of the batch or model), the value it got and
what to do instead.

Example:
    >>> from lightning_tbptt import TBPTTCallback
    >>> TBPTTCallback(segment_length=0)
    Traceback (most recent call last):
      ...
    lightning_tbptt.errors.ConfigurationError: Expected argument `segment_length` to be a positive integer but got 0. Pass the number of time steps per segment, e.g. `TBPTTCallback(segment_length=64)`.

"""  # noqa: E501


class TBPTTError(Exception):
    """Base class of the errors ``lightning_tbptt`` checks for.

    Three exceptions are not: a ``TypeError`` of the namespace helpers for an object that is not a Lightning class, the
    ``IndexError`` of :meth:`LaneStream.batch <lightning_tbptt.LaneStream.batch>` for an index out of range, and the
    ``SystemExit`` of the ``lightning-tbptt demo`` command for a bad flag (see the troubleshooting page).
    """


class ConfigurationError(TBPTTError, ValueError):
    """An argument of the callback, or the way it is combined with the ``Trainer``, cannot work."""


class BatchError(TBPTTError, ValueError):
    """Data does not have the structure it needs.

    A batch that cannot be cut along time, invalid lengths, or per-step tensors that do not match their mask.
    """


class ModelError(TBPTTError, TypeError):
    """The ``LightningModule`` (or one of its submodules) cannot be trained segment by segment as it is."""


class NoSegmentError(TBPTTError, RuntimeError):
    """Something that needs the running segment (its mask) was used while no segment runs."""
