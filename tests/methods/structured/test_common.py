"""Index maths, budgets and counts, checked by hand on tiny cases."""

from __future__ import annotations

import pytest
import torch

from sparsellm.methods.structured.common import (
    angular_distance,
    block_budgets,
    expand,
    keep_top,
    per_structure,
    plan_counts,
)


def test_expand_covers_whole_structures() -> None:
    assert expand(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_per_structure_sums_contiguous_slices() -> None:
    t = torch.arange(12.0).reshape(4, 3)  # rows 0..3
    assert per_structure(t, 2, 0).tolist() == [0 + 1 + 2 + 3 + 4 + 5, 6 + 7 + 8 + 9 + 10 + 11]
    assert per_structure(t, 3, 1).tolist() == [0 + 3 + 6 + 9, 1 + 4 + 7 + 10, 2 + 5 + 8 + 11]


def test_keep_top_returns_sorted_indices() -> None:
    assert keep_top(torch.tensor([0.5, 3.0, 1.0, 2.0]), 2).tolist() == [1, 3]


def test_plan_counts_heads_then_channels() -> None:
    # 3 groups of 10 params, 100 channels of 2 params, 230 total: 30% = 69 params.
    assert plan_counts(0.3, 3, 100, 10, 2, 230) == (1, 30)  # 10 + 30*2 = 70 ≈ 69
    assert plan_counts(0.3, 3, 100, 10, 2, 230, prune_heads=False) == (0, 34)
    assert plan_counts(0.0, 3, 100, 10, 2, 230) == (0, 0)


def test_plan_counts_keeps_one_group_and_channel() -> None:
    g, c = plan_counts(0.99, 2, 4, 10, 2, 28)
    assert g == 1 and c == 3


def test_block_budgets_mean_and_order() -> None:
    r = block_budgets(torch.tensor([0.1, 0.2, 0.3]), 0.3, spread=0.5)
    assert r.mean().item() == pytest.approx(0.3)
    assert r.tolist() == pytest.approx([0.45, 0.3, 0.15])  # least important loses most


def test_angular_distance_hand_values() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # same direction, then 90 degrees
    assert angular_distance(x, y).item() == pytest.approx((0 + 0.5) / 2)
