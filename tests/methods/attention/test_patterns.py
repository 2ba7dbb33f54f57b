"""Each block pattern against a mask built by explicit loops on small sizes."""

from __future__ import annotations

import torch

from sparsellm.methods.attention import patterns as P


def _loop(nb: int, keep) -> torch.Tensor:
    return torch.tensor([[j <= i and keep(i, j) for j in range(nb)] for i in range(nb)])


def test_sink_window_matches_loops() -> None:
    ref = _loop(7, lambda i, j: j < 2 or i - j < 3)
    assert torch.equal(P.sink_window(7, 2, 3), ref)


def test_power_dilated_matches_loops() -> None:
    pow2 = {1, 2, 4, 8}
    ref = _loop(12, lambda i, j: j < 1 or i - j < 2 or (i - j) in pow2)
    assert torch.equal(P.power_dilated(12, 1, 2), ref)


def test_topk_blocks_keeps_best_causal_and_diagonal() -> None:
    scores = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(0))
    mask = P.topk_blocks(scores, 2)
    for h in range(3):
        for i in range(6):
            causal = list(range(i + 1))
            best = sorted(causal, key=lambda j: -scores[h, i, j].item())[:2]
            assert set(mask[h, i].nonzero().flatten().tolist()) == set(best) | {i}


def test_cumulative_blocks_reaches_gamma_minimally() -> None:
    p = torch.tensor([[1.0, 0, 0], [0.7, 0.3, 0], [0.5, 0.1, 0.4]])
    mask = P.cumulative_blocks(p, gamma=0.85)
    assert mask.tolist() == [[True, False, False], [True, True, False], [True, False, True]]


def test_vertical_slash_blocks_cover_token_pattern_exactly() -> None:
    length, block = 37, 4
    vertical, slash = torch.tensor([0, 5, 22]), torch.tensor([0, 3, 17])
    tok = P.vertical_slash_tokens(length, vertical, slash)
    ref = _loop(P.n_blocks(length, block), lambda i, j: i == j)
    for q in range(length):
        for k in range(q + 1):
            if k in vertical.tolist() or q - k in slash.tolist():
                ref[q // block, k // block] = True
    assert torch.equal(
        tok,
        torch.tensor(
            [
                [k <= q and (k in (0, 5, 22) or q - k in (0, 3, 17)) for k in range(length)]
                for q in range(length)
            ]
        ),
    )
    assert torch.equal(P.vertical_slash_blocks(length, block, vertical, slash), ref)


def test_expand_blocks_is_causal_token_mask() -> None:
    tok = P.expand_blocks(P.sink_window(3, 1, 1), 6, 2)
    ref = torch.tensor(
        [[k <= q and (k // 2 == 0 or k // 2 == q // 2) for k in range(6)] for q in range(6)]
    )
    assert torch.equal(tok, ref)


def test_tail_blocks_cover_the_last_tokens_counted_from_the_end() -> None:
    # 90 tokens in blocks of 16: block 5 holds tokens 80-89, block 4 holds 64-79
    assert P.tail_blocks(90, 0, 16) == 0
    assert P.tail_blocks(90, 10, 16) == 1  # tokens 80-89: the partial last block
    assert P.tail_blocks(90, 12, 16) == 2  # tokens 78-89 reach into block 4
    assert P.tail_blocks(96, 16, 16) == 1  # a block multiple: exactly one block
    assert P.tail_blocks(96, 17, 16) == 2
    assert P.tail_blocks(90, 500, 16) == 6  # longer than the input: every block


def test_dense_tail_makes_only_the_last_rows_dense() -> None:
    base = P.sink_window(5, 1, 1)  # sink block 0 + the diagonal
    got = P.dense_tail(base, 2)
    ref = _loop(5, lambda i, j: i >= 3 or j == 0 or i == j)
    assert torch.equal(got, ref)
    assert torch.equal(P.dense_tail(base, 0), base)
    assert torch.equal(P.dense_tail(base, 9), P.causal_blocks(5))  # beyond nb: all dense
