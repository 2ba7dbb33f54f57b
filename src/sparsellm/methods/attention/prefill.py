"""Prefill sparsity methods: each turns one layer's (query, key) into a block mask.

Static methods (sink+window, power) ignore the inputs; dynamic ones estimate which blocks
matter from cheap proxies of the attention map, per KV head (a GQA group shares one
selection, so the compute path gathers K/V once per group):

* ``block_topk`` (MInference block-sparse): mean-pooled query blocks against mean-pooled
  key blocks, keep the top-k key blocks per query block.
* ``vertical_slash`` (MInference): attention of the last 64 queries to all keys, summed
  down columns (verticals) and along diagonals (slashes); keep the top ones.
* ``flexprefill`` (FlexPrefill): compare the pooled block estimate of the last query block
  with its true block distribution (Jensen-Shannon distance). Close ⇒ query-aware: pooled
  estimates for every query block, keep blocks up to cumulative mass γ. Far ⇒
  vertical-slash with verticals/slashes chosen up to cumulative mass γ.

Sizes are in tokens (converted to blocks, rounded up) so a spec reads like the papers.
Every sparse method also takes ``tail`` (tokens, default 0): the query blocks holding the last
``tail`` tokens (`patterns.tail_blocks`) attend the whole prompt (`patterns.dense_tail`, applied by
`PrefillConfig.prefill_mask`), so a question at the end of a long prompt reads all of it.

Each method is a `PrefillConfig` registered under its `name`; the helpers here (pooling,
last-rows attention, recall probes) are shared by the methods in their own files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.methods.attention import patterns as P
from sparsellm.methods.attention.protocols import PrefillConfig, attention_method


def group_sum(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """Sum a (B, Hq, ...) tensor over each GQA group -> (B, Hkv, ...)."""
    b, hq = x.shape[:2]
    return x.reshape(b, hkv, hq // hkv, *x.shape[2:]).sum(2)


def pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of tokens: (B, H, L, D) -> (B, H, nb, D); the tail block is partial."""
    b, h, length, d = x.shape
    nb = P.n_blocks(length, block)
    x = torch.nn.functional.pad(x, (0, 0, 0, nb * block - length))
    sizes = torch.full((nb,), float(block))
    sizes[-1] = length - (nb - 1) * block
    return x.reshape(b, h, nb, block, d).sum(3) / sizes[:, None]


def _last_rows_attention(query: torch.Tensor, key: torch.Tensor, rows: int) -> torch.Tensor:
    """Softmax attention of the last `rows` queries to all keys, summed per KV head:
    (B, Hkv, rows, L). This is the only exact attention the dynamic estimates compute."""
    length, d = query.shape[2], query.shape[3]
    groups = query.shape[1] // key.shape[1]
    q = query[:, :, -rows:]
    k = key.repeat_interleave(groups, 1)
    s = (q @ k.transpose(-1, -2)) * d**-0.5
    q_pos = torch.arange(length - rows, length)[:, None]
    s = s.masked_fill(torch.arange(length)[None, :] > q_pos, float("-inf"))
    return group_sum(torch.softmax(s, -1), key.shape[1])


def _slash_sums(attn: torch.Tensor) -> torch.Tensor:
    """Attention mass per diagonal offset (query - key) of the last-rows attention map."""
    rows, length = attn.shape[-2:]
    q_pos = torch.arange(length - rows, length)[:, None]
    key_at = q_pos - torch.arange(length)[None, :]  # key index of offset o for each row
    got = attn.gather(-1, key_at.clamp(min=0).expand(*attn.shape[:-2], rows, length))
    return got.masked_fill(key_at < 0, 0.0).sum(-2)


