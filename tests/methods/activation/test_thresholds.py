"""Hand-checked math: quantile thresholds, error proxy, greedy levels, SVD factors."""

from __future__ import annotations

import pytest
import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.activation.thresholds import (
    check_activation_sparsity,
    greedy_levels,
    quantile_threshold,
    relative_error,
    svd_factors,
)


def test_quantile_threshold_hand_checked() -> None:
    scores = torch.tensor([[4.0, 1.0], [3.0, 2.0]])
    assert quantile_threshold(scores, 0.5) == 2.0  # keep > 2: {3, 4}, half skipped
    assert quantile_threshold(scores, 0.25) == 1.0
    assert quantile_threshold(scores, 0.0) == 0.0  # "off"
    assert int((scores > quantile_threshold(scores, 0.75)).sum()) == 1


def test_relative_error_hand_checked() -> None:
    w = torch.tensor([[1.0, 2.0]])
    x = torch.tensor([[3.0, 1.0]])  # W x = 5
    keep = torch.tensor([[True, False]])  # dropped part: 2 * 1 = 2
    assert relative_error(x, w, keep) == pytest.approx(4.0 / 25.0)
    one = torch.tensor([[1.0]])
    # a low-rank path equal to W recovers the skipped part exactly
    assert relative_error(x, w, keep, (one, torch.tensor([[1.0, 2.0]]))) == 0
    # one that maps the skipped channel to 1 instead of 2 leaves an error of 1
    assert relative_error(x, w, keep, (one, torch.tensor([[0.0, 1.0]]))) == pytest.approx(0.04)


def test_greedy_prefers_cheap_error_and_hits_target_exactly() -> None:
    levels = (0.0, 0.5, 1.0)
    # group 0 is cheap to sparsify, group 1 expensive; equal sizes
    errors = torch.tensor([[0.0, 0.1, 0.2], [0.0, 5.0, 9.0]])
    costs = torch.tensor([10.0, 10.0])
    lv = greedy_levels(errors, costs, levels, 0.5)
    assert lv == [1.0, 0.0]  # all of group 0 first: 0.5 avg
    lv = greedy_levels(errors, costs, levels, 0.6)
    assert lv[0] == 1.0 and lv[1] == pytest.approx(0.2)  # the last step is partial
    assert (lv[0] * 10 + lv[1] * 10) / 20 == pytest.approx(0.6)


def test_greedy_weights_by_cost() -> None:
    levels = (0.0, 0.5)
    errors = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # same error, but group 1 saves 3x more
    lv = greedy_levels(errors, torch.tensor([1.0, 3.0]), levels, 0.375)
    assert lv == [0.0, 0.5]


def test_greedy_unreachable_target() -> None:
    with pytest.raises(SparseLLMError):
        greedy_levels(torch.zeros(1, 2), torch.ones(1), (0.0, 0.5), 0.9)


def test_svd_factors_rank_and_exactness() -> None:
    a, b = torch.randn(6, 2), torch.randn(2, 5)
    fa, fb = svd_factors(a @ b, 2)
    assert fa.shape == (6, 2) and fb.shape == (2, 5)
    torch.testing.assert_close(fa @ fb, a @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [-0.1, 0.95, 1.0])
def test_sparsity_range(bad: float) -> None:
    with pytest.raises(SparseLLMError):
        check_activation_sparsity(bad)
