"""The Journey Matters (Jin et al., 2025): sparse pre-training follows the dense
scaling law in the *average* parameter count over training.

A sparse run starts dense and is pruned gradually by weight magnitude on the cubic
schedule of Zhu & Gupta (2017): sparsity s(t) = s_f · (1 − (1 − (t − t₀)/(t₁ − t₀))³)
between t₀ and t₁ (by default 25% and 75% of training), 0 before, s_f after, pruning
every `every` steps, each layer to the same sparsity. Its average parameter count
N̄ = (1/T) Σ_t N(t) then predicts its final loss through the dense law L(N): a run
pruned to 50% of a large model lands where a dense model of N̄ parameters does, not
where one of its final size would.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsellm.errors import SparseLLMError
from sparsellm.pretrain.train import Masks, linear_weights


def cubic_sparsity(
    step: int, total: int, final: float, begin: float = 0.25, end: float = 0.75
) -> float:
    """Zhu & Gupta's cubic schedule at `step` of `total` (begin/end as fractions of it)."""
    if not 0.0 <= begin < end <= 1.0:
        raise SparseLLMError(f"need 0 <= begin < end <= 1, not {begin}, {end}")
    t0, t1 = begin * total, end * total
    if step < t0:
        return 0.0
    if step >= t1:
        return final
    return final * (1.0 - (1.0 - (step - t0) / (t1 - t0)) ** 3)


class GradualMagnitude(Masks):
    """Masks that shrink on the cubic schedule: at a pruning step each block linear keeps
    its round((1 − s)·n) largest-magnitude weights (pruned ones stay pruned)."""

    def __init__(
        self,
        model: nn.Module,
        final: float,
        total: int,
        begin: float = 0.25,
        end: float = 0.75,
        every: int = 10,
    ) -> None:
        if not 0.0 <= final < 1.0 or every < 1:
            raise SparseLLMError(f"final sparsity in [0, 1) and every >= 1, not {final}, {every}")
        cubic_sparsity(0, total, final, begin, end)  # checks begin/end
        super().__init__(
            {n: (w, torch.ones_like(w, dtype=torch.bool)) for n, w in linear_weights(model).items()}
        )
        self.final, self.total, self.begin, self.end, self.every = final, total, begin, end, every

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.every and step != self.total - 1:
            return
        s = cubic_sparsity(step, self.total, self.final, self.begin, self.end)
        for name, (w, keep) in self.masks.items():
            k = round((1 - s) * w.numel())
            if k >= int(keep.sum()):
                continue
            score = (w.abs() * keep).flatten()  # pruned weights score 0: never re-chosen
            new = torch.zeros(w.numel(), dtype=torch.bool)
            new[score.topk(k).indices] = True
            self.masks[name] = (w, new.view_as(w))


def average_params(kept_per_step: list[int]) -> float:
    """N̄: the mean over training steps of the (masked) weights' non-zero count."""
    if not kept_per_step:
        raise SparseLLMError("no steps to average")
    return sum(kept_per_step) / len(kept_per_step)
