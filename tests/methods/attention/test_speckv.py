"""SpecKV: draft votes by hand, keep-all exactness, budget and sinks after eviction."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from sparsellm.errors import SparseLLMError
from sparsellm.integrations.transformers import draft_cache, sparse_attention
from sparsellm.methods.attention.speckv import SpecKV, prompt_votes
from sparsellm.models.tiny import tiny_model
from tests.methods.attention.test_kv import _greedy, _ids


def test_prompt_votes_of_uniform_attention() -> None:
    k = torch.zeros(1, 1, 4, 2)  # equal logits: uniform over the causal keys
    q = torch.ones(1, 2, 4, 2)  # 2 query heads in one KV group
    # prefill: queries at positions 2 and 3 vote (window 2): 1/3 + 1/4 for keys 0..2, 1/4
    got = prompt_votes(q, k, 1.0, prompt=4, window=2)
    want = 2 * torch.tensor([7 / 12, 7 / 12, 7 / 12, 1 / 4])
    torch.testing.assert_close(got[0, 0], want)
    # a generated token at position 4 spreads 1/5 over 5 keys; only the prompt's 4 count
    got = prompt_votes(q[:, :, :1], torch.zeros(1, 1, 5, 2), 1.0, prompt=4, window=2)
    torch.testing.assert_close(got[0, 0], torch.full((4,), 2 / 5))


def test_keep_all_matches_dense_and_eviction_keeps_budget_and_sinks() -> None:
    model = tiny_model("llama", 0)
    draft = copy.deepcopy(model)  # a stand-in draft: same architecture
    ids = _ids(60)
    _, ref_logits = _greedy(model, ids, 5, DynamicCache())
    keep_all = SpecKV(budget=100, lookahead=2)
    with sparse_attention(model, keep_all) as session:
        _, logits = _greedy(model, ids, 5, session.new_cache(draft_cache(draft, ids, keep_all)))
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)

    method = SpecKV(budget=24, lookahead=3, window=8, sink=4)
    dense = DynamicCache()
    _greedy(model, ids, 0, dense)
    with sparse_attention(model, method) as session:
        cache = session.new_cache(draft_cache(draft, ids, method))
        _greedy(model, ids, 3, cache)
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape[2] == 24 + 3  # the budget after prefill, plus decoded tokens
        torch.testing.assert_close(layer.keys[:, :, :4], dense.layers[i].keys[:, :, :4])
    assert cache.get_seq_length() == 60 + 3


def test_cache_without_scores_is_an_error() -> None:
    from sparsellm.methods.attention.cache import CompressedCache

    model = tiny_model("llama", 0)
    with sparse_attention(model, "speckv:budget=8") as session:
        cache = session.new_cache(CompressedCache())
        with pytest.raises(SparseLLMError, match="draft"):
            model(_ids(20), past_key_values=cache, use_cache=True)
