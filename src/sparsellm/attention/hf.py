"""Plugging sparse attention into HF models through transformers' own extension points.

A prefill method is registered with ``AttentionInterface.register`` under a name derived
from its config (the config is bound into the registered function, so the model's
``config._attn_implementation`` alone says which method runs) and the SDPA mask builder
is registered under the same name, so padding and decode masks are exactly SDPA's.
`sparse_attention` switches a model to the method with ``set_attn_implementation`` and
back on exit. Registration happens only when a method is enabled, never at import.

The sparse path runs for prefill of unpadded sequences of at least ``min_length``
tokens; decode steps (q_len 1), short inputs, continued prefill over a cache and padded
batches use SDPA unchanged, so a method can never change what it does not accelerate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparsellm.attention import kv, prefill
from sparsellm.attention import patterns as P
from sparsellm.attention.anchor import Anchor
from sparsellm.attention.blocksparse import block_sparse_attention, sliding_window_attention
from sparsellm.attention.double_sparsity import DoubleSparsity
from sparsellm.attention.moa import MoA
from sparsellm.attention.speckv import SpecKV
from sparsellm.attention.tidal import TidalDecode
from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import context_window

PREFILL_METHODS: dict[str, type] = {
    "full": prefill.Full,
    "sink_window": prefill.SinkWindow,
    "power": prefill.Power,
    "block_topk": prefill.BlockTopK,
    "vertical_slash": prefill.VerticalSlash,
    "flexprefill": prefill.FlexPrefill,
    "minference": prefill.MInference,
    "moa": MoA,
    "anchor": Anchor,
}
KV_METHODS: dict[str, type] = {
    "streaming_kv": kv.StreamingKV,
    "snapkv": kv.SnapKV,
    "h2o": kv.H2O,
    "think": kv.ThinK,
    "quest": kv.Quest,
    "tidal": TidalDecode,
    "double_sparsity": DoubleSparsity,
    "speckv": SpecKV,
}
METHODS = {**PREFILL_METHODS, **KV_METHODS}


def parse_attention(spec: str) -> Any:
    """``"name:key=value,key=value"`` -> the method's config; errors list what is valid."""
    name, _, params = spec.partition(":")
    name = name.strip()
    if name not in METHODS:
        raise SparseLLMError(
            f"unknown attention method {name!r}; valid: {', '.join(sorted(METHODS))}"
        )
    cls = METHODS[name]
    # calibrated tables (MInference choice, Double Sparsity label) are not spec keys
    fields = {f.name: f for f in dataclasses.fields(cls) if not isinstance(f.default, tuple)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or key not in fields:
            raise SparseLLMError(
                f"bad parameter {item!r} for attention method {name!r}; "
                f"valid keys: {', '.join(fields)} (as key=value)"
            )
        typ = type(fields[key].default)
        try:
            kwargs[key] = typ(raw)
        except ValueError:
            raise SparseLLMError(f"{name}: {key} must be {typ.__name__}, got {raw!r}") from None
    method = cls(**kwargs)
    negative = [f for f in fields if getattr(method, f) < 0]
    if negative or getattr(method, "block", 1) < 1 or getattr(method, "page", 1) < 1:
        raise SparseLLMError(f"{name}: parameters must be non-negative, block and page >= 1")
    return method


def method_name(method: Any) -> str:
    """Stable registry name for a method config (same config -> same name)."""
    kind = next((k for k, v in METHODS.items() if isinstance(method, v)), "custom")
    digest = hashlib.sha1(repr(method).encode()).hexdigest()[:10]
    return f"sparsellm_{kind}_{digest}"


def prefill_mask(method: Any, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
    """The block mask a prefill method computes for one layer, with its ``tail`` query
    blocks made dense (`patterns.dense_tail`)."""
    tail = P.tail_blocks(query.shape[2], getattr(method, "tail", 0), method.block)
    return P.dense_tail(method.block_mask(query, key, layer), tail)


def _sparse_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    method: Any,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: block-sparse prefill, SDPA for everything else.

    A sliding-window layer (Gemma-3's local layers) never takes the method's pattern: it
    computes its own window exactly, through the block path when its mask is the plain
    sliding causal band (transformers would run dense SDPA over an L × L mask)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    window = getattr(module, "sliding_window", None)
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
    mask = prefill_mask(method, query, key, module.layer_idx)
    out = block_sparse_attention(query, key, value, mask, method.block, scaling)
    return out.transpose(1, 2).contiguous(), None


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

    method: Any
    cache: kv.CompressedCache | None = None
    prefill: Any = None  # a sparse prefill method run before a KV method compresses
    config: Any = None  # the model's config: which layers are sliding-window ones

    @property
    def compresses_cache(self) -> bool:
        return isinstance(self.method, tuple(KV_METHODS.values()))

    def new_cache(self, prepared: kv.CompressedCache | None = None) -> Cache:
        """A fresh cache: compressing for KV methods, a plain DynamicCache otherwise.
        `prepared` adopts a compressing cache made elsewhere (SpecKV's `speckv_cache`)."""
        if not self.compresses_cache:
            return DynamicCache(config=self.config)
        self.cache = (
            prepared if prepared is not None else kv.CompressedCache(self.method, self.config)
        )
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
    if not isinstance(layer, kv.CompressedLayer) or key is not layer.keys:
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
        mask = prefill_mask(sparse, query, key, module.layer_idx)
        prefill_out = block_sparse_attention(query, key, value, mask, sparse.block, scale)
    out = kv.kv_attention(module, query, key, value, cache, scale, prefill_out)
    return out.transpose(1, 2).contiguous(), None


def register(method: Any, session: AttentionSession | None = None) -> str:
    """Register `method` with transformers' attention and mask interfaces; returns the name."""
    name = method_name(method)
    if session is not None:
        name += f"_{id(session):x}"
        fn = functools.partial(_kv_forward, session=session)
    else:
        fn = functools.partial(_sparse_forward, method=method)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


@contextlib.contextmanager
def sparse_attention(
    model: torch.nn.Module, method: Any | str, prefill: Any | str | None = None
) -> Iterator[AttentionSession]:
    """Run `model` with a sparse attention method inside the block; the previous attention
    implementation is restored on exit, even on error. KV methods act only on caches made
    by the yielded session's `new_cache`; a KV method may take a sparse `prefill` method
    too (a recipe's ``{prefill, kv}``), which then computes the prefill it compresses."""
    method, prefill = (parse_attention(m) if isinstance(m, str) else m for m in (method, prefill))
    for m in (method, prefill):
        _check_calibrated(m)
    if prefill is not None and (
        not isinstance(method, tuple(KV_METHODS.values()))
        or isinstance(prefill, tuple(KV_METHODS.values()))
    ):
        raise SparseLLMError("prefill= pairs a prefill method with a KV-cache method")
    before = model.config._attn_implementation
    if before != "sdpa":
        raise SparseLLMError(f"sparse attention builds on sdpa; the model uses {before!r}")
    session = AttentionSession(method, prefill=prefill, config=model.config)
    name = register(method, session if session.compresses_cache else None)
    model.set_attn_implementation(name)
    try:
        yield session
    finally:
        model.set_attn_implementation(before)
        if session.compresses_cache:  # per-session names: drop them (no public unregister)
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)


def _check_calibrated(method: Any) -> None:
    """Methods with calibrated tables refuse to run without them."""
    if isinstance(method, prefill.MInference) and not method.choice:
        raise SparseLLMError(
            "minference needs per-head patterns: run attention.search.calibrate_minference first"
        )
    if isinstance(method, MoA) and not method.spans:
        raise SparseLLMError("moa needs per-head spans: run attention.moa.calibrate_moa first")
    if isinstance(method, DoubleSparsity) and not method.label:
        raise SparseLLMError(
            "double_sparsity needs calibrated channels: run "
            "attention.double_sparsity.calibrate_double_sparsity first"
        )


@contextlib.contextmanager
def observing_attention(model: torch.nn.Module, observe: Any) -> Iterator[None]:
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
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def prepared_attention(
    model: torch.nn.Module, tokenizer: Any, method: Any, calib: str = "c4", seqlen: int = 4096
) -> contextlib.AbstractContextManager[AttentionSession]:
    """`sparse_attention` for a prefill method, calibrating MInference's per-head patterns
    or MoA's per-head spans first (one window of `calib`: `seqlen` tokens, or the model's
    window if shorter). KV methods are refused: a single forward (perplexity, scored
    answers) never decodes from a cache."""
    from sparsellm.data.corpora import resolve_corpus, token_windows

    if isinstance(method, tuple(KV_METHODS.values())):
        raise SparseLLMError(
            "KV-cache methods act only while decoding; measure them with bench/attention.py"
        )
    seqlen = min(seqlen, context_window(model) or seqlen)
    if isinstance(method, prefill.MInference) and not method.choice:
        from sparsellm.attention.search import calibrate_minference

        ids = token_windows(tokenizer, resolve_corpus(calib), 1, seqlen)
        method, _ = calibrate_minference(model, ids, method)
    if isinstance(method, MoA) and not method.spans:
        from sparsellm.attention.moa import calibrate_moa

        ids = token_windows(tokenizer, resolve_corpus(calib), 1, seqlen)
        method, _ = calibrate_moa(model, ids, method)
    return sparse_attention(model, method)
