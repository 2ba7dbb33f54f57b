"""R-Sparse (Zhang et al. 2025): sparse input channels plus a low-rank path for the rest.

y = W x_kept + A (B x_skipped), with A B the rank-r truncated SVD of W: the skipped
channels are not dropped but sent through a cheap approximation of W. Channels are
chosen by |x_i| as in TEAL; the paper's evolutionary search of per-layer (sparsity, rank)
is replaced by TEAL's greedy levels at a fixed rank.
"""

from __future__ import annotations

import torch

from sparsellm.activation.base import ActivationMethod
from sparsellm.activation.thresholds import svd_factors


class RSparse(ActivationMethod):
    name = "rsparse"

    def low_rank(self, weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return svd_factors(weight, rank)
