"""SpecKV-style KV eviction: a cheap sparse *draft* of the model says which prompt tokens
the answer will need.

SnapKV ranks prompt tokens by the attention of the prompt's last queries, which only
sees what the prompt's end looks at. A draft — here a weight-sparse copy of the same
model (e.g. 50% Wanda), so layers and heads correspond one to one — reads the prompt and
greedily generates `lookahead` tokens; the attention that its last `window` prompt
queries *and its generated tokens* pay to each prompt token (summed over the GQA group,
max-pooled over `kernel` neighbours as in SnapKV) is that token's importance. Right after
the target's exact prefill, each layer keeps the `sink` first and `window` last prompt
tokens plus the most important others, `budget` in all.

Make the cache with ``session.new_cache(speckv_cache(draft, prompt_ids, method))`` inside
``sparse_attention(target, method)``; the scores travel in ``cache.shared``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import full_attention_layers

SCORES = "speckv_scores"  # CompressedCache.shared key: {layer: (B, Hkv, T)}


@dataclass(frozen=True)
class SpecKV:
    """Keep `budget` prompt tokens per KV head, ranked by a draft's attention."""

    budget: int = 2048
    lookahead: int = 16
    window: int = 32
    kernel: int = 7
    sink: int = 4

    def after_prefill(self, cache: Any, layer_idx: int) -> None:
        from sparsellm.attention.kv import _keep_tokens

        scores = cache.shared.get(SCORES)
        if scores is None:
            raise SparseLLMError("speckv needs draft scores: make the cache with speckv_cache")
        layer = cache.layers[layer_idx]
        length = layer.keys.shape[2]
        if length <= self.budget:
            return
        score = scores.get(layer_idx)
        if score is None or score.shape[-1] != length:
            raise SparseLLMError("speckv scores were computed for a different prompt or model")
        w = min(self.window, length)
        keep = _keep_tokens(score, length, self.budget - w - self.sink, self.sink, w)
        layer.keep(keep)


def prompt_votes(
    query: torch.Tensor, key: torch.Tensor, scale: float, prompt: int, window: int
) -> torch.Tensor:
    """``(B, Hkv, prompt)`` attention paid to the first `prompt` keys by the queries of this
    call that vote: the last `window` prompt positions and every position after the
    prompt (causal; query ``i`` sits at absolute position ``key_len - q_len + i``)."""
    from sparsellm.attention.kv import _softmax_scores

    q_len, k_len = query.shape[2], key.shape[2]
    first = k_len - q_len  # absolute position of this call's first query
    start = max(first, prompt - window) - first  # first voting query of this call
    if start >= q_len:
        return torch.zeros(*key.shape[:2], prompt)
    probs = _softmax_scores(query[:, :, start:], key, scale, first + start)
    return probs.sum(2)[..., :prompt]


@torch.no_grad()
def draft_scores(
    draft: torch.nn.Module, prompt_ids: torch.Tensor, method: SpecKV
) -> dict[int, torch.Tensor]:
    """Per full-attention layer, the ``(B, Hkv, T)`` importance of each prompt token from
    the draft reading the prompt and generating ``method.lookahead`` tokens greedily."""
    from transformers import DynamicCache

    from sparsellm.attention.hf import observing_attention

    prompt = prompt_ids.shape[1]
    votes: dict[int, torch.Tensor] = {}
    # sliding-window layers (Gemma-3) keep their own window and are never compressed
    full = set(full_attention_layers(draft))

    def observe(module: Any, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        if module.layer_idx in full:
            v = prompt_votes(query, key, scale, prompt, method.window)
            votes[module.layer_idx] = votes.get(module.layer_idx, 0) + v

    cache = DynamicCache(config=draft.config)  # the draft's own layer kinds
    with observing_attention(draft, observe):
        ids = prompt_ids
        for _ in range(method.lookahead + 1):  # the last generated token is read too
            out = draft(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            ids = out.logits[:, -1:].argmax(-1)
    pooled: dict[int, torch.Tensor] = {}
    for i, v in votes.items():
        p = F.max_pool1d(v.flatten(0, 1)[:, None], method.kernel, 1, method.kernel // 2)
        pooled[i] = p.reshape(v.shape)
    return pooled


def speckv_cache(draft: torch.nn.Module, prompt_ids: torch.Tensor, method: SpecKV) -> Any:
    """A compressing cache for the target's prefill of `prompt_ids`, carrying the draft's
    scores (hand it to the target's session: ``session.new_cache(cache)``)."""
    from sparsellm.attention.kv import CompressedCache

    cache = CompressedCache(method, draft.config)  # same layer kinds as the target
    cache.shared[SCORES] = draft_scores(draft, prompt_ids, method)
    return cache
