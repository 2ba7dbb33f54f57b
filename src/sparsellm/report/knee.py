"""The "essential sparsity" knee: where quality starts dropping fast as sparsity grows.

Jaiswal et al. (2023, "The Emergence of Essential Sparsity") observe that quality stays
flat up to some sparsity and then falls off a cliff; they mark that turning point by
eye. We locate it with Kneedle (Satopää et al., 2011) on the damage curve
``log(ppl_sparse / ppl_dense)`` against sparsity, with the dense model as the origin:
both axes are scaled to [0, 1], and the knee is the point furthest *below* the chord
from first to last point (largest ``x_norm - y_norm``) — for a convex rising curve,
the last point before the steep part. No knee is reported for fewer than three points
or when the curve never sags below its chord (linear or concave damage).
"""

from __future__ import annotations

import math


def kneedle(xs: list[float], ys: list[float]) -> int | None:
    """Index of the knee of a rising convex curve (points sorted by x), or None."""
    if len(xs) < 3 or len(xs) != len(ys):
        return None
    x0, x1, y0, y1 = xs[0], xs[-1], min(ys), max(ys)
    if x1 <= x0 or y1 <= y0:
        return None
    diff = [(x - x0) / (x1 - x0) - (y - y0) / (y1 - y0) for x, y in zip(xs, ys, strict=True)]
    best = max(range(1, len(xs) - 1), key=diff.__getitem__)
    return best if diff[best] > 1e-9 else None


def essential_sparsity(
    sparsities: list[float], ppls: list[float], dense_ppl: float
) -> float | None:
    """Sparsity at the knee of log(ppl / dense) vs sparsity (the dense model at 0)."""
    points = sorted(zip(sparsities, ppls, strict=True))
    xs = [0.0] + [s for s, _ in points]
    ys = [0.0] + [math.log(p / dense_ppl) for _, p in points]
    i = kneedle(xs, ys)
    return None if i is None else xs[i]
