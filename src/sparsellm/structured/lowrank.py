"""Low-rank factorisation with non-uniform ranks from singular-value spectra (WeLore-style).

WeLore (Jaiswal et al. 2024) observes that some matrices have fast-decaying spectra
(low-rank components) and others heavy tails. One global threshold t on the normalised
singular values σ_k/σ_1 gives every matrix its own rank r = #{σ_k/σ_1 > t}: matrices with
fast-decaying spectra shrink a lot, flat ones keep full rank. A matrix is factorised only
when r·(in+out) < in·out, i.e. when the factors are smaller than the dense matrix. We
bisect t so that about `ratio` of the block linears' parameters go. No data is read.

Not done (said so): WeLore's fine-tuning of only the low-rank components, and the
sparse + low-rank split (LOST/SLTrain) applied post-training.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsellm.models.adapters import block_linears, get_blocks
from sparsellm.structured.common import set_module

RANKS_KEY = "sparsellm_low_rank"


class LowRankLinear(nn.Module):
    """y = (x·Aᵀ)·Bᵀ + bias with A (r, in), B (out, r): two thin matmuls instead of one."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.a.T) @ self.b.T
        return y + self.bias if self.bias is not None else y


def ranks_for_threshold(spectra: list[torch.Tensor], t: float) -> list[int]:
    """Per matrix: #{σ_k/σ_1 > t}, at least 1."""
    return [max(1, int((s / s[0].clamp_min(1e-30) > t).sum())) for s in spectra]


def allocate_ranks(
    spectra: list[torch.Tensor], shapes: list[tuple[int, int]], ratio: float, iters: int = 40
) -> list[int | None]:
    """Rank per matrix (None = keep dense) removing about `ratio` of the matrices' params."""
    dense = torch.tensor([o * i for o, i in shapes], dtype=torch.float64)
    per_rank = torch.tensor([o + i for o, i in shapes], dtype=torch.float64)

    def plan(t: float) -> tuple[list[int | None], float]:
        ranks = torch.tensor(ranks_for_threshold(spectra, t), dtype=torch.float64)
        factor = ranks * per_rank < dense
        params = torch.where(factor, ranks * per_rank, dense)
        out = [int(r) if f else None for r, f in zip(ranks.tolist(), factor.tolist(), strict=True)]
        return out, 1 - params.sum().item() / dense.sum().item()

    if ratio <= 0:
        return [None] * len(spectra)
    lo, hi = 0.0, 1.0  # removed fraction grows with t
    for _ in range(iters):
        mid = (lo + hi) / 2
        if plan(mid)[1] < ratio:
            lo = mid
        else:
            hi = mid
    return plan(hi)[0]


def factorise(lin: nn.Linear, rank: int) -> LowRankLinear:
    """Best rank-`rank` approximation (truncated SVD) of a Linear, as two factors."""
    u, s, vh = torch.linalg.svd(lin.weight.data.double(), full_matrices=False)
    new = LowRankLinear(lin.in_features, lin.out_features, rank, lin.bias is not None)
    root = s[:rank].sqrt()
    new.a.data.copy_(root[:, None] * vh[:rank])
    new.b.data.copy_(u[:, :rank] * root)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data)
    return new.to(lin.weight.dtype)


@torch.no_grad()
def low_rank(model: nn.Module, ratio: float) -> dict[str, int]:
    """Factorise block linears in place with WeLore-style ranks; returns {name: rank}."""
    entries = [
        (i, rel, m) for i, b in enumerate(get_blocks(model)) for rel, m in block_linears(b).items()
    ]
    spectra = [torch.linalg.svdvals(m.weight.data.double()) for _, _, m in entries]
    shapes = [tuple(m.weight.shape) for _, _, m in entries]
    ranks = allocate_ranks(spectra, shapes, ratio)
    blocks = get_blocks(model)
    done: dict[str, int] = {}
    for (i, rel, m), r in zip(entries, ranks, strict=True):
        if r is not None:
            set_module(blocks[i], rel, factorise(m, r))
            done[f"{i}.{rel}"] = r
    if done:
        setattr(model.config, RANKS_KEY, done)
    return done


def rebuild(model: nn.Module, ranks: dict[str, int]) -> None:
    """Put empty `LowRankLinear`s where a saved model has factors (for loading)."""
    blocks = get_blocks(model)
    for key, r in ranks.items():
        i, _, rel = key.partition(".")
        lin = blocks[int(i)].get_submodule(rel)
        set_module(
            blocks[int(i)],
            rel,
            LowRankLinear(lin.in_features, lin.out_features, r, lin.bias is not None).to(
                lin.weight.dtype
            ),
        )
