"""The structured family: its common config keys and the one entry point, `apply_structured`.

A structured method removes whole structures (heads, channels, residual dimensions,
rank, blocks) so the model gets smaller, not sparser. Every method module declares a
frozen `StructuredConfig` subclass and registers a handler with
``@register(TheConfig)``; a handler has the signature of `StructuredHandler` and returns
only its method-specific report keys. What every method shares (architecture check,
calibration-data check, parameter counts, timing, the report's common keys) lives here
once, so a new method cannot forget it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from sparsellm.config import MethodConfig, to_config
from sparsellm.errors import SparseLLMError
from sparsellm.methods.structured.common import block_param_count, layer_shapes
from sparsellm.models.adapters import block_layout
from sparsellm.registry import handler


@dataclass(frozen=True)
class StructuredConfig(MethodConfig):
    """Keys every structured method accepts: `ratio`, the fraction of the transformer
    blocks' parameters to remove (0 keeps the function exactly)."""

    family: ClassVar[str] = "structured"
    # False where the result's blocks are not plain HF blocks (SliceGPT's shortcuts,
    # low-rank factors), whose widths `layer_shapes` cannot read.
    plain_blocks: ClassVar[bool] = True

    ratio: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float):
            raise SparseLLMError(f"{self.name}: ratio must be a number, got {self.ratio!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise SparseLLMError(f"{self.name}: ratio must be in [0, 1), got {self.ratio}")

    @property
    def needs_data(self) -> bool:
        """Whether the method reads calibration ids (data-free methods override this)."""
        return True


StructuredHandler = Callable[[nn.Module, StructuredConfig, torch.Tensor | None, int], dict]


def apply_structured(
    model: nn.Module,
    config: MethodConfig | dict[str, Any] | str,
    calib_ids: torch.Tensor | None = None,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Shrink `model` in place by the structured method `config`; returns a report.

    `config` is a structured config, a ``{"method": ..., ...}`` mapping or a spec string.
    The report holds the config's keys (``method``, ``ratio``, ...), ``seconds``,
    ``block_params_before`` / ``_after``, ``measured_ratio``, ``layer_shapes`` (empty
    where blocks are not plain HF blocks) and the handler's own keys.
    """
    config = cast(StructuredConfig, to_config(config, "structured"))
    block_layout(model)  # unsupported architectures fail here, before any work
    if config.needs_data and (calib_ids is None or calib_ids.numel() == 0):
        raise SparseLLMError(f"{config.to_spec()!r} needs calibration ids")
    apply: StructuredHandler = handler(config)
    before = block_param_count(model)
    start = time.perf_counter()
    with torch.no_grad():
        specific = apply(model, config, calib_ids, batch_size)
    after = block_param_count(model)
    shapes = [asdict(s) for s in layer_shapes(model)] if config.plain_blocks else []
    return {
        **config.to_dict(),
        **specific,
        "seconds": time.perf_counter() - start,
        "block_params_before": before,
        "block_params_after": after,
        "measured_ratio": 1 - after / before,
        "layer_shapes": shapes,
    }
