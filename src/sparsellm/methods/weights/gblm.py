"""GBLM-Pruner (Das et al., 2023): Wanda's score plus a first-order gradient term.

    score_ij = |W_ij| · ‖X_j‖₂ + |W_ij| · G_ij,   G = sqrt(Σ_n (s · ∂L_n/∂W)²)

G is the ℓ2 norm over calibration samples of the scaled (s = 100, as in the paper's
code) per-sample gradient of the LM loss on the dense model, computed once before the
sequential pass (`sparsellm.calib.gradients`); the Wanda term uses the usual
sequential activations. Masks compare within each output row, like Wanda.

The two terms are added, so their relative scale matters: as in the reference code,
‖X_j‖² is the sum over tokens divided by the number of calibration sequences (Wanda's
running mean over samples), not the plain sum, which would weigh the activation term
√N times more (about 11× at 128 sequences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.base import (
    LayerContext,
    RowNormSq,
    Stats,
    WeightPruneConfig,
    WeightPruner,
)
from sparsellm.methods.weights.masks import make_mask
from sparsellm.registry import register


@dataclass(frozen=True)
class GBLMConfig(WeightPruneConfig):
    """`grad_scale` multiplies gradients before squaring (numerical range, as in GBLM)."""

    name: ClassVar[str] = "gblm"

    grad_scale: float = 100.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grad_scale <= 0:
            raise SparseLLMError(f"grad_scale must be > 0, got {self.grad_scale}")


def gblm_score(weight: torch.Tensor, norm_sq: torch.Tensor, grad_l2: torch.Tensor) -> torch.Tensor:
    """|W| · (‖X_j‖ + G): the Wanda term plus the gradient term."""
    return weight.abs() * (norm_sq.sqrt().unsqueeze(0) + grad_l2)


@register(GBLMConfig)
class GBLM(WeightPruner):
    stats = RowNormSq
    per = "row"
    needs_gradients = True

    def prune(
        self, weight: torch.Tensor, stats: Stats | None, ctx: LayerContext | None = None
    ) -> torch.Tensor:
        assert isinstance(stats, RowNormSq) and ctx is not None and ctx.grad is not None
        cfg = self.config
        target = self.sparsity(ctx)
        mask = make_mask(
            gblm_score(weight, stats.per_window, ctx.grad), target, cfg.parsed_pattern, "row"
        )
        return weight.masked_fill(mask, 0.0)
