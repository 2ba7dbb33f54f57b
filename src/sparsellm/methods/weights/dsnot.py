"""DSnoT (Zhang et al., ICLR 2024): training-free prune-and-grow refinement of a mask.

For a layer y = W x, pruning changes the expected output of row i by

    ε_i = Σ_j (W⁰_ij − W_ij) · E[x_j]          (W⁰ dense, W pruned/updated)

DSnoT swaps weights, one pair per row per cycle, to drive ε_i towards zero while the
number of zeros stays fixed:

* grow the pruned weight whose restored contribution W⁰_ij·E[x_j] has the sign of ε_i
  and the largest size relative to Var[x_j]^p (reliable contributions first);
* prune, among kept weights whose contribution W_ij·E[x_j] has the opposite sign, the
  one with the lowest Wanda score |W_ij|·‖x_j‖ (unstructured), or the lowest-scored
  kept weight of the grown weight's group of M (N:M, which keeps the pattern valid;
  there a swap must also not flip ε's sign, as in the paper's N:M variant);
* skip a swap that would increase |ε_i| (the reference code can overshoot; we keep
  the guarantee that the expected error never grows), stop a row when
  |ε_i| ≤ `update_threshold` or it runs out of candidates, and stop after `max_cycles`.

Each candidate list is walked once with a pointer per end (linear time, no backprop),
all rows in parallel. `update_threshold` is per token: the reference code's 0.1 is on
sums over 2048-token sequences, i.e. 0.1 / 2048 ≈ 5e-5 per token.

As a recipe step after any pruner it refines that pruner's mask (grown weights get their
dense values back, so it needs the dense weights, which `sparsify` keeps); on a dense
layer it starts from Wanda's mask at the step's sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.base import (
    InputMoments,
    LayerContext,
    Stats,
    WeightPruneConfig,
    WeightPruner,
)
from sparsellm.methods.weights.masks import make_mask
from sparsellm.registry import register


@dataclass(frozen=True)
class DSnoTConfig(WeightPruneConfig):
    """`max_cycles` swaps per row at most; see the module docstring for the others."""

    name: ClassVar[str] = "dsnot"

    max_cycles: int = 50
    update_threshold: float = 5e-5
    var_power: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_cycles, int) or self.max_cycles < 0:
            raise SparseLLMError(f"max_cycles must be an integer >= 0, got {self.max_cycles!r}")
        if self.update_threshold < 0:
            raise SparseLLMError(f"update_threshold must be >= 0, got {self.update_threshold}")


def _ends(order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = order.shape
    lo = torch.zeros(rows, dtype=torch.long)
    hi = torch.full((rows,), cols - 1, dtype=torch.long)
    return lo, hi


def _take(order: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, from_hi: torch.Tensor):
    """Per row, the entry at the `hi` pointer where `from_hi`, else at `lo`."""
    ptr = torch.where(from_hi, hi, lo).clamp(0, order.shape[1] - 1)
    return order.gather(1, ptr[:, None]).squeeze(1)


def dsnot_refine(
    weight: torch.Tensor,
    dense: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    norm_sq: torch.Tensor,
    max_cycles: int = 50,
    update_threshold: float = 5e-5,
    var_power: float = 1.0,
    m: int = 0,
) -> torch.Tensor:
    """Refined copy of the pruned `weight` (zeros = pruned) with as many zeros per row.

    `dense` holds the weights before pruning; `mean`, `var`, `norm_sq` are per input
    channel statistics of the layer's inputs (E[x], Var[x], Σx²). `m` > 0 selects the
    N:M variant with groups of `m` along the input dimension.
    """
    w = weight.clone()
    rows, cols = w.shape
    ar = torch.arange(rows)
    pruned = w == 0
    grow_gain = dense * mean  # what growing a weight back takes off ε
    eps = ((dense - w) * mean).sum(1)
    wanda = w.abs() * norm_sq.sqrt()
    # grow candidates: pruned weights by contribution / Var^p; kept ones sit in the middle
    grow_key = torch.where(pruned, grow_gain / var.clamp_min(1e-12).pow(var_power), 0.0)
    grow_order = grow_key.argsort(dim=1, stable=True)
    g_lo, g_hi = _ends(grow_order)
    if m == 0:
        # prune candidates: kept weights with negative contribution by Wanda score
        # ascending, then positive ones by Wanda score descending; the rest in between
        contrib = w * mean
        rank = wanda.masked_fill(pruned, float("inf")).argsort(dim=1, stable=True).argsort(1)
        key = torch.where(pruned | (contrib == 0), float(cols), rank.float())
        key = torch.where(~pruned & (contrib > 0), 2.0 * cols - rank.float(), key)
        prune_order = key.argsort(dim=1, stable=True)
        p_lo, p_hi = _ends(prune_order)
    else:
        sign0 = eps.sign()
        frozen = wanda.masked_fill(pruned, float("inf"))  # pruned/grown never re-pruned
    active = torch.ones(rows, dtype=torch.bool)
    for _ in range(max_cycles):
        active &= eps.abs() > update_threshold
        if not active.any():
            break
        positive = eps > 0
        # grow from the end whose sign matches ε: largest positive / most negative
        g = _take(grow_order, g_lo, g_hi, positive)
        ok = pruned[ar, g] & (grow_gain[ar, g].sign() == eps.sign())
        if m == 0:
            p = _take(prune_order, p_lo, p_hi, ~positive)
            ok &= ~pruned[ar, p] & ((w[ar, p] * mean[p]).sign() == -eps.sign())
            p_lo += positive.long()
            p_hi -= (~positive).long()
        else:
            start = g - g % m
            group = start[:, None] + torch.arange(m)
            p = start + frozen.gather(1, group).argmin(1)
            ok &= ~pruned[ar, p]
        g_hi -= positive.long()
        g_lo += (~positive).long()
        active &= ok  # a row out of candidates is done
        after = eps - grow_gain[ar, g] + w[ar, p] * mean[p]
        better = after.abs() < eps.abs()  # never let a swap increase |ε|
        if m:
            better &= after.sign() == sign0
        update = active & better
        rows_u = ar[update]
        if rows_u.numel() == 0:
            continue
        gu, pu = g[update], p[update]
        eps[update] = after[update]
        w[rows_u, gu] = dense[rows_u, gu]
        w[rows_u, pu] = 0.0
        pruned[rows_u, gu] = False
        pruned[rows_u, pu] = True
        if m:
            frozen[rows_u, gu] = float("inf")
            frozen[rows_u, pu] = float("inf")
    return w


@register(DSnoTConfig)
class DSnoT(WeightPruner):
    stats = InputMoments
    per = "row"
    needs_dense = True

    def prune(
        self, weight: torch.Tensor, stats: Stats | None, ctx: LayerContext | None = None
    ) -> torch.Tensor:
        assert isinstance(stats, InputMoments)
        cfg = self.config
        assert isinstance(cfg, DSnoTConfig)
        pattern = cfg.parsed_pattern
        dense = weight if ctx is None or ctx.dense is None else ctx.dense.float()
        if not (weight == 0).any():  # dense layer: start from Wanda's mask
            score = weight.abs() * stats.norm_sq.sqrt()
            target = self.sparsity(ctx)
            weight = weight.masked_fill(make_mask(score, target, pattern, "row"), 0.0)
        return dsnot_refine(
            weight,
            dense,
            stats.mean,
            stats.var,
            stats.norm_sq,
            cfg.max_cycles,
            cfg.update_threshold,
            cfg.var_power,
            pattern.m if pattern.is_nm else 0,
        )
