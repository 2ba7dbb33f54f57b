"""Magnitude pruning: drop the smallest |W| in each layer (no calibration data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.methods.weights.base import Stats, WeightPruneConfig, WeightPruner
from sparsellm.registry import register


@dataclass(frozen=True)
class MagnitudeConfig(WeightPruneConfig):
    """Magnitude has no knobs beyond the common ones."""

    name: ClassVar[str] = "magnitude"


@register(MagnitudeConfig)
class Magnitude(WeightPruner):
    stats = None
    per = "layer"  # one threshold per weight matrix

    def score(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        return weight.abs()
