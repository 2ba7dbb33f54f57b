"""Sparse attention in HF models through transformers' own extension points.

A method (any `PrefillConfig` or `KVConfig`) is registered with
``AttentionInterface.register`` under a name derived from its config (the config is bound
into the registered function, so the model's ``config._attn_implementation`` alone says
which method runs) and the SDPA mask builder is registered under the same name, so
padding and decode masks are exactly SDPA's. `sparse_attention` switches a model to the
method with ``set_attn_implementation`` and back on exit. Registration happens only when
a method is enabled, never at import.

A prefill method runs for prefill of unpadded sequences of at least ``min_length``
tokens; decode steps (q_len 1), short inputs, continued prefill over a cache and padded
batches use SDPA unchanged, so a method can never change what it does not accelerate. A
KV-cache method acts only on the `CompressedCache` its session makes, through the hooks of
`KVConfig`. Everything here dispatches on ``config.family`` and those protocols: no
concrete method is imported, so a new method needs no edit here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparsellm.config import to_config
from sparsellm.errors import SparseLLMError
from sparsellm.methods.attention.blocksparse import block_sparse_attention, sliding_window_attention
from sparsellm.methods.attention.cache import CompressedCache, CompressedLayer
from sparsellm.methods.attention.protocols import (
    ATTENTION_FAMILIES,
    AttentionConfig,
    AttentionObserver,
    Calibration,
    KVConfig,
    PrefillConfig,
)
from sparsellm.models.adapters import full_attention_layers

AttentionMethod = AttentionConfig | dict[str, Any] | str  # a config, a recipe mapping, a spec


def attention_config(method: AttentionMethod) -> AttentionConfig:
    """Any spelling of an attention method -> its config (errors list the valid names)."""
    return cast(AttentionConfig, to_config(method, ATTENTION_FAMILIES))


def method_name(method: AttentionConfig) -> str:
    """Stable registry name for a method config (same config -> same name)."""
    digest = hashlib.sha1(repr(method).encode()).hexdigest()[:10]
    return f"sparsellm_{method.name}_{digest}"


def _sparse_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    method: PrefillConfig,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: block-sparse prefill, SDPA for everything else.

    A sliding-window layer (Gemma-3's local layers) never takes the method's pattern: it
    computes its own window exactly, through the block path when its mask is the plain
    sliding causal band (transformers would run dense SDPA over an L × L mask)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    window = getattr(module, "sliding_window", None)  # a transformers attribute, not ours
    if window:
        if (
            q_len == kv_len
            and q_len >= max(method.min_length, 2)
            and q_len > window
            and window % method.block == 0
            and is_window_mask(attention_mask, window, q_len)
        ):
            out = sliding_window_attention(query, key, value, window, method.block, scaling)
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    if attention_mask is not None or q_len != kv_len or q_len < max(method.min_length, 2):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    out = prefill_attention(method, query, key, value, scaling, module.layer_idx)
    return out.transpose(1, 2).contiguous(), None


def prefill_attention(
    method: PrefillConfig,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    layer: int,
) -> torch.Tensor:
    """A prefill method's attention ``(B, Hq, L, D)``: its own `attend`, else its block mask
    on the block-sparse kernel."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = method.attend(query, key, value, scale, layer)
    if out is None:
        mask = method.prefill_mask(query, key, layer)
        out = block_sparse_attention(query, key, value, mask, method.block, scale)
    return out


