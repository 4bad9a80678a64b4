"""Truncated backpropagation through time for PyTorch Lightning, by adding one callback to the ``Trainer``."""

from lightning_tbptt.callback import TBPTTCallback
from lightning_tbptt.errors import BatchError, ConfigurationError, ModelError, TBPTTError

__version__ = "0.1.0.dev0"

__all__ = ["BatchError", "ConfigurationError", "ModelError", "TBPTTCallback", "TBPTTError", "__version__"]
