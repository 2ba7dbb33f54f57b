"""KV-cache compression methods: each is a `KVConfig` whose hooks prune a `CompressedCache`.

Prefill is exact (SDPA over every token); right after it each layer compresses its cache,
and decode steps attend only to what was kept:

* ``streaming_kv`` (StreamingLLM): keep the first `sink` and last `window` tokens, at
  every step, so memory stays constant.
* ``snapkv`` (SnapKV): the last `window` prompt queries vote (attention summed over the
  window and the GQA group, max-pooled over `kernel` neighbours) for prefix tokens; keep
  the top ``budget - window - sink`` voted, the sinks and the window itself.
* ``h2o`` (H2O): heavy hitters by attention accumulated over every query so far (prefill
  in chunks, then each decode step) plus the `recent` tokens; the budget holds at decode.
* ``think`` (ThinK): prune key *channels* per KV head by the query-driven score
  ``‖q_c‖·‖k_c‖`` over the observation window; keys are stored with only the kept
  channels (memory really shrinks) and decode queries use the same channels. With
  ``budget > 0`` it runs on top of SnapKV's token selection, as in the paper.
* ``quest`` (Quest / LServe): nothing is evicted; per page of `page` tokens the layer
  keeps element-wise min/max keys, and each decode step attends only the pages with the
  highest upper bound ``Σ_c max(q_c·min_c, q_c·max_c)`` (summed over the GQA group, so a
  group shares one selection) plus the newest, partial page — `budget` tokens in all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sparsellm.methods.attention.cache import (
    CompressedCache,
    CompressedLayer,
    keep_tokens,
    softmax_scores,
)
from sparsellm.methods.attention.protocols import KVConfig, attention_method

QUERY_CHUNK = 512  # H2O prefill statistics are accumulated this many queries at a time


@attention_method
@dataclass(frozen=True)
class StreamingKV(KVConfig):
    """Sink tokens plus a recent window."""

    name: ClassVar[str] = "streaming_kv"

    sink: int = 64
    window: int = 1024

    def after_prefill(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor, scale: float
    ) -> None:
        self._evict(cache.layers[layer_idx])

    def after_step(self, cache: CompressedCache, layer_idx: int, probs: torch.Tensor) -> None:
        self._evict(cache.layers[layer_idx])

    def _evict(self, layer: CompressedLayer) -> None:
        length = layer.keys.shape[2]
        if length > self.sink + self.window:
            layer.keep(keep_tokens(layer.keys[..., 0], length, 0, self.sink, self.window))


def snap_select(layer: CompressedLayer, q: torch.Tensor, scale: float, m: SnapKV | ThinK) -> None:
    """SnapKV's selection: keep ``m.budget`` tokens voted by the last ``m.window`` of `q`."""
    length = layer.keys.shape[2]
    if length <= m.budget:
        return
    w = min(m.window, length)
    votes = softmax_scores(q[:, :, -w:], layer.keys, scale, length - w).sum(2)
    votes = F.max_pool1d(votes.flatten(0, 1)[:, None], m.kernel, 1, m.kernel // 2)
    votes = votes.reshape(*layer.keys.shape[:2], -1)
    layer.keep(keep_tokens(votes, length, m.budget - w - m.sink, m.sink, w))


@attention_method
@dataclass(frozen=True)
class SnapKV(KVConfig):
    """Observation-window voting after prefill."""

    name: ClassVar[str] = "snapkv"

    budget: int = 2048
    window: int = 32
    kernel: int = 7
    sink: int = 4

    def after_prefill(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor, scale: float
    ) -> None:
        snap_select(cache.layers[layer_idx], query, scale, self)


@attention_method
@dataclass(frozen=True)
class H2O(KVConfig):
    """Heavy hitters (accumulated attention) plus recent tokens."""

    name: ClassVar[str] = "h2o"

    budget: int = 2048
    recent: int = 512
    sink: int = 4

    def after_prefill(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor, scale: float
    ) -> None:
        layer = cache.layers[layer_idx]
        length = layer.keys.shape[2]
        heavy = torch.zeros(layer.keys.shape[:3])
        for start in range(0, query.shape[2], QUERY_CHUNK):
            rows = query[:, :, start : start + QUERY_CHUNK]
            causal_from = start + length - query.shape[2]
            heavy += softmax_scores(rows, layer.keys, scale, causal_from).sum(2)
        layer.heavy = heavy
        self._evict(layer)

    def after_step(self, cache: CompressedCache, layer_idx: int, probs: torch.Tensor) -> None:
        layer = cache.layers[layer_idx]
        layer.heavy = torch.cat([layer.heavy, torch.zeros_like(layer.heavy[..., :1])], -1)
        layer.heavy += probs
        self._evict(layer)

    def _evict(self, layer: CompressedLayer) -> None:
        length = layer.keys.shape[2]
        if length > self.budget:
            n_top = self.budget - self.recent - self.sink
            layer.keep(keep_tokens(layer.heavy, length, n_top, self.sink, self.recent))


@attention_method
@dataclass(frozen=True)
class ThinK(KVConfig):
    """Query-driven key-channel pruning (optionally on top of SnapKV token selection)."""

    name: ClassVar[str] = "think"

    keep: float = 0.5
    window: int = 32
    budget: int = 0
    kernel: int = 7
    sink: int = 4

    def after_prefill(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor, scale: float
    ) -> None:
        layer = cache.layers[layer_idx]
        if self.budget:
            snap_select(layer, query, scale, self)
        b, hq, _, d = query.shape
        hkv = layer.keys.shape[1]
        w = min(self.window, query.shape[2])
        qn = query[:, :, -w:].reshape(b, hkv, hq // hkv * w, d).norm(dim=2)  # (B, Hkv, D)
        kn = layer.keys.norm(dim=2)
        layer.prune_channels((qn * kn).topk(max(1, math.ceil(self.keep * d)), -1).indices)


@attention_method
@dataclass(frozen=True)
class Quest(KVConfig):
    """Decode-time page selection by query-key upper bounds (no eviction)."""

    name: ClassVar[str] = "quest"

    budget: int = 2048
    page: int = 16

    def select(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor
    ) -> torch.Tensor | None:
        return quest_tokens(cache.layers[layer_idx], query, self)


def quest_tokens(layer: CompressedLayer, q: torch.Tensor, m: Quest) -> torch.Tensor | None:
    """Token indices (B, Hkv, n) of the selected pages for one decode query, or None when
    everything fits the budget. Bounds of completed pages are computed once and kept."""
    keys = layer.keys
    length = keys.shape[2]
    if length <= m.budget:
        return None
    full = length // m.page
    done = 0 if layer.page_min is None else layer.page_min.shape[2]
    if done < full:
        new = keys[:, :, done * m.page : full * m.page].unflatten(2, (full - done, m.page))
        mins, maxs = new.amin(3), new.amax(3)
        if layer.page_min is not None:
            mins = torch.cat([layer.page_min, mins], 2)
            maxs = torch.cat([layer.page_max, maxs], 2)
        layer.page_min, layer.page_max = mins, maxs
    b, hkv = keys.shape[:2]
    qg = q.reshape(b, hkv, -1, 1, q.shape[-1])  # (B, Hkv, g, 1, D)
    bound = torch.maximum(qg * layer.page_min[:, :, None], qg * layer.page_max[:, :, None])
    bound = bound.sum(-1).sum(2)  # (B, Hkv, P)
    n_pages = max(1, min(full, (m.budget - (length - full * m.page)) // m.page))
    pages = bound.topk(n_pages, -1).indices.sort(-1).values
    tok = (pages[..., None] * m.page + torch.arange(m.page)).flatten(2)
    tail = torch.arange(full * m.page, length).expand(b, hkv, -1)
    return torch.cat([tok, tail], -1)
