"""KV-cache compression as a `transformers` Cache subclass plus an attention function.

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

The layer keeps positions right: ``get_seq_length`` is the number of tokens *seen* (RoPE
positions of new tokens), while masks are sized by what is actually stored.

Models with sliding-window layers (Gemma-3: 5 of every 6 layers see only the last 512
tokens) keep transformers' own window-bounded layer there, exactly as the model's default
cache does; only the full-attention layers, whose cache grows with the context, compress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from sparsellm.models.adapters import sliding_layers

QUERY_CHUNK = 512  # H2O prefill statistics are accumulated this many queries at a time


@dataclass(frozen=True)
class StreamingKV:
    """Sink tokens plus a recent window."""

    sink: int = 64
    window: int = 1024


@dataclass(frozen=True)
class SnapKV:
    """Observation-window voting after prefill."""

    budget: int = 2048
    window: int = 32
    kernel: int = 7
    sink: int = 4


@dataclass(frozen=True)
class H2O:
    """Heavy hitters (accumulated attention) plus recent tokens."""

    budget: int = 2048
    recent: int = 512
    sink: int = 4


@dataclass(frozen=True)
class ThinK:
    """Query-driven key-channel pruning (optionally on top of SnapKV token selection)."""

    keep: float = 0.5
    window: int = 32
    budget: int = 0
    kernel: int = 7
    sink: int = 4


@dataclass(frozen=True)
class Quest:
    """Decode-time page selection by query-key upper bounds (no eviction)."""

    budget: int = 2048
    page: int = 16

    def decode_tokens(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor
    ) -> torch.Tensor | None:
        return _quest_tokens(cache.layers[layer_idx], query, self)


def _softmax_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal_from: int
) -> torch.Tensor:
    """Attention probabilities (B, Hkv, rows, T) of queries at positions ``causal_from …``,
    summed over each GQA group (queries ``(B, Hq, rows, D)``, keys ``(B, Hkv, T, D)``)."""
    b, hq, rows, _ = q.shape
    hkv = k.shape[1]
    s = torch.matmul(q.reshape(b, hkv, hq // hkv * rows, -1), k.transpose(-1, -2)) * scale
    s = s.reshape(b, hkv, hq // hkv, rows, -1)
    q_pos = torch.arange(causal_from, causal_from + rows)[:, None]
    s = s.masked_fill(torch.arange(k.shape[2])[None, :] > q_pos, float("-inf"))
    return torch.softmax(s, -1).sum(2)


def _keep_tokens(
    scores: torch.Tensor, length: int, n_top: int, sink: int, tail: int
) -> torch.Tensor:
    """Sorted indices (B, Hkv, n) to keep: `sink` first, `tail` last, `n_top` best between."""
    mid = scores[..., sink : length - tail]
    n_top = max(0, min(n_top, mid.shape[-1]))
    top = mid.topk(n_top, -1).indices + sink
    fixed = torch.cat([torch.arange(sink), torch.arange(length - tail, length)])
    idx = torch.cat([fixed.expand(*scores.shape[:-1], -1), top], -1)
    return idx.sort(-1).values


class CompressedLayer(DynamicLayer):
    """A DynamicLayer whose stored tokens (and key channels) can be pruned in place."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.heavy: torch.Tensor | None = None  # H2O accumulated attention (B, Hkv, T)
        self.channels: torch.Tensor | None = None  # ThinK kept key channels (B, Hkv, c)
        self.page_min: torch.Tensor | None = None  # Quest per-page key bounds (B, Hkv, P, D)
        self.page_max: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels is not None:
            key_states = key_states.gather(-1, self._chan_index(key_states.shape[2]))
        self.seen += key_states.shape[2]
        return super().update(key_states, value_states)

    def _chan_index(self, tokens: int) -> torch.Tensor:
        b, h, c = self.channels.shape
        return self.channels[:, :, None, :].expand(b, h, tokens, c)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[2]
        return stored + query_length, 0

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only tokens `idx` (B, Hkv, n) per head (sorted, so order is preserved)."""
        self.keys = self.keys.gather(2, idx[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(
            2, idx[..., None].expand(-1, -1, -1, self.values.shape[-1])
        )
        if self.heavy is not None:
            self.heavy = self.heavy.gather(2, idx)

    def prune_channels(self, channels: torch.Tensor) -> None:
        """Keep key channels `channels` (B, Hkv, c); later keys are pruned on arrival."""
        self.channels = channels.sort(-1).values
        self.keys = self.keys.gather(-1, self._chan_index(self.keys.shape[2]))


class CompressedCache(Cache):
    """Cache of `CompressedLayer`s; `method` says how each layer is compressed.

    Methods in their own files hook in through optional methods: ``decode_tokens(cache,
    layer_idx, query)`` (token indices ``(B, Hkv, n)`` to attend, or None for all),
    ``observe(cache, layer_idx, probs)`` (each decode step's attention weights
    ``(B, Hkv, T)``) and ``after_prefill(cache, layer_idx)`` (compress right after the
    exact prefill); `shared` holds their state (TidalDecode's selection, SpecKV's scores)."""

    def __init__(self, method: Any, config: Any = None) -> None:
        kinds = sliding_layers(config)
        if any(kinds):
            window = config.sliding_window
            layers = [
                DynamicSlidingWindowLayer(sliding_window=window) if k else CompressedLayer()
                for k in kinds
            ]
            super().__init__(layers=layers)
        else:
            super().__init__(layer_class_to_replicate=CompressedLayer)
        self.method = method
        self.sliding = kinds  # per layer: keeps transformers' window (empty: none does)
        self.shared: dict[Any, torch.Tensor] = {}


def _snap_select(layer: CompressedLayer, q: torch.Tensor, scale: float, m: Any) -> None:
    length = layer.keys.shape[2]
    if length <= m.budget:
        return
    w = min(m.window, length)
    votes = _softmax_scores(q[:, :, -w:], layer.keys, scale, length - w).sum(2)
    votes = F.max_pool1d(votes.flatten(0, 1)[:, None], m.kernel, 1, m.kernel // 2)
    votes = votes.reshape(*layer.keys.shape[:2], -1)
    layer.keep(_keep_tokens(votes, length, m.budget - w - m.sink, m.sink, w))


def _h2o_prefill(layer: CompressedLayer, q: torch.Tensor, scale: float) -> None:
    length = layer.keys.shape[2]
    heavy = torch.zeros(layer.keys.shape[:3])
    for start in range(0, q.shape[2], QUERY_CHUNK):
        rows = q[:, :, start : start + QUERY_CHUNK]
        heavy += _softmax_scores(rows, layer.keys, scale, start + length - q.shape[2]).sum(2)
    layer.heavy = heavy


def _h2o_evict(layer: CompressedLayer, m: H2O) -> None:
    length = layer.keys.shape[2]
    if length > m.budget:
        layer.keep(
            _keep_tokens(layer.heavy, length, m.budget - m.recent - m.sink, m.sink, m.recent)
        )


def _think_channels(layer: CompressedLayer, q: torch.Tensor, m: ThinK) -> None:
    b, hq, _, d = q.shape
    hkv = layer.keys.shape[1]
    w = min(m.window, q.shape[2])
    qn = q[:, :, -w:].reshape(b, hkv, hq // hkv * w, d).norm(dim=2)  # (B, Hkv, D)
    kn = layer.keys.norm(dim=2)
    layer.prune_channels((qn * kn).topk(max(1, math.ceil(m.keep * d)), -1).indices)


def after_attention(
    layer: CompressedLayer, method: Any, q: torch.Tensor, scale: float, probs: torch.Tensor | None
) -> None:
    """Compress `layer` after one attention call (`q` are this call's queries; `probs` the
    decode step's attention weights summed per KV head, when the method needs them)."""
    prefill = q.shape[2] > 1
    if isinstance(method, StreamingKV):
        length = layer.keys.shape[2]
        if length > method.sink + method.window:
            idx = _keep_tokens(layer.keys[..., 0], length, 0, method.sink, method.window)
            layer.keep(idx)
    elif isinstance(method, SnapKV) and prefill:
        _snap_select(layer, q, scale, method)
    elif isinstance(method, H2O):
        if prefill:
            _h2o_prefill(layer, q, scale)
        else:
            layer.heavy = torch.cat([layer.heavy, torch.zeros_like(layer.heavy[..., :1])], -1)
            layer.heavy += probs[..., 0, :]
        _h2o_evict(layer, method)
    elif isinstance(method, ThinK) and prefill:
        if method.budget:
            _snap_select(layer, q, scale, method)
        _think_channels(layer, q, method)


def _quest_tokens(layer: CompressedLayer, q: torch.Tensor, m: Quest) -> torch.Tensor | None:
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


def kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: CompressedCache,
    scale: float,
    prefill_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the (compressed) cache for this layer, then compress it further.

    Prefill is exact causal SDPA, unless a sparse prefill already computed `prefill_out`.
    Decode with pruned key channels selects the same query channels (scale unchanged:
    ThinK approximates the full dot product); H2O decode needs the weights, so it computes
    them explicitly (one query row: cheap)."""
    layer = cache.layers[module.layer_idx]
    method = cache.method
    b, hq, q_len, _ = query.shape
    hkv = key.shape[1]
    probs = None
    if prefill_out is not None:
        out = prefill_out
    elif q_len > 1:
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        q = query
        if layer.channels is not None:
            groups = hq // hkv
            chan = layer.channels.repeat_interleave(groups, 1)[:, :, None, :]
            q = query.gather(-1, chan)
        qg = q.reshape(b, hkv, hq // hkv, q.shape[-1])
        select = getattr(method, "decode_tokens", None)
        idx = select(cache, module.layer_idx, query) if select is not None else None
        if idx is not None:
            key = key.gather(2, idx[..., None].expand(-1, -1, -1, key.shape[-1]))
            value = value.gather(2, idx[..., None].expand(-1, -1, -1, value.shape[-1]))
        w = torch.softmax(torch.matmul(qg, key.transpose(-1, -2)) * scale, -1)  # (B,Hkv,g,T)
        out = torch.matmul(w, value).reshape(b, hq, 1, value.shape[-1])
        probs = w.sum(2, keepdim=True)
        if hasattr(method, "observe"):
            method.observe(cache, module.layer_idx, probs[..., 0, :])
    after_attention(layer, method, query, scale, probs)
    if q_len > 1 and hasattr(method, "after_prefill"):
        method.after_prefill(cache, module.layer_idx)
    return out
