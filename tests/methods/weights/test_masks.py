import pytest
import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.masks import (
    Pattern,
    check_nm_shape,
    check_sparsity,
    make_mask,
    nm_mask,
    parse_pattern,
    unstructured_mask,
)


def test_unstructured_per_layer_hand_computed():
    scores = torch.tensor([[4.0, 1.0, 3.0], [0.5, 6.0, 2.0]])
    mask = unstructured_mask(scores, 0.5, per="layer")
    # the three smallest overall: 0.5, 1.0, 2.0
    assert mask.tolist() == [[False, True, False], [True, False, True]]


def test_unstructured_per_row_hand_computed():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 6.0, 2.0, 9.0]])
    mask = unstructured_mask(scores, 0.5, per="row")
    assert mask.tolist() == [[False, True, False, True], [True, False, True, False]]


def test_nm_mask_hand_computed():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 7.0, 6.0]])
    t, f = True, False
    assert nm_mask(scores, 2, 4).tolist() == [[t, f, f, t, f, t, f, t]]
    assert nm_mask(scores, 1, 4).tolist() == [[t, f, f, f, f, t, f, f]]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_invariant_exactly_n_zeros_per_group(n, m):
    scores = torch.rand(16, 64)
    mask = nm_mask(scores, n, m)
    assert (mask.view(16, 64 // m, m).sum(-1) == n).all()
    # the pruned entries are the lowest of their group
    grouped = scores.view(16, -1, m)
    gm = mask.view(16, -1, m)
    pruned_max = grouped.masked_fill(~gm, -1).amax(-1)
    kept_min = grouped.masked_fill(gm, 2).amin(-1)
    assert (pruned_max <= kept_min).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_exact_count(sparsity):
    scores = torch.rand(10, 30)
    assert make_mask(scores, sparsity, Pattern()).sum() == int(300 * sparsity)
    assert (unstructured_mask(scores, sparsity, "row").sum(1) == int(30 * sparsity)).all()


def test_parse_pattern():
    assert parse_pattern("unstructured") == Pattern()
    assert parse_pattern("2:4") == Pattern(2, 4)
    assert parse_pattern("2:4").sparsity == 0.5
    for bad in ["4:4", "5:4", "0:4", "2-4", "dense"]:
        with pytest.raises(SparseLLMError):
            parse_pattern(bad)


def test_sparsity_range_and_nm_shape():
    for bad in [-0.1, 1.0, 1.5, float("nan")]:
        with pytest.raises(SparseLLMError):
            check_sparsity(bad)
    check_nm_shape(Pattern(2, 4), 64)
    with pytest.raises(SparseLLMError, match="divide"):
        check_nm_shape(Pattern(2, 8), 60)
