import torch

from sparsellm.methods.attention import patterns as P
from sparsellm.methods.attention.hip import HiP, _initial_ranges, hierarchical_select


def test_initial_ranges_by_hand():
    lo, hi = _initial_ranges(5, 2)
    # query block 0: one causal block, then an empty range; block 4: 5 blocks cut in 2
    assert lo.tolist() == [[0, 1], [0, 1], [0, 1], [0, 2], [0, 2]]
    assert hi.tolist() == [[1, 1], [1, 2], [1, 3], [2, 4], [2, 5]]


def test_tree_search_finds_the_one_matching_block():
    torch.manual_seed(0)
    block, nb, d = 4, 16, 8
    direction = torch.randn(d)
    query = 0.01 * torch.randn(1, 2, nb * block, d)  # 2 query heads, 1 KV head (GQA)
    key = 0.01 * torch.randn(1, 1, nb * block, d)
    query[:, 1, -block:] = direction  # one head of the last query block looks for it
    key[:, 0, 9 * block : 10 * block] = 10 * direction  # every key of block 9 matches
    idx = hierarchical_select(query, key, block, 2)
    assert idx.shape == (1, 1, nb, 2)
    assert 9 in idx[0, 0, -1].tolist()
    assert (idx[0, 0] <= torch.arange(nb)[:, None]).all()  # causal picks only


def test_budget_covering_every_block_selects_them_all():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 40, 4), torch.randn(1, 2, 40, 4)
    mask = HiP(blocks=8, sink=0, window=0, block=8).block_mask(q, k, 0)
    assert torch.equal(mask, P.causal_blocks(5).expand(1, 2, 5, 5))


def test_mask_is_causal_and_keeps_diagonal_sink_and_window():
    torch.manual_seed(2)
    q, k = torch.randn(1, 3, 256, 8), torch.randn(1, 3, 256, 8)
    mask = HiP(blocks=2, sink=16, window=32, block=16).block_mask(q, k, 0)
    nb = 16
    assert not (mask & ~P.causal_blocks(nb)).any()
    assert (mask & P.sink_window(nb, 1, 2)).sum() == P.sink_window(nb, 1, 2).sum() * 3
    per_row = mask.sum(-1)  # at most sink + window + blocks per query block
    assert (per_row <= 1 + 2 + 2).all() and (per_row[..., -1] >= 4).all()
