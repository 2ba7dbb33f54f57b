"""MoA (per-head spans, budgeted allocation, search) and AnchorAttention (stripes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsellm.integrations.transformers import run_calibration, sparse_attention
from sparsellm.methods.attention import patterns as P
from sparsellm.methods.attention.anchor import Anchor, anchor_stripes
from sparsellm.methods.attention.blocksparse import block_sparse_attention, masked_dense_attention
from sparsellm.methods.attention.moa import CANDIDATES, MoA, allocate, head_windows
from sparsellm.models.tiny import tiny_model
from tests.methods.attention.test_kv import _ids


def test_head_windows_match_per_head_sink_window() -> None:
    got = head_windows(64, 8, 8, (0.25, 1.0))  # windows of 16 and 64 tokens = 2 and 8 blocks
    assert got.shape == (1, 2, 8, 8)
    assert torch.equal(got[0, 0], P.sink_window(8, 1, 2))
    assert torch.equal(got[0, 1], P.causal_blocks(8))


def test_allocate_spends_budget_where_recall_grows_most() -> None:
    costs = (0.25, 0.5, 1.0)
    recall = torch.tensor([[0.9, 0.95, 1.0], [0.2, 0.8, 1.0]])  # head 1 needs a longer span
    # mean budget 0.375 -> total 0.75; start 0.25 + 0.25, one upgrade of 0.25 affordable
    assert allocate(recall, costs, 0.375).tolist() == [0, 1]
    assert allocate(recall, costs, 0.5).tolist() == [1, 1]
    assert allocate(recall, costs, 1.0).tolist() == [2, 2]
    assert allocate(recall, costs, 0.0).tolist() == [0, 0]  # the cheapest is always kept


def test_moa_search_respects_budget_and_full_spans_reproduce_dense() -> None:
    model = tiny_model("llama", 0)
    search = MoA(density=0.3, sink=8, block=8).calibration(128)
    method = run_calibration(model, _ids(128), search)
    recall = search.recall
    cfg = model.config
    assert recall.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads, len(CANDIDATES))
    spans = torch.tensor(method.spans)
    assert spans.mean() <= 0.3 + 1e-6 and set(spans.flatten().tolist()) <= set(CANDIDATES)
    ids = _ids(64)
    ref = model(ids).logits
    full = MoA(sink=8, block=8, min_length=16, spans=tuple((1.0,) * len(r) for r in method.spans))
    with sparse_attention(model, full):
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_anchor_stripes_by_hand() -> None:
    # one query block of 2 tokens over 6 keys; sink = key 0, local = last 1 key (key 1)
    scores = torch.tensor([[[5.0, 1.0, -9.0, -9.0, -9.0, -9.0], [5.0, 1.0, 4.5, 0.0, 9.0, 2.0]]])
    got = anchor_stripes(scores, block=2, sink=1, local=1, theta=1.0)
    # block 0 sees keys 0-1: anchor 5 -> keep key 0; block 1 sees keys 0-3: anchor
    # max(key0=5, key3=0) = 5 -> keep keys with >= 4: keys 0 and 2
    assert got.tolist() == [[[True, False, False, False, False, False],
                             [True, False, True, False, False, False]]]  # fmt: skip


def test_anchor_block_mask_is_exact_on_its_blocks_and_inf_theta_is_dense() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 80, 8, generator=g) for h in (4, 2, 2))
    mask = Anchor(theta=1.0, sink=8, local=8, block=8).block_mask(q, k, 0)
    assert mask.shape == (1, 2, 10, 10) and not bool(mask.all())
    got = block_sparse_attention(q, k, v, mask, 8)
    torch.testing.assert_close(got, masked_dense_attention(q, k, v, mask, 8), atol=1e-5, rtol=0)
    dense_mask = Anchor(theta=1e9, sink=8, local=8, block=8).block_mask(q, k, 0)
    assert torch.equal(dense_mask[0, 0], P.causal_blocks(10))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(
        block_sparse_attention(q, k, v, dense_mask, 8), ref, atol=1e-5, rtol=0
    )
