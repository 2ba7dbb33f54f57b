"""WINA (Chen et al. 2025): weight-informed activation sparsity.

A channel's effect on the output is |x_i| · ||W[:, i]||₂, not |x_i| alone, so WINA
thresholds that product. Projections sharing one input (q/k/v, gate/up) are judged by
the norm of the fused column, so they skip the same channels.
"""

from __future__ import annotations

import torch

from sparsellm.activation.base import ActivationMethod


class WINA(ActivationMethod):
    name = "wina"

    def channel_scale(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float().norm(dim=0)
