"""The block-sparse path equals masked dense attention; the full pattern equals SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsellm.methods.attention import patterns as P
from sparsellm.methods.attention.blocksparse import block_sparse_attention, masked_dense_attention


def _qkv(b: int, hq: int, hkv: int, length: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, length, d, generator=g) for h in (hq, hkv, hkv))


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "length", "block"), [(1, 4, 2, 50, 8), (2, 3, 3, 64, 16), (1, 6, 2, 33, 4)]
)
def test_equals_masked_dense_random_masks(b, hq, hkv, length, block) -> None:
    q, k, v = _qkv(b, hq, hkv, length, 16, seed=length)
    nb = P.n_blocks(length, block)
    rnd = torch.rand(b, hq, nb, nb, generator=torch.Generator().manual_seed(1)) < 0.4
    mask = (rnd & P.causal_blocks(nb)) | torch.eye(nb, dtype=torch.bool)
    got = block_sparse_attention(q, k, v, mask, block)
    torch.testing.assert_close(
        got, masked_dense_attention(q, k, v, mask, block), atol=1e-5, rtol=1e-5
    )


def test_full_pattern_equals_sdpa() -> None:
    q, k, v = _qkv(1, 4, 2, 45, 8, seed=3)
    nb = P.n_blocks(45, 8)
    got = block_sparse_attention(q, k, v, P.causal_blocks(nb), 8)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_small_key_budget_chunks_give_same_result(monkeypatch) -> None:
    import sparsellm.methods.attention.blocksparse as bs

    q, k, v = _qkv(1, 2, 1, 40, 8, seed=5)
    mask = P.power_dilated(P.n_blocks(40, 4), 1, 1)
    full = bs.block_sparse_attention(q, k, v, mask, 4)
    monkeypatch.setattr(bs, "KEYS_PER_CHUNK", 4)
    torch.testing.assert_close(bs.block_sparse_attention(q, k, v, mask, 4), full)


def test_group_shared_masks_equal_masked_dense() -> None:
    q, k, v = _qkv(2, 6, 2, 70, 8, seed=7)
    nb = P.n_blocks(70, 8)
    rnd = torch.rand(2, 2, nb, nb, generator=torch.Generator().manual_seed(2)) < 0.3
    mask = (rnd & P.causal_blocks(nb)) | torch.eye(nb, dtype=torch.bool)
    got = block_sparse_attention(q, k, v, mask, 8)
    ref = masked_dense_attention(q, k, v, mask, 8)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_band_lengths_count_the_run_before_the_diagonal() -> None:
    from sparsellm.methods.attention.blocksparse import band_lengths

    # rows = query blocks 0..3 of one head; row 3 selects blocks 0 and 2 (run of 1 before 3)
    earlier = torch.tensor(
        [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool
    )
    assert band_lengths(earlier).tolist() == [0, 1, 2, 1]


def test_sink_window_uses_band_and_gather_parts_exactly() -> None:
    q, k, v = _qkv(1, 6, 3, 200, 8, seed=11)
    mask = P.sink_window(P.n_blocks(200, 8), 2, 5)  # 2 gathered sink blocks + a band of 4
    got = block_sparse_attention(q, k, v, mask, 8, scale=0.3)
    ref = masked_dense_attention(q, k, v, mask, 8, scale=0.3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("length", "window", "block", "hq", "hkv"),
    [(100, 16, 8, 4, 2), (257, 64, 16, 4, 1), (64, 16, 16, 2, 2), (10, 16, 8, 2, 1)],
)
def test_sliding_window_path_equals_token_level_window(length, window, block, hq, hkv) -> None:
    """Exact at token level: the partial edge block is masked per query, not per block."""
    from sparsellm.methods.attention.blocksparse import sliding_window_attention

    g = torch.Generator().manual_seed(length)
    q = torch.randn(2, hq, length, 16, generator=g)
    k, v = (torch.randn(2, hkv, length, 16, generator=g) for _ in range(2))
    i = torch.arange(length)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    rep = hq // hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed
    )
    out = sliding_window_attention(q, k, v, window, block)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of block"):
        sliding_window_attention(q, k, v, window + 1, block)
