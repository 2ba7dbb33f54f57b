"""WINA (Chen et al. 2025): weight-informed activation sparsity.

A channel's effect on the output is |x_i| · ||W[:, i]||₂, not |x_i| alone, so WINA
thresholds that product. Projections sharing one input (q/k/v, gate/up) are judged by
the norm of the fused column, so they skip the same channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.methods.activation.base import ActivationConfig, ActivationMethod
from sparsellm.registry import register


@dataclass(frozen=True)
class WINAConfig(ActivationConfig):
    """WINA: the family's keys only (the column norms come from the weights)."""

    name: ClassVar[str] = "wina"


@register(WINAConfig)
class WINA(ActivationMethod):
    """Scale |x_i| by the fused column norm, its weight's share of the output."""

    def channel_scale(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float().norm(dim=0)
