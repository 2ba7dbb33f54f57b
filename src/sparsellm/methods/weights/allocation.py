"""Per-layer sparsity budgets: OWL (outlier-weighed layerwise sparsity, Yin et al. 2024).

LLM blocks differ in how many *outlier* features they carry; OWL prunes blocks with
more outliers less. A block's outlier ratio D_l is the fraction of its Wanda scores
|W_ij|·‖x_j‖ (over all its pruned linears together) above `threshold` (the paper's M,
default 5) times their mean. The ratios are rescaled to [0, 2λ] and shifted so their
mean is zero; block l then keeps density (1 − s) + that shift, i.e. sparsity

    s_l = s − (2λ (D_l − min D) / (max D − min D) − mean_l[...])

The mean here is weighted by each block's parameter count, so the *global* sparsity
over all pruned weights stays exactly at the target (up to per-row rounding), also
when blocks differ in size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsellm.calib.hooks import input_hooks
from sparsellm.calib.sequential import run_sequential
from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.base import RowNormSq
from sparsellm.models.adapters import weight_matrix


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """Fraction of all `scores` above `threshold` × their mean (OWL's D_l)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    return (flat > threshold * flat.mean()).float().mean().item()


def owl_sparsities(
    ratios: list[float], target: float, lam: float, sizes: list[int] | None = None
) -> list[float]:
    """Per-block sparsities from outlier ratios whose size-weighted mean is `target`."""
    sizes = sizes or [1] * len(ratios)
    lo, hi = min(ratios), max(ratios)
    spread = [0.0] * len(ratios) if hi == lo else [2 * lam * (r - lo) / (hi - lo) for r in ratios]
    mean = sum(s * n for s, n in zip(spread, sizes, strict=True)) / sum(sizes)
    out = [target - (s - mean) for s in spread]
    if min(out) < 0 or max(out) >= 1:
        raise SparseLLMError(
            f"OWL with lambda {lam} pushes a block's sparsity outside [0, 1) "
            f"({min(out):.3f}..{max(out):.3f}); lower owl_lambda"
        )
    return out


@torch.no_grad()
def owl_layer_sparsity(
    model: nn.Module,
    selected: list[dict[str, nn.Module]],
    calib: torch.Tensor,
    target: float,
    lam: float,
    threshold: float,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """OWL budgets for every selected layer, from one dense calibration pass."""
    ratios: list[float] = []
    sizes: list[int] = []
    owners: list[list[str]] = []

    def process_block(i: int, block: nn.Module, forward: Any) -> None:
        chosen = selected[i]
        if not chosen:
            return
        stats: dict[str, RowNormSq] = {}

        def update(fqn: str, x: torch.Tensor) -> None:
            if fqn not in stats:
                stats[fqn] = RowNormSq(x.shape[-1])
            stats[fqn].update(x.detach())

        with input_hooks(chosen, update):
            forward()
        scores = [weight_matrix(m).float().abs() * stats[f].value.sqrt() for f, m in chosen.items()]
        ratios.append(outlier_ratio(scores, threshold))
        sizes.append(sum(s.numel() for s in scores))
        owners.append(list(chosen))

    run_sequential(model, list(calib.split(batch_size)), process_block, "owl", dtype)
    budgets = owl_sparsities(ratios, target, lam, sizes)
    return {fqn: s for names, s in zip(owners, budgets, strict=True) for fqn in names}
