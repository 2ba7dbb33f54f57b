"""The activation family's config base and method interface.

A method says how to score an input channel (|x_i| times an optional per-channel scale
from the weights), whether the skipped part gets a low-rank correction, and whether it
thresholds block-linear inputs or the MLP gate activation. The framework
(`sparsellm.methods.activation.apply`) owns calibration, per-layer levels and wrapping, so a
method is one file: its config (an `ActivationConfig` subclass naming it) and its
`ActivationMethod` subclass, registered with ``@register(TheConfig)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.config import MethodConfig
from sparsellm.errors import SparseLLMError
from sparsellm.methods.activation.thresholds import check_activation_sparsity


@dataclass(frozen=True)
class ActivationConfig(MethodConfig):
    """The keys every activation method shares; each method subclasses it with a `name`.

    `sparsity` is the fraction of weight reads skipped in the thresholded layers (all
    block linears for input methods; up + down of the MLP for `cats`). `allocation:
    greedy` picks per-layer levels inside each block (TEAL), `uniform` gives every layer
    the same level. Calibration: `nsamples` windows of `seqlen` tokens, of which
    `max_tokens` tokens per block set thresholds and errors. `head` also thresholds the
    LM head's input at the target level (input methods only). Off by default, as in
    TEAL; it matters for small models with large vocabularies, whose head is a large
    share of the weights read per token (27% of Qwen2.5-0.5B), which otherwise caps the
    decode speedup below 1/(1 - sparsity).
    """

    family: ClassVar[str] = "activation"

    sparsity: float = 0.5
    allocation: str = "greedy"
    nsamples: int = 16
    seqlen: int = 256
    max_tokens: int = 1024
    seed: int = 0
    head: bool = False

    def __post_init__(self) -> None:
        check_activation_sparsity(self.sparsity)
        if self.allocation not in ("greedy", "uniform"):
            raise SparseLLMError(f"allocation must be greedy or uniform, got {self.allocation!r}")
        if self.nsamples < 1 or self.seqlen < 2 or self.max_tokens < 16:
            raise SparseLLMError("nsamples >= 1, seqlen >= 2, max_tokens >= 16")


class ActivationMethod:
    """Scoring rule of one method; subclasses override the class attributes / hooks.

    Built per call from its config (`sparsellm.registry.handler(config)(config)`), so a
    hook reads the method's own keys (R-Sparse's `rank`) from `self.config`.
    """

    target: ClassVar[str] = "inputs"  # "inputs" of block linears, or the MLP "gate"

    def __init__(self, config: ActivationConfig) -> None:
        self.config = config

    def channel_scale(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Per-input-channel multiplier of |x| (None = 1) for the fused (out, in) weight."""
        return None

    def low_rank(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Factors A, B approximating W on the skipped channels (None = no correction)."""
        return None
