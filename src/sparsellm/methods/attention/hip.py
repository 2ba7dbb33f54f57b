"""HiP (Lee, Park, et al., 2024): hierarchically pruned attention, training-free.

Which key blocks a query block attends is found by a tree search instead of scoring every
block: the causal keys are cut into `blocks` equal ranges; each round splits every range
in two, scores each half by its representative key (the token at the half's centre)
against the query block (the largest q·k over the block's queries and the GQA group's
heads), and keeps the `blocks` best halves, until every range is one key block. That
costs O(L · blocks · log(L / blocks)) dot products where pooled top-k (``block_topk``)
scores all (L / block)² block pairs, and it judges a block by a real key rather than a
mean, which can miss a single sharp match. The selected blocks (plus the sink and the
local window, as for ``block_topk``) run on the shared block-sparse kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.methods.attention import patterns as P
from sparsellm.methods.attention.protocols import PrefillConfig, attention_method


def _initial_ranges(nb: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nb, k) bounds [lo, hi) in key blocks: query block i's causal blocks 0..i cut into
    k near-equal ranges (blocks beyond i + 1 ranges come out empty, lo == hi)."""
    avail = torch.arange(1, nb + 1)[:, None]
    cuts = torch.arange(k + 1)[None, :]
    # n >= k blocks: k non-empty ranges; n < k: one range per block, then empty ones
    edges = torch.where(
        avail >= k, torch.div(avail * cuts, k, rounding_mode="floor"), cuts.clamp(max=avail)
    )
    return edges[:, :-1], edges[:, 1:]


def hierarchical_select(query: torch.Tensor, key: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """HiP's tree search: for every query block, `k` causal key-block indices
    ``(B, Hkv, nb, k)`` (an index may repeat where fewer than k blocks exist)."""
    b, hq, length, d = query.shape
    hkv = key.shape[1]
    nb = P.n_blocks(length, block)
    q = torch.nn.functional.pad(query, (0, 0, 0, nb * block - length))
    q = q.reshape(b, hkv, hq // hkv, nb, block, d)  # the group's heads, per query block
    real = (torch.arange(nb * block) < length).view(nb, block, 1)  # not padding
    lo, hi = (t.expand(b, hkv, nb, k) for t in _initial_ranges(nb, k))
    while bool((hi - lo > 1).any()):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        split = hi - lo > 1
        c_lo = torch.cat([lo, torch.where(split, mid, hi)], -1)  # (…, 2k) children
        c_hi = torch.cat([torch.where(split, mid, hi), hi], -1)
        rep = torch.div((c_lo + c_hi) * block, 2, rounding_mode="floor").clamp(max=length - 1)
        k_rep = key.gather(2, rep.reshape(b, hkv, -1, 1).expand(-1, -1, -1, d))
        k_rep = k_rep.reshape(b, hkv, nb, 2 * k, d)
        s = torch.einsum("bhgnqd,bhncd->bhgnqc", q, k_rep)
        s = s.masked_fill(~real, float("-inf")).amax(dim=(2, 4))
        s = s.masked_fill(c_hi <= c_lo, float("-inf"))  # empty children never win
        best = s.topk(k, dim=-1).indices
        lo, hi = c_lo.gather(-1, best), c_hi.gather(-1, best)
    return lo.clamp(max=torch.arange(nb)[:, None])  # (empty picks fall on a kept block)


@attention_method
@dataclass(frozen=True)
class HiP(PrefillConfig):
    """HiP: `blocks` key blocks per query block found by hierarchical pruning, plus the
    sink block and the local window (the same budget as ``block_topk:blocks=N``)."""

    name: ClassVar[str] = "hip"

    blocks: int = 16
    sink: int = 64
    window: int = 128
    block: int = 64
    min_length: int = 2048
    tail: int = 0

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        nb = P.n_blocks(query.shape[2], self.block)
        idx = hierarchical_select(query, key, self.block, min(self.blocks, nb))
        always = P.sink_window_tokens(nb, self.sink, self.window, self.block)
        return P.selected_blocks(idx, nb, always)
