"""LongHeads (Lu, Zhou, He, et al., 2024): every head reads only the chunks it selects, at
positions inside the trained window, so a model runs past its context length untrained.

The prompt is cut into chunks of `block` tokens. A query chunk whose causal past fits in
`length` tokens attends it normally. A later one attends `length / block` chunks: the
first chunk (the attention sink), the previous and its own chunk (local context), and the
chunks whose representation best matches its queries. The selected chunks are laid out in
their original order in slots 0, 1, … and every key is re-rotated to its *slot* position
(the query chunk sits in the last slot), so no relative distance exceeds `length`: each head
stays in distribution while different heads and layers read different parts of the text.

A chunk's representation is its keys averaged by how the chunk's own mean query attends
them, ``r = Σ softmax(q̄·kᵢ/√d)·kᵢ``, and a query chunk scores it by its mean query's dot
product with r; queries and keys are compared without their rotary embedding (positions
removed), so a chunk far back is not penalised for its distance. Scores are summed over the
GQA group, so the heads of a group share one selection (one KV head is read once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sparsellm.errors import SparseLLMError
from sparsellm.methods.attention import patterns as P
from sparsellm.methods.attention.protocols import PrefillConfig, attention_method
from sparsellm.methods.attention.rope import RotaryBound, rope_angles, rotate, unrotate

QUERY_CHUNKS = 8  # selective query chunks computed per batch (bounds the gathered keys)


def chunk_keys(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Chunk representations ``(B, Hkv, n, D)`` from position-free queries ``(B, Hkv, g, L, D)``
    and keys ``(B, Hkv, L, D)`` (L a multiple of `block`)."""
    length, d = q.shape[-2:]
    n = length // block
    q_bar = q.mean(2).unflatten(2, (n, block)).mean(3)  # (B, Hkv, n, D)
    kc = k.unflatten(2, (n, block))  # (B, Hkv, n, w, D)
    w = torch.softmax(torch.einsum("bhnd,bhnwd->bhnw", q_bar, kc) / math.sqrt(d), -1)
    return torch.einsum("bhnw,bhnwd->bhnd", w, kc)


def select_chunks(q: torch.Tensor, reps: torch.Tensor, slots: int) -> torch.Tensor:
    """Sorted chunk indices ``(B, Hkv, n, slots)`` each query chunk reads: chunk 0, the
    previous and its own chunk, and the best-scoring others (``q (B, Hkv, g, n, D)``: the
    chunks' mean position-free queries). Chunks with fewer than `slots` causal chunks read
    them all (the index list then repeats its last entry)."""
    n = reps.shape[2]
    scores = torch.einsum("bhgnd,bhcd->bhnc", q, reps)
    i = torch.arange(n)[:, None]
    c = torch.arange(n)[None, :]
    forced = (c == 0) | (c == i) | (c == i - 1)
    scores = scores.masked_fill(forced, float("inf")).masked_fill(c > i, float("-inf"))
    top = scores.topk(min(slots, n), -1).indices.sort(-1).values
    return torch.minimum(top, i)  # -inf picks (too few causal chunks) fall on the own chunk


@attention_method
@dataclass(frozen=True)
class LongHeads(RotaryBound, PrefillConfig):
    """LongHeads: per-head chunk selection with positions remapped into `length`."""

    name: ClassVar[str] = "longheads"

    length: int = 4096
    block: int = 256
    min_length: int = 4096
    tail: ClassVar[int] = 0  # no dense tail: every query stays within `length`
    theta: float = 0.0  # the rotary base; 0: read from the model when the method is bound

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.length < 3 * self.block:
            raise SparseLLMError(
                "longheads: length must hold at least 3 blocks (the sink, the previous and "
                "the own chunk)"
            )

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        nb = P.n_blocks(query.shape[2], self.block)
        return P.selected_blocks(self._select(query, key)[2], nb)

    def _select(
        self, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Position-free padded queries (B, Hkv, g, L', D) and keys, and the selection."""
        theta = self.rotary_base()
        b, hq, length, d = query.shape
        hkv = key.shape[1]
        pad = P.n_blocks(length, self.block) * self.block - length
        q = F.pad(unrotate(query.float(), theta), (0, 0, 0, pad))
        k = F.pad(unrotate(key.float(), theta), (0, 0, 0, pad))
        q = q.reshape(b, hkv, hq // hkv, -1, d)
        reps = chunk_keys(q, k, self.block)
        q_bar = q.unflatten(3, (-1, self.block)).mean(4)
        return q, k, select_chunks(q_bar, reps, self.length // self.block)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, layer: int
    ) -> torch.Tensor:
        b, hq, length, d = query.shape
        hkv, w = key.shape[1], self.block
        slots = self.length // w
        window = min(length, slots * w)  # queries here see all their past at true positions
        out = torch.empty_like(query)
        out[:, :, :window] = F.scaled_dot_product_attention(
            query[:, :, :window],
            key[:, :, :window],
            value[:, :, :window],
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        n = P.n_blocks(length, w)
        if n <= slots:
            return out
        q, k, chosen = self._select(query, key)
        v = F.pad(value, (0, 0, 0, n * w - length)).unflatten(2, (n, w))
        kc = k.unflatten(2, (n, w))
        slot_angles = rope_angles(torch.arange(slots * w), self.theta, d)
        q_angles = slot_angles[-w:]
        causal = torch.ones(w, slots * w, dtype=torch.bool).tril(slots * w - w)
        g = hq // hkv
        for start in range(slots, n, QUERY_CHUNKS):
            rows = torch.arange(start, min(start + QUERY_CHUNKS, n))
            idx = chosen[:, :, rows]  # (B, Hkv, r, slots)
            gather = idx[..., None, None].expand(-1, -1, -1, -1, w, d)
            keys = kc[:, :, None].expand(-1, -1, len(rows), -1, -1, -1).gather(3, gather)
            vals = v[:, :, None].expand(-1, -1, len(rows), -1, -1, -1).gather(3, gather)
            keys = rotate(keys.flatten(3, 4), slot_angles).to(query.dtype)  # (B, Hkv, r, S·w, D)
            vals = vals.flatten(3, 4)
            qs = q[:, :, :, rows[0] * w : (rows[-1] + 1) * w].unflatten(3, (len(rows), w))
            qs = rotate(qs, q_angles).to(query.dtype)  # (B, Hkv, g, r, w, D)
            o = F.scaled_dot_product_attention(
                qs.transpose(2, 3),
                keys[:, :, :, None].expand(-1, -1, -1, g, -1, -1),
                vals[:, :, :, None].expand(-1, -1, -1, g, -1, -1),
                causal,
                scale=scale,
            )  # (B, Hkv, r, g, w, D)
            o = o.permute(0, 1, 3, 2, 4, 5).reshape(b, hkv * g, len(rows) * w, d)
            lo = rows[0] * w
            out[:, :, lo : min(length, lo + o.shape[2])] = o[:, :, : length - lo]
        return out
