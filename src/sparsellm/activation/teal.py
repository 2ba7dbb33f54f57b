"""TEAL (Liu et al. 2024): skip input channels with small |x_i|, magnitude thresholds per
layer calibrated on activations, per-layer levels chosen greedily inside each block."""

from __future__ import annotations

from sparsellm.activation.base import ActivationMethod


class TEAL(ActivationMethod):
    name = "teal"
