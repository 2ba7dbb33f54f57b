"""R-Sparse (Zhang et al. 2025): sparse input channels plus a low-rank path for the rest.

y = W x_kept + A (B x_skipped), with A B the rank-r truncated SVD of W: the skipped
channels are not dropped but sent through a cheap approximation of W. Channels are
chosen by |x_i| as in TEAL; the paper's evolutionary search of per-layer (sparsity, rank)
is replaced by TEAL's greedy levels at a fixed rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.activation.base import ActivationConfig, ActivationMethod
from sparsellm.methods.activation.thresholds import svd_factors
from sparsellm.registry import register


@dataclass(frozen=True)
class RSparseConfig(ActivationConfig):
    """R-Sparse: the family's keys plus `rank`, the size of the low-rank path."""

    name: ClassVar[str] = "rsparse"

    rank: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise SparseLLMError(f"rsparse: rank must be >= 1, got {self.rank}")


@register(RSparseConfig)
class RSparse(ActivationMethod):
    config: RSparseConfig

    def low_rank(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return svd_factors(weight, self.config.rank)
