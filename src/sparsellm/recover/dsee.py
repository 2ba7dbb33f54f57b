"""DSEE (Chen, Cheng, Gan, et al., 2021/2023): a sparse model tuned with a low-rank plus
sparse update.

The update of a pre-trained weight W is ΔW = U·V + S, with S non-zero only on a support Ω
of `n_sparse` positions chosen *before* training from W itself: decompose W into a
low-rank part and a sparse residual and keep the largest residual entries (the paper runs
GreBsmo; we take the rank-`rank` truncated SVD L of W and the `n_sparse` largest |W − L|,
one step of the same alternation). The final model is sparse: here the update is masked
by the layer's keep-mask M, ΔW = (U·V) ⊙ M + S with Ω ⊆ M, so a pruned (e.g. 2:4) layer
keeps its pattern through training and merging.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsellm.errors import SparseLLMError
from sparsellm.recover.lora import MaskedLoRALinear, add_lora


def sparse_support(
    weight: torch.Tensor, keep: torch.Tensor, rank: int, n_sparse: int
) -> torch.Tensor:
    """Flat indices (into the (out, in) weight) of the `n_sparse` kept positions where
    |W − L_rank(W)| is largest, L_rank the truncated SVD: the entries a rank-`rank` update
    explains worst, which DSEE gives their own trainable value."""
    if rank < 0 or n_sparse < 0:
        raise SparseLLMError(f"rank and n_sparse must be >= 0, not {rank} and {n_sparse}")
    w = weight.detach().float()
    if rank:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        w = w - (u[:, :rank] * s[:rank]) @ vh[:rank]
    score = w.abs().masked_fill(~keep, -1.0).flatten()
    n = min(n_sparse, int(keep.sum()))
    return torch.topk(score, n).indices.sort().values


class DSEELinear(MaskedLoRALinear):
    """Masked LoRA plus trainable values on a fixed sparse support (zero at start)."""

    def __init__(
        self, base_layer: nn.Linear, rank: int = 16, alpha: float = 16.0, n_sparse: int = 64
    ) -> None:
        super().__init__(base_layer, rank, alpha)
        idx = sparse_support(base_layer.weight, self.keep, rank, n_sparse)
        self.register_buffer("support", idx, persistent=False)
        self.sparse_values = nn.Parameter(torch.zeros(idx.numel()))

    def delta(self) -> torch.Tensor:
        low_rank = super().delta()
        values = self.sparse_values.to(low_rank.dtype)  # bf16 under autocast
        return low_rank.flatten().index_add(0, self.support, values).view_as(low_rank)


def add_dsee(
    model: nn.Module, rank: int = 16, alpha: float = 16.0, n_sparse: int = 64
) -> list[DSEELinear]:
    """Wrap every block linear in a DSEE adapter; merge with `merge_lora`."""
    return add_lora(  # type: ignore[return-value]
        model,
        adapter=lambda lin: DSEELinear(lin, rank, alpha, n_sparse),
    )
