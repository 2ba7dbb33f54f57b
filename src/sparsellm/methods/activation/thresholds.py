"""Pure math for activation sparsity: thresholds, error proxies, per-layer levels.

Everything here takes tensors and returns tensors or floats, so it is tested on
hand-checked numbers without a model; `sparsellm.methods.activation.apply` feeds it the
calibration activations of each block.
"""

from __future__ import annotations

import torch

from sparsellm.errors import SparseLLMError

LEVELS = tuple(round(0.05 * i, 2) for i in range(19))  # 0.0 ... 0.9, TEAL's grid step


def check_activation_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 0.95:
        raise SparseLLMError(f"activation sparsity must be in [0, 0.95), got {sparsity}")
    return float(sparsity)


def quantile_threshold(scores: torch.Tensor, sparsity: float) -> float:
    """The score below or at which a fraction `sparsity` of the entries lie.

    Channels are kept when ``score > threshold``, so the threshold is the k-th smallest
    score with k = round(sparsity · n); sparsity 0 gives 0.0, the "off" value.
    """
    flat = scores.reshape(-1).float()
    k = round(sparsity * flat.numel())
    if k <= 0:
        return 0.0
    return float(flat.kthvalue(min(k, flat.numel())).values)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors A (out, r), B (r, in) with A @ B ≈ W (truncated SVD)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    r = min(rank, s.numel())
    return u[:, :r] * s[:r], vh[:r]


def relative_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """||W x - y_sparse||² / ||W x||² over the rows of `x` (tokens).

    y_sparse = W (x ⊙ keep), plus A B (x ⊙ ¬keep) with R-Sparse's low-rank correction, so
    the error is W x_skipped - A B x_skipped. A linear-output proxy: TEAL measures the
    whole block's output instead; per linear is ~10x cheaper and keeps groups separable.
    """
    skipped = x * ~keep
    err = skipped @ weight.t()
    if low_rank is not None:
        a, b = low_rank
        err = err - (skipped @ b.t()) @ a.t()
    ref = x @ weight.t()
    return float(err.pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


def greedy_levels(
    errors: torch.Tensor, costs: torch.Tensor, levels: tuple[float, ...], target: float
) -> list[float]:
    """Per-group sparsity levels reaching a cost-weighted average of exactly `target`.

    `errors[g, l]` is group g's error at `levels[l]`; `costs[g]` its weight count. TEAL's
    greedy: starting from 0, repeatedly raise by one grid step the group whose error grows
    least per weight saved, until the weighted average reaches the target. The last step
    is taken only as far as needed, so the average is exact (its threshold then comes
    from the quantile at that fractional level).
    """
    if not levels[0] == 0.0:
        raise ValueError("levels must start at 0")
    g_count = errors.shape[0]
    step = [0] * g_count
    lv = [0.0] * g_count
    total = float(costs.sum())
    achieved = 0.0
    while achieved < target - 1e-12:
        best, best_rate = -1, float("inf")
        for g in range(g_count):
            if step[g] + 1 >= len(levels):
                continue
            d_err = float(errors[g, step[g] + 1] - errors[g, step[g]])
            saved = (levels[step[g] + 1] - levels[step[g]]) * float(costs[g])
            rate = d_err / saved
            if rate < best_rate:
                best, best_rate = g, rate
        if best < 0:
            raise SparseLLMError(f"target {target} is beyond the highest level {levels[-1]}")
        full = levels[step[best] + 1] - levels[step[best]]
        need = (target - achieved) * total / float(costs[best])
        if need < full:
            lv[best] += need
            break
        step[best] += 1
        lv[best] = levels[step[best]]
        achieved = float(sum(lv[g] * costs[g] for g in range(g_count))) / total
    return lv
