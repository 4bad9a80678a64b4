"""Truncated backpropagation through time for PyTorch Lightning, by adding one callback to the ``Trainer``."""

# first: it imports the Lightning namespaces in the order that keeps Lightning's logger where the user's imports put it
import lightning_tbptt.namespaces  # noqa: F401  # isort: skip
from lightning_tbptt.callback import TBPTTCallback
from lightning_tbptt.data import LaneDataModule, LaneStream
from lightning_tbptt.dynamic import DynamicEvaluation
from lightning_tbptt.errors import BatchError, ConfigurationError, ModelError, NoSegmentError, TBPTTError
from lightning_tbptt.loss import masked_mean
from lightning_tbptt.metric import MaskedMetric
from lightning_tbptt.protocol import StateSpec
from lightning_tbptt.random_lengths import RandomLengths
from lightning_tbptt.segment import Segment, current_segment
from lightning_tbptt.stepper import Stepper

__version__ = "0.1.0"

__all__ = [
    "BatchError",
    "ConfigurationError",
    "DynamicEvaluation",
    "LaneDataModule",
    "LaneStream",
    "MaskedMetric",
    "ModelError",
    "NoSegmentError",
    "RandomLengths",
    "Segment",
    "StateSpec",
    "Stepper",
    "TBPTTCallback",
    "TBPTTError",
    "__version__",
    "current_segment",
    "masked_mean",
]
