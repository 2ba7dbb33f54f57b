"""ActQKV: activation bias, the probe, the dynamic cut-off and block retrieval."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from sparsellm.integrations.transformers import sparse_attention
from sparsellm.methods.attention.actqkv import (
    ActQKV,
    activation_bias,
    cutoff_blocks,
    probe_query,
)
from sparsellm.methods.attention.cache import CompressedLayer
from sparsellm.models.tiny import tiny_model
from tests.methods.attention.test_kv import _greedy, _ids


def test_activation_bias_and_probe_by_hand() -> None:
    # one channel, three tokens 0, 0, 3: mean 1, variance 2, eps = 0.02
    q = torch.tensor([[0.0], [0.0], [3.0]])
    bias = activation_bias(q)
    torch.testing.assert_close(bias, torch.tensor([1 / 2.02, 1 / 2.02, 4 / 2.02]))
    # weights 1/6, 1/6, 4/6 -> probe 2; the plain mean would be 1
    torch.testing.assert_close(probe_query(q), torch.tensor([2.0]))
    # the outlier token dominates a wider window too
    g = torch.Generator().manual_seed(0)
    window = torch.randn(31, 8, generator=g) * 0.1
    anchor = torch.full((1, 8), 5.0)
    probe = probe_query(torch.cat([window, anchor]))
    assert torch.cosine_similarity(probe, anchor[0], 0) > 0.99
    # a single query (no deviation) is its own probe
    torch.testing.assert_close(probe_query(anchor), anchor[0])


def test_cutoff_reads_the_budget_when_flat_and_the_floor_when_peaked() -> None:
    flat = torch.zeros(2, 64)
    assert cutoff_blocks(flat, 4, 40, 1.0) == 40
    peaked = torch.full((2, 64), -30.0)
    peaked[:, 0] = 30.0
    assert cutoff_blocks(peaked, 4, 40, 1.0) == 4
    # in between, the paper's formula: H = log(64) - 0.05 -> 4 + 36 * exp(10 * (2σ(-0.5) - 1))
    target = math.log(64) - 0.05
    lo, hi = 0.0, 10.0  # find a temperature whose softmax has that entropy
    scores = torch.zeros(1, 64)
    scores[0, 0] = 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        p = torch.softmax(scores * mid, -1)
        h = float(-(p * p.log()).sum())
        lo, hi = (mid, hi) if h > target else (lo, mid)
    frac = math.exp(10 * (2 / (1 + math.exp(0.5)) - 1))
    assert cutoff_blocks(scores, 4, 40, lo) == round(4 + 36 * frac)
    assert cutoff_blocks(flat, 8, 5, 1.0) == 5, "the floor never exceeds the budget"


def test_select_reads_sinks_tail_and_the_block_the_probe_matches() -> None:
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 1, 200, 8, generator=g) * 0.1
    keys[0, 0, 100:108] += 3.0  # block 5 (tokens 100..107 with sink 60, block 8)
    cache = SimpleNamespace(layers=[SimpleNamespace(keys=keys)], shared={})
    m = ActQKV(budget=120, block=8, sink=60, recent=40, window=4, min_blocks=1)
    prompt_q = torch.randn(1, 2, 16, 8, generator=g) * 0.1
    prompt_q[0, :, -1] += 3.0  # the last prompt query looks for block 5
    m.after_prefill(cache, 0, prompt_q, 8**-0.5)
    idx = m.select(cache, 0, torch.zeros(1, 2, 1, 8))  # the step's own query carries nothing
    got = idx[0, 0].tolist()
    assert got == sorted(got) and len(got) <= 120
    assert set(range(60)) <= set(got) and set(range(156, 200)) <= set(got)  # sink + tail
    assert set(range(100, 108)) <= set(got)
    assert cache.shared[("actqkv", 0)]["means"].shape[2] == 12  # (200 - 40 - 60) // 8
    short = SimpleNamespace(layers=[SimpleNamespace(keys=keys[:, :, :100])], shared={})
    m.after_prefill(short, 0, prompt_q, 1.0)
    assert m.select(short, 0, torch.zeros(1, 2, 1, 8)) is None  # fits the budget


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_keep_all_is_dense_and_a_small_budget_is_not(family: str) -> None:
    """Also on Gemma-3's layout: its sliding-window layers keep their own cache."""
    model = tiny_model(family, 5)
    ids = _ids(60)
    _, ref_logits = _greedy(model, ids, 5, DynamicCache())
    with sparse_attention(model, "actqkv:budget=128") as session:
        _, logits = _greedy(model, ids, 5, session.new_cache())
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    spec = "actqkv:budget=24,block=4,sink=4,recent=8,min_blocks=1"
    with sparse_attention(model, spec) as session:
        cache = session.new_cache()
        _, small = _greedy(model, ids, 5, cache)
    torch.testing.assert_close(small[0], ref_logits[0])  # prefill is exact
    assert not torch.allclose(small[1:], ref_logits[1:], atol=1e-4)
    full = [layer for layer in cache.layers if isinstance(layer, CompressedLayer)]
    assert full and all(layer.keys.shape[2] == 65 for layer in full), "nothing is evicted"
