"""DeltaLLM-style temporal sparsity (Qi et al., 2025): skip the input changes between
consecutive tokens that are below a threshold.

DeltaLLM applies its deltas to attention; here the same delta rule is applied to the
block linears' inputs, where a skipped change is a weight column not read (what TEAL
saves), see docs/activation.md for the deviation.

A linear layer's output for token t is y_t = W x̂_t, where x̂ tracks the input lazily:
channel i of the reference is refreshed only when the input moved by more than θ since
it was last refreshed, x̂_t,i = x_t,i if |x_t,i − x̂_{t−1,i}| > θ else x̂_{t−1,i}. Then
y_t = y_{t−1} + W (x̂_t − x̂_{t−1}) reads only the columns of the refreshed channels: the
skipped fraction is the weight reads saved (the delta-network rule of Neil et al., 2017,
that DeltaLLM applies to LLM inference). The first token of a sequence is computed dense.
Where TEAL drops small *values* for good, this drops small *changes*: a skipped channel
keeps contributing its last refreshed value.

θ is calibrated per input group by bisection so that the skipped fraction on the
calibration windows, with the recursion run as at inference, equals the target `sparsity`;
every layer gets the same level (no greedy allocation: the error of a skip depends on the
history, not on one token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.activation.base import ActivationConfig, ActivationMethod
from sparsellm.registry import register


def track_deltas(
    x: torch.Tensor, threshold: float, ref: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lazily refreshed inputs x̂ (B, T, d) of `x` (B, T, d) and the refresh mask
    (True = channel read). `ref` (B, d) continues a sequence (decode); None starts one,
    whose first token is read in full."""
    x_hat = torch.empty_like(x)
    read = torch.empty(x.shape, dtype=torch.bool)
    start = 0
    if ref is None:
        ref = x[:, 0]
        x_hat[:, 0] = ref
        read[:, 0] = True
        start = 1
    for t in range(start, x.shape[1]):
        moved = (x[:, t] - ref).abs() > threshold
        ref = torch.where(moved, x[:, t], ref)
        x_hat[:, t] = ref
        read[:, t] = moved
    return x_hat, read


def skipped_fraction(x: torch.Tensor, threshold: float) -> float:
    """Fraction of channel reads skipped over the tokens after the first of each sequence."""
    return 1.0 - float(track_deltas(x, threshold)[1][:, 1:].float().mean())


def calibrate_threshold(x: torch.Tensor, sparsity: float, iters: int = 24) -> float:
    """θ whose skipped fraction on the sequences `x` (B, T, d) is `sparsity` (bisection:
    the fraction grows monotonically with θ)."""
    if x.dim() != 3 or x.shape[1] < 2:
        raise SparseLLMError("calibrating a delta threshold needs (batch, tokens >= 2, dim)")
    if sparsity <= 0:
        return 0.0
    lo, hi = 0.0, float((x[:, 1:] - x[:, :-1]).abs().max()) + 1e-6
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if skipped_fraction(x, mid) < sparsity else (lo, mid)
    return hi


@dataclass(frozen=True)
class DeltaLLMConfig(ActivationConfig):
    """Temporal-delta skipping; `allocation` must stay uniform (see the module doc)."""

    name: ClassVar[str] = "deltallm"

    allocation: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation != "uniform":
            raise SparseLLMError("deltallm supports allocation=uniform only")
        if self.head:
            raise SparseLLMError("deltallm does not threshold the LM head")


@register(DeltaLLMConfig)
class DeltaLLM(ActivationMethod):
    """Skips small input *changes*: thresholds are fitted on token sequences."""

    target: ClassVar[str] = "delta"
