"""Stepwise cached scoring agrees with the one-forward scorers on a plain cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from sparsellm.eval.longctx import Sample, answer_correct
from sparsellm.eval.perplexity import window_nll
from sparsellm.integrations.transformers import sparse_attention
from sparsellm.methods.attention.decode import cache_nbytes, cached_answer_correct, cached_tail_nll
from sparsellm.models.tiny import tiny_model


def test_cached_scorers_match_single_forward() -> None:
    model = tiny_model("llama", 0)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0))
    answer: list[int] = []
    with torch.no_grad():
        for _ in range(3):
            answer.append(
                int(model(torch.tensor([ids[:30].tolist() + answer])).logits[0, -1].argmax())
            )
    sample = Sample("passkey", 40, 0.5, ids[:30].tolist(), answer)
    assert answer_correct(model, sample)
    assert cached_answer_correct(model, sample, DynamicCache())
    full = window_nll(model, ids[None], 1).item()
    head = window_nll(model, ids[None, :30], 1).item()
    assert abs(cached_tail_nll(model, ids, 10, DynamicCache()) - (full - head)) < 1e-3


def test_compressed_cache_is_smaller() -> None:
    model = tiny_model("llama", 0)
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(1))
    dense = DynamicCache()
    cached_tail_nll(model, ids, 4, dense)
    with sparse_attention(model, "streaming_kv:sink=4,window=21") as session:
        cache = session.new_cache()
        cached_tail_nll(model, ids, 4, cache)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head_dim x fp32 bytes
    assert cache_nbytes(dense) == 99 * per_token  # the last token is never fed
    assert cache_nbytes(cache) == 25 * per_token
