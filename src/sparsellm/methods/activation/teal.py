"""TEAL (Liu et al. 2024): skip input channels with small |x_i|, magnitude thresholds per
layer calibrated on activations, per-layer levels chosen greedily inside each block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparsellm.methods.activation.base import ActivationConfig, ActivationMethod
from sparsellm.registry import register


@dataclass(frozen=True)
class TEALConfig(ActivationConfig):
    """TEAL: the family's keys only (|x_i| needs nothing from the weights)."""

    name: ClassVar[str] = "teal"


@register(TEALConfig)
class TEAL(ActivationMethod):
    """The base rule unchanged: score = |x_i|, no correction."""