def pooled_block_probs(query: torch.Tensor, key: torch.Tensor, block: int) -> torch.Tensor:
    """Causal softmax over key blocks of pooled-query · pooled-key, per KV head."""
    qp = group_sum(pool(query, block), key.shape[1]) / (query.shape[1] // key.shape[1])
    kp = pool(key, block)
    s = (qp @ kp.transpose(-1, -2)) * query.shape[-1] ** -0.5
    nb = s.shape[-1]
    return torch.softmax(s.masked_fill(~P.causal_blocks(nb), float("-inf")), -1)


def _top_up_to(scores: torch.Tensor, count: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the top `count` entries per row, padded to `k` by repeating the best one."""
    idx = scores.topk(k, dim=-1).indices
    keep = torch.arange(k) < count[..., None]
    return torch.where(keep, idx, idx[..., :1])


def probe_rows(length: int) -> torch.Tensor:
    """The query rows a recall probe reads: 64 at the end and 64 at 1/4, 1/2 and 3/4 of
    the sequence, so a candidate is judged on near and far keys alike, at O(rows·L) cost."""
    starts = sorted({length - 64, length // 4, length // 2, 3 * length // 4})
    return torch.cat([torch.arange(s, min(s + 64, length)) for s in starts])


def rows_attention(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Exact causal attention of query positions `rows` to all keys, averaged per KV head:
    ``(B, Hkv, R, L)``, the reference a calibration's recall is measured against."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, 1)
    s = (query[:, :, rows] @ k.transpose(-1, -2)) * query.shape[-1] ** -0.5
    s = s.masked_fill(torch.arange(key.shape[2])[None, :] > rows[:, None], float("-inf"))
    return group_sum(torch.softmax(s, -1), key.shape[1]) / groups


@attention_method
@dataclass(frozen=True)
class Full(PrefillConfig):
    """Keep every causal block: the block path computing dense attention (tests, overhead)."""

    name: ClassVar[str] = "full"

    block: int = 64
    min_length: int = 0
    tail: int = 0  # accepted like every prefill method's; all blocks are kept anyway

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        return P.causal_blocks(P.n_blocks(query.shape[2], self.block))


@attention_method
@dataclass(frozen=True)
class SinkWindow(PrefillConfig):
    """StreamingLLM / LM-Infinite Λ-shape / MInference A-shape: first `sink` tokens plus the
    last `window`. LM-Infinite's distance limit (clamping RoPE distances beyond the
    pre-training length) is a no-op here: inputs never exceed the model's window."""

    name: ClassVar[str] = "sink_window"

    sink: int = 64
    window: int = 1024
    block: int = 64
    min_length: int = 2048
    tail: int = 0

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        nb = P.n_blocks(query.shape[2], self.block)
        return P.sink_window_tokens(nb, self.sink, self.window, self.block)


@attention_method
@dataclass(frozen=True)
class Power(PrefillConfig):
    """PowerAttention: sinks, a local window and key blocks at power-of-two block distances."""

    name: ClassVar[str] = "power"

    sink: int = 64
    window: int = 256
    block: int = 64
    min_length: int = 2048
    tail: int = 0

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        nb = P.n_blocks(query.shape[2], self.block)
        return P.power_dilated(
            nb, math.ceil(self.sink / self.block), math.ceil(self.window / self.block)
        )


@attention_method
@dataclass(frozen=True)
class BlockTopK(PrefillConfig):
    """MInference block-sparse: top `blocks` key blocks per query block by pooled scores,
    plus the sink block and the local window."""

    name: ClassVar[str] = "block_topk"

    blocks: int = 16
    sink: int = 64
    window: int = 128
    block: int = 64
    min_length: int = 2048
    tail: int = 0

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        probs = pooled_block_probs(query, key, self.block)
        nb = probs.shape[-1]
        always = P.sink_window_tokens(nb, self.sink, self.window, self.block)
        return P.topk_blocks(probs, self.blocks, always)


@attention_method
@dataclass(frozen=True)
class VerticalSlash(PrefillConfig):
    """MInference vertical-slash from the last `last_q` queries: `vertical` key columns and
    `slash` diagonals per KV head (sinks and the local diagonals are always kept)."""

    name: ClassVar[str] = "vertical_slash"

    vertical: int = 1024
    slash: int = 1024
    last_q: int = 64
    sink: int = 64
    local: int = 64
    block: int = 64
    min_length: int = 2048
    tail: int = 0

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        length = query.shape[2]
        attn = _last_rows_attention(query, key, min(self.last_q, length))
        vert = attn.sum(-2)
        vert[..., : self.sink] = float("inf")
        sl = _slash_sums(attn)
        sl[..., : self.local] = float("inf")
        v_idx = vert.topk(min(self.vertical, length), -1).indices
        s_idx = sl.topk(min(self.slash, length), -1).indices
        return P.vertical_slash_blocks(length, self.block, v_idx, s_idx)


@attention_method
@dataclass(frozen=True)
class FlexPrefill(PrefillConfig):
    """FlexPrefill: per KV head, query-aware block selection when the pooled estimate is
    trustworthy (JS distance < `tau`), else vertical-slash; both keep blocks/lines up to
    cumulative attention mass `gamma`."""

    name: ClassVar[str] = "flexprefill"

    gamma: float = 0.9
    tau: float = 0.1
    min_blocks: int = 2
    block: int = 64
    min_length: int = 2048
    tail: int = 0

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        length = query.shape[2]
        bs = self.block
        nb = P.n_blocks(length, bs)
        rows = min(bs, length - (nb - 1) * bs)  # the last query block
        attn = _last_rows_attention(query, key, rows)  # (B, Hkv, rows, L)
        padded = torch.nn.functional.pad(attn, (0, nb * bs - length))
        true_blocks = padded.reshape(*attn.shape[:-1], nb, bs).sum(-1).mean(-2)  # (B,Hkv,nb)
        true_blocks = true_blocks / true_blocks.sum(-1, keepdim=True)
        probs = pooled_block_probs(query, key, bs)  # (B, Hkv, nb, nb)
        est = probs[..., -1, :]
        mid = (est + true_blocks) / 2
        kl = lambda p: (p * (p.clamp_min(1e-12) / mid.clamp_min(1e-12)).log()).sum(-1)  # noqa: E731
        js = ((kl(est) + kl(true_blocks)) / 2).clamp_min(0).sqrt()  # (B, Hkv)
        aware = P.cumulative_blocks(probs, self.gamma, self.min_blocks)
        vert = attn.sum(-2)
        sl = _slash_sums(attn)
        picks = []
        for scores in (vert, sl):
            p = scores / scores.sum(-1, keepdim=True)
            srt = p.sort(-1, descending=True).values
            count = ((srt.cumsum(-1) - srt) < self.gamma).sum(-1).clamp(min=1)
            picks.append(_top_up_to(p, count, int(count.max())))
        vs = P.vertical_slash_blocks(length, bs, picks[0], picks[1])
        return torch.where((js < self.tau)[..., None, None], aware, vs)
