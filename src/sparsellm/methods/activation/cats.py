"""CATS (Lee et al. 2024): threshold the SwiGLU gate activation |SiLU(W_gate x)|.

Where the gate is cut, the matching row of W_up and column of W_down are never needed,
so the skipped share is of the MLP's up + down weights (the gate stays dense). One
threshold per layer, the `sparsity`-quantile of |gate activation| on calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparsellm.methods.activation.base import ActivationConfig, ActivationMethod
from sparsellm.registry import register


@dataclass(frozen=True)
class CATSConfig(ActivationConfig):
    """CATS: the family's keys; `allocation` is moot (one level for every gate) and
    `head` is refused when applied (the head has no gate)."""

    name: ClassVar[str] = "cats"


@register(CATSConfig)
class CATS(ActivationMethod):
    target = "gate"