def is_window_mask(mask: torch.Tensor | None, window: int, length: int) -> bool:
    """True iff boolean `mask` (…, L, L) is exactly the causal band of `window` keys in
    every batch row (no padding): its band is all True and it holds nothing else."""
    if mask is None or mask.dtype != torch.bool or tuple(mask.shape[-2:]) != (length, length):
        return False
    w = min(window, length)
    per_matrix = w * (w + 1) // 2 + (length - w) * w
    # count_nonzero reads the bools as they are (a plain sum widened an 8192² mask to
    # int64 first: 0.45 s per sliding layer, a fifth of Gemma-3's whole sparse prefill)
    if int(torch.count_nonzero(mask)) != per_matrix * (mask.numel() // (length * length)):
        return False
    head = torch.ones(w - 1, w - 1, dtype=torch.bool).tril()
    for x in mask.reshape(-1, length, length):  # a view for the usual (1, 1, L, L) mask
        # rows w-1 … L-1: their w band keys, as one strided view (row r+1 starts one
        # row and one column after row r); the first w-1 rows: a lower triangle
        s0, s1 = x.stride()
        band = x.as_strided((length - w + 1, w), (s0 + s1, s1), x.storage_offset() + (w - 1) * s0)
        if not bool(band.all()) or not bool(x[: w - 1, : w - 1][head].all()):
            return False
    return True  # the band is all True and holds every True: nothing else is


@dataclass
class AttentionSession:
    """What `sparse_attention` yields: the method config and, for KV-cache methods, the
    cache of the current generation (make one per prompt with `new_cache`)."""

    method: AttentionConfig
    cache: CompressedCache | None = None
    prefill: PrefillConfig | None = None  # a sparse prefill run before a KV method compresses
    config: Any = None  # the model's config: which layers are sliding-window ones

    @property
    def compresses_cache(self) -> bool:
        return self.method.family == "kv"

    def new_cache(self, prepared: CompressedCache | None = None) -> Cache:
        """A fresh cache: compressing for KV methods, a plain DynamicCache otherwise.
        `prepared` adopts a compressing cache made elsewhere (`draft_cache`)."""
        if not self.compresses_cache:
            return DynamicCache(config=self.config)
        self.cache = prepared if prepared is not None else CompressedCache(self.config)
        return self.cache


def _kv_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    session: AttentionSession,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function of KV methods: compress when the keys are our cache's."""
    cache = session.cache
    layer = cache.layers[module.layer_idx] if cache is not None else None
    # no cache, another cache, or a sliding-window layer (transformers' own): plain SDPA
    if not isinstance(layer, CompressedLayer) or key is not layer.keys:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    if attention_mask is not None or (query.shape[2] > 1 and key.shape[2] != query.shape[2]):
        raise SparseLLMError(
            "KV-cache compression supports unpadded batches: one prefill, then single-token steps"
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    sparse = session.prefill
    prefill_out = None
    if sparse is not None and query.shape[2] >= max(sparse.min_length, 2):
        prefill_out = prefill_attention(sparse, query, key, value, scale, module.layer_idx)
    method = cast(KVConfig, session.method)
    out = kv_attention(module.layer_idx, query, key, value, cache, method, scale, prefill_out)
    return out.transpose(1, 2).contiguous(), None


def kv_attention(
    layer_idx: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: CompressedCache,
    method: KVConfig,
    scale: float,
    prefill_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the (compressed) cache of one layer, then the method's hooks.

    Prefill is exact causal SDPA, unless a sparse prefill already computed `prefill_out`.
    Decode reads the tokens `method.select` picks; with pruned key channels it selects the
    same query channels (scale unchanged: ThinK approximates the full dot product). The
    decode weights are computed explicitly (one query row: cheap) for `after_step`."""
    layer = cache.layers[layer_idx]
    b, hq, q_len, _ = query.shape
    hkv = key.shape[1]
    if q_len > 1:
        out = prefill_out
        if out is None:
            out = F.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scale, enable_gqa=True
            )
        method.after_prefill(cache, layer_idx, query, scale)
        return out
    q = query
    if layer.channels is not None:
        chan = layer.channels.repeat_interleave(hq // hkv, 1)[:, :, None, :]
        q = query.gather(-1, chan)
    qg = q.reshape(b, hkv, hq // hkv, q.shape[-1])
    idx = method.select(cache, layer_idx, query)
    if idx is not None:
        key = key.gather(2, idx[..., None].expand(-1, -1, -1, key.shape[-1]))
        value = value.gather(2, idx[..., None].expand(-1, -1, -1, value.shape[-1]))
    w = torch.softmax(torch.matmul(qg, key.transpose(-1, -2)) * scale, -1)  # (B, Hkv, g, T)
    out = torch.matmul(w, value).reshape(b, hq, 1, value.shape[-1])
    method.after_step(cache, layer_idx, w.sum(2))
    return out


def register(method: AttentionConfig, session: AttentionSession | None = None) -> str:
    """Register `method` with transformers' attention and mask interfaces; returns the name.
    KV methods are bound to their `session` (its cache), prefill methods to themselves."""
    name = method_name(method)
    if session is not None:
        name += f"_{id(session):x}"
        fn = functools.partial(_kv_forward, session=session)
    else:
        fn = functools.partial(_sparse_forward, method=method)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _unregister(name: str) -> None:
    """Drop a per-session name (transformers has no public unregister)."""
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def _bound(method: AttentionConfig, model: torch.nn.Module) -> AttentionConfig:
    """Prefill methods completed from the model's config (`PrefillConfig.bind`)."""
    return method.bind(model.config) if isinstance(method, PrefillConfig) else method


@contextlib.contextmanager
def sparse_attention(
    model: torch.nn.Module, method: AttentionMethod, prefill: AttentionMethod | None = None
) -> Iterator[AttentionSession]:
    """Run `model` with a sparse attention method (a config or a spec string such as
    ``"snapkv:budget=1024"``) inside the block; the previous attention implementation is
    restored on exit, even on error. KV methods act only on caches made by the yielded
    session's `new_cache`; a KV method may take a sparse `prefill` method too (a recipe's
    ``{prefill, kv}``), which then computes the prefill it compresses."""
    method = _bound(attention_config(method), model)
    paired = None if prefill is None else _bound(attention_config(prefill), model)
    for m in (method, paired):
        if m is not None and m.needs_calibration():
            raise SparseLLMError(
                f"{m.name} needs its calibrated table: run "
                "sparsellm.integrations.transformers.calibrate(model, ids, method) first"
            )
    if paired is not None and (method.family != "kv" or paired.family != "prefill"):
        raise SparseLLMError("prefill= pairs a prefill method with a KV-cache method")
    before = model.config._attn_implementation
    if before != "sdpa":
        raise SparseLLMError(f"sparse attention builds on sdpa; the model uses {before!r}")
    session = AttentionSession(
        method, prefill=cast(PrefillConfig | None, paired), config=model.config
    )
    name = register(method, session if session.compresses_cache else None)
    model.set_attn_implementation(name)
    try:
        yield session
    finally:
        model.set_attn_implementation(before)
        if session.compresses_cache:  # per-session names: drop them
            _unregister(name)


@contextlib.contextmanager
def observing_attention(
    model: torch.nn.Module, observe: Callable[[Any, torch.Tensor, torch.Tensor, float], None]
) -> Iterator[None]:
    """Run `model` with SDPA unchanged while ``observe(module, query, key, scaling)`` sees
    every attention call (post-RoPE, before attention); restored on exit."""

    def forward(module: Any, query: Any, key: Any, value: Any, mask: Any, **kwargs: Any) -> Any:
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        observe(module, query, key, scale)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    before = model.config._attn_implementation
    name = f"sparsellm_observe_{id(observe):x}"
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
        _unregister(name)


def _observing_full_layers(
    model: torch.nn.Module, observer: AttentionObserver
) -> contextlib.AbstractContextManager[None]:
    """`observing_attention` for a method's observer: full-attention layers only (the
    sliding-window ones keep their own window under any method and are never changed)."""
    full = set(full_attention_layers(model))

    def observe(module: Any, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        if module.layer_idx in full:
            observer.observe(module.layer_idx, query, key, scale)

    return observing_attention(model, observe)


@torch.no_grad()
def observe_forward(model: torch.nn.Module, ids: torch.Tensor, observer: AttentionObserver) -> None:
    """One exact forward over `ids` (1, L) while `observer` sees every full-attention
    layer's query and key. Observers that learn from several texts (SeerAttention's gate)
    are fed this way, one window at a time, before their `result`."""
    with _observing_full_layers(model, observer):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)


def run_calibration(
    model: torch.nn.Module, ids: torch.Tensor, calibration: Calibration
) -> AttentionConfig:
    """`calibration`'s result after it observed one exact forward over `ids` (1, L); keep
    the calibration object to read what it measured (e.g. MoA's recalls)."""
    observe_forward(model, ids, calibration)
    return calibration.result(model)


def calibrate(
    model: torch.nn.Module, ids: torch.Tensor, method: AttentionMethod
) -> AttentionConfig:
    """`method` with its calibrated table (MInference's patterns, MoA's spans, Double
    Sparsity's channels) filled from one forward over calibration `ids` (1, L)."""
    method = _bound(attention_config(method), model)
    return run_calibration(model, ids, method.calibration(ids.shape[1]))


@torch.no_grad()
def draft_cache(
    draft: torch.nn.Module, prompt_ids: torch.Tensor, method: AttentionMethod
) -> CompressedCache:
    """A compressing cache for the target's prefill of `prompt_ids`, carrying the scores of
    `method`'s draft scorer (SpecKV) from `draft` reading the prompt and generating its
    lookahead greedily; hand it to the target's session: ``session.new_cache(cache)``."""
    method = cast(KVConfig, attention_config(method))
    if method.family != "kv":
        raise SparseLLMError(f"{method.name} is a prefill method: it uses no draft model")
    scorer = method.draft_scorer(prompt_ids.shape[1])
    steps = DynamicCache(config=draft.config)  # the draft's own layer kinds
    with _observing_full_layers(draft, scorer):
        ids = prompt_ids
        for _ in range(scorer.lookahead + 1):  # the last generated token is read too
            out = draft(input_ids=ids, past_key_values=steps, use_cache=True, logits_to_keep=1)
            ids = out.logits[:, -1:].argmax(-1)
    cache = CompressedCache(draft.config)  # same layer kinds as the target
    scorer.fill(cache)
    return cache
