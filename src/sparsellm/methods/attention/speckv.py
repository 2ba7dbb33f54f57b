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

The draft's reading is the method's `DraftScorer` (`DraftVotes`): make the cache with
``session.new_cache(draft_cache(draft, prompt_ids, method))`` (both from
`sparsellm.integrations.transformers`) inside ``sparse_attention(target, method)``; the
scores travel in ``cache.shared``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sparsellm.errors import SparseLLMError
from sparsellm.methods.attention.cache import CompressedCache, keep_tokens, softmax_scores
from sparsellm.methods.attention.protocols import KVConfig, attention_method

SCORES = "speckv_scores"  # CompressedCache.shared key: {layer: (B, Hkv, T)}


@attention_method
@dataclass(frozen=True)
class SpecKV(KVConfig):
    """Keep `budget` prompt tokens per KV head, ranked by a draft's attention."""

    name: ClassVar[str] = "speckv"

    budget: int = 2048
    lookahead: int = 16
    window: int = 32
    kernel: int = 7
    sink: int = 4

    def after_prefill(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor, scale: float
    ) -> None:
        scores = cache.shared.get(SCORES)
        if scores is None:
            raise SparseLLMError(
                "speckv needs draft scores: make the cache with 'draft_cache' "
                "(sparsellm.integrations.transformers)"
            )
        layer = cache.layers[layer_idx]
        length = layer.keys.shape[2]
        if length <= self.budget:
            return
        score = scores.get(layer_idx)
        if score is None or score.shape[-1] != length:
            raise SparseLLMError("speckv scores were computed for a different prompt or model")
        w = min(self.window, length)
        keep = keep_tokens(score, length, self.budget - w - self.sink, self.sink, w)
        layer.keep(keep)

    def needs_draft(self) -> bool:
        return True

    def draft_scorer(self, prompt: int) -> DraftVotes:
        return DraftVotes(self, prompt)


def prompt_votes(
    query: torch.Tensor, key: torch.Tensor, scale: float, prompt: int, window: int
) -> torch.Tensor:
    """``(B, Hkv, prompt)`` attention paid to the first `prompt` keys by the queries of this
    call that vote: the last `window` prompt positions and every position after the
    prompt (causal; query ``i`` sits at absolute position ``key_len - q_len + i``)."""
    q_len, k_len = query.shape[2], key.shape[2]
    first = k_len - q_len  # absolute position of this call's first query
    start = max(first, prompt - window) - first  # first voting query of this call
    if start >= q_len:
        return torch.zeros(*key.shape[:2], prompt)
    probs = softmax_scores(query[:, :, start:], key, scale, first + start)
    return probs.sum(2)[..., :prompt]


class DraftVotes:
    """SpecKV's `DraftScorer`: the votes of every draft query that reads the prompt's end
    or follows it, per full-attention layer, max-pooled into the target's scores."""

    def __init__(self, method: SpecKV, prompt: int) -> None:
        self.method = method
        self.prompt = prompt
        self.lookahead = method.lookahead
        self.votes: dict[int, torch.Tensor] = {}  # layer -> (B, Hkv, prompt)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        v = prompt_votes(query, key, scale, self.prompt, self.method.window)
        self.votes[layer] = self.votes.get(layer, 0) + v

    def fill(self, cache: CompressedCache) -> None:
        kernel = self.method.kernel
        pooled = {}
        for i, v in self.votes.items():
            p = F.max_pool1d(v.flatten(0, 1)[:, None], kernel, 1, kernel // 2)
            pooled[i] = p.reshape(v.shape)
        cache.shared[SCORES] = pooled
