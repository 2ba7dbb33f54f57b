"""Wanda (Sun et al., 2023): prune by |W_ij| · ‖X_j‖₂, compared within each output row.

The activation norm makes weights that meet large inputs matter more; comparing per
output row (not per layer) is what the paper found essential for LLMs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.methods.weights.base import RowNormSq, Stats, WeightPruneConfig, WeightPruner
from sparsellm.registry import register


@dataclass(frozen=True)
class WandaConfig(WeightPruneConfig):
    """Wanda has no knobs beyond the common ones."""

    name: ClassVar[str] = "wanda"


@register(WandaConfig)
class Wanda(WeightPruner):
    stats = RowNormSq
    per = "row"

    def score(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        assert isinstance(stats, RowNormSq)
        return weight.abs() * stats.value.sqrt().unsqueeze(0)
