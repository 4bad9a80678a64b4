"""Lightning 1.x compatibility: ``truncated_bptt_steps``, ``tbptt_split_batch`` and ``training_step(..., hiddens)``.

A module written for Lightning 1.x's built-in TBPTT sets ``self.truncated_bptt_steps``, may define
``tbptt_split_batch(batch, split_size)``, and may take the state as ``hiddens`` and return it in its output
(``{"loss": loss, "hiddens": new_hiddens}``). The callback honours all three: this module reads them.
"""

import inspect
from typing import Any

from lightning_tbptt.config import check_positive_int
from lightning_tbptt.errors import ConfigurationError, ModelError
from lightning_tbptt.namespaces import is_param_in_hook_signature
from lightning_tbptt.state import detach_state


def module_segment_length(module: Any) -> int:
    """The module's ``truncated_bptt_steps``, for a callback given no ``segment_length``.

    Raises:
        ConfigurationError: If it is not set, or not a positive integer.

    """
    steps = getattr(module, "truncated_bptt_steps", None)
    if steps is None:
        raise ConfigurationError(
            f"Expected argument `segment_length` of `TBPTTCallback` or the attribute `truncated_bptt_steps` of"
            f" {type(module).__name__} to be set but got neither. Pass e.g. `TBPTTCallback(segment_length=64)`."
        )
    return check_positive_int(steps, "truncated_bptt_steps", "self.truncated_bptt_steps = 64")


def splits_batches(module: Any) -> bool:
    """Whether the module defines ``tbptt_split_batch`` (it then cuts the batches)."""
    return callable(getattr(module, "tbptt_split_batch", None))


def hiddens_signature(module: Any) -> tuple[bool, int | None, int, str]:
    """How ``training_step`` takes ``hiddens``.

    Returns:
        Whether the step is passed ``hiddens`` (Lightning 1.x passed it whenever ``truncated_bptt_steps`` was set,
        also to ``training_step(*args)``), the position of a ``hiddens`` parameter (or ``None``), the position it must
        have, and the signature (for messages).

    """
    step = module.training_step
    signature = inspect.signature(step)
    parameters = list(signature.parameters)
    steps = getattr(module, "truncated_bptt_steps", 0)
    one_x = isinstance(steps, int) and not isinstance(steps, bool) and steps > 0
    var_positional = any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values())
    takes = "hiddens" in parameters or (one_x and var_positional)
    position = parameters.index("hiddens") if "hiddens" in parameters else None
    expected = 2 if is_param_in_hook_signature(step, "batch_idx", min_args=2) else 1
    return takes, position, expected, str(signature)


def returned_hiddens(output: dict[str, Any], index: int) -> Any:
    """The ``hiddens`` a segment's ``training_step`` returned, detached (and stored detached in ``output``).

    Raises:
        ModelError: If the output holds none.

    """
    if "hiddens" not in output:
        raise ModelError(
            f"Expected `training_step(batch, batch_idx, hiddens)` to return a dict with the key 'hiddens' but"
            f" segment {index} returned {f'the keys {sorted(output)}' if output else 'nothing'}, so the state"
            " of the next segment is unknown. Return `{'loss': loss, 'hiddens': new_hiddens}`."
        )
    output["hiddens"] = detach_state(output["hiddens"])
    return output["hiddens"]


def without_hiddens(output: dict[str, Any]) -> dict[str, Any]:
    """As in Lightning 1.x, the outputs handed to ``on_train_batch_end`` hold no ``hiddens``."""
    return {key: value for key, value in output.items() if key != "hiddens"}
