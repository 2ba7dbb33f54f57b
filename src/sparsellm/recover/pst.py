"""PST (Li, Luo, et al., 2022): parameter-efficient sparsity training.

Pruning while fine-tuning usually learns one importance score per weight (movement
pruning), as many trainable values as the model. PST writes the score as a data-free
part plus a cheap data-driven part,

    S = |W| / mean|W| + A_s·B_s + r·1ᵀ + 1·cᵀ,

a rank-`rank` matrix plus a row and a column vector, learned through a straight-through
mask: M = top(S) in the forward, while the backward hands S the mask's gradient
∂L/∂W' ⊙ (W + ΔW). The weights themselves move by a LoRA ΔW = s·B·A, and the layer is
W' = (W + ΔW) ⊙ M. The mask keeps the start's pattern: exactly `n` of every `m`
consecutive inputs where the start is N:M (so a 2:4 model stays 2:4 while positions
trade places), otherwise the start's count per output row. Merging writes W' itself.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsellm.recover.lora import MaskedLoRALinear, add_lora


def nm_pattern(keep: torch.Tensor, candidates: tuple[int, ...] = (4, 8)) -> tuple[int, int] | None:
    """(n, m) when no group of `m` consecutive inputs of `keep` holds more than `n` < m
    kept weights and nearly every group holds n (the smallest such m of `candidates`),
    else None. "Nearly": a weight the pruner kept may itself be exactly zero, leaving a
    2:4 group with one non-zero; PST then refills it to two."""
    out_f, in_f = keep.shape
    for m in candidates:
        if in_f % m:
            continue
        counts = keep.view(out_f, in_f // m, m).sum(-1)
        n = int(counts.max())
        if 0 < n < m and float(counts.float().mean()) >= n - 0.25:  # nearly all groups full
            return n, m
    return None


def top_mask(
    score: torch.Tensor, per_row: torch.Tensor, nm: tuple[int, int] | None
) -> torch.Tensor:
    """The hard mask: the `n` best of every `m` inputs (N:M), or each row's `per_row`
    best (unstructured, the start's count kept)."""
    out_f, in_f = score.shape
    if nm is not None:
        n, m = nm
        groups = score.view(out_f, in_f // m, m)
        idx = groups.topk(n, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter(-1, idx, True).view_as(score)
    order = score.argsort(-1, descending=True)
    top = torch.arange(in_f, device=score.device)[None, :] < per_row[:, None]
    return torch.zeros_like(score, dtype=torch.bool).scatter(-1, order, top)


class PSTLinear(MaskedLoRALinear):
    """LoRA on the weights plus a learned low-rank + row + column importance score whose
    top entries (in the start's pattern) form the mask; everything else is frozen."""

    def __init__(self, base_layer: nn.Linear, rank: int = 16, alpha: float = 16.0) -> None:
        super().__init__(base_layer, rank, alpha)
        out_f, in_f = base_layer.weight.shape
        w = base_layer.weight.detach().float()
        kept = w[self.keep].abs()
        magnitude = w.abs() / (kept.mean() if kept.numel() else 1.0)
        self.register_buffer("magnitude", magnitude, persistent=False)
        self.register_buffer("per_row", self.keep.sum(-1), persistent=False)
        self.nm = nm_pattern(self.keep)
        self.score_a = nn.Parameter(torch.zeros(out_f, rank))
        self.score_b = nn.Parameter(torch.randn(rank, in_f) / in_f**0.5)  # A_s·B_s starts 0
        self.score_row = nn.Parameter(torch.zeros(out_f, 1))
        self.score_col = nn.Parameter(torch.zeros(1, in_f))

    def score(self) -> torch.Tensor:
        """S: the data-free magnitude plus the learned data-driven part."""
        learned = self.score_a @ self.score_b + self.score_row + self.score_col
        return self.magnitude + learned

    def mask(self) -> torch.Tensor:
        """The current hard mask (what merging applies)."""
        with torch.no_grad():
            return top_mask(self.score(), self.per_row, self.nm)

    def delta(self) -> torch.Tensor:
        w = self.base_layer.weight
        updated = w + (self.lora_b @ self.lora_a).to(w.dtype) * self.scale
        s = self.score()
        hard = top_mask(s.detach(), self.per_row, self.nm).to(s.dtype)
        ste = hard + s - s.detach()  # forward: the hard mask; backward: dL/dM reaches S
        return updated * ste.to(updated.dtype) - w


def add_pst(model: nn.Module, rank: int = 16, alpha: float = 16.0) -> list[PSTLinear]:
    """Wrap every block linear in a PST adapter; merge with `merge_lora` (it writes
    (W + ΔW) ⊙ M, the start's pattern kept)."""
    return add_lora(model, adapter=lambda lin: PSTLinear(lin, rank, alpha))  # type: ignore[return-value]
