"""AnchorAttention-style prefill sparsity: keep the key stripes that come close to an anchor.

The largest attention logits of a query are almost always on the sink tokens or in its
local window, so their maximum — the *anchor* — is a cheap, reliable reference: any
other key whose logit is within `theta` of the anchor (its weight is at least
``exp(-theta)`` of the anchor's) matters, everything further below does not. Per query
block we use the block's mean query (per query head), compute its logits against every
causal key, take the anchor over the sink and local keys, and keep each key *stripe*
(column) within `theta`. Our compute path works on blocks, so a key block is kept when
it holds any kept stripe (and a GQA group shares the union of its heads' blocks); the
sink and local blocks are always kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.methods.attention import patterns as P
from sparsellm.methods.attention.prefill import pool
from sparsellm.methods.attention.protocols import PrefillConfig, attention_method


def anchor_stripes(
    scores: torch.Tensor, block: int, sink: int, local: int, theta: float
) -> torch.Tensor:
    """Token stripes ``(..., nb, L)`` kept per query block from pooled-query logits
    ``scores`` ``(..., nb, L)``: causal keys (up to the block's end) whose logit is at least
    ``anchor - theta``, the anchor being the max over the first `sink` keys and the
    `local` keys before the block's end."""
    nb, length = scores.shape[-2:]
    end = torch.clamp((torch.arange(nb) + 1) * block, max=length)[:, None]  # exclusive
    k = torch.arange(length)[None, :]
    causal = k < end
    ref = (k < sink) | ((k >= end - local) & causal)
    anchor = scores.masked_fill(~ref, float("-inf")).amax(-1, keepdim=True)
    return causal & (scores >= anchor - theta)


@attention_method
@dataclass(frozen=True)
class Anchor(PrefillConfig):
    """Stripes within `theta` (logit units) of the sink/local anchor, per KV group."""

    name: ClassVar[str] = "anchor"

    theta: float = 8.0
    sink: int = 64
    local: int = 128
    block: int = 64
    min_length: int = 2048
    tail: int = 0

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        b, hq, length, d = query.shape
        hkv, bs = key.shape[1], self.block
        nb = P.n_blocks(length, bs)
        qp = pool(query, bs)  # (B, Hq, nb, D)
        k = key.repeat_interleave(hq // hkv, 1)
        scores = torch.matmul(qp, k.transpose(-1, -2)) * d**-0.5  # (B, Hq, nb, L)
        keep = anchor_stripes(scores, bs, self.sink, self.local, self.theta)
        keep = torch.nn.functional.pad(keep, (0, nb * bs - length))
        blocks = keep.reshape(b, hkv, hq // hkv, nb, nb, bs).any(-1).any(2)
        always = P.sink_window(nb, math.ceil(self.sink / bs), math.ceil(self.local / bs) + 1)
        return (blocks & P.causal_blocks(nb)) | always
