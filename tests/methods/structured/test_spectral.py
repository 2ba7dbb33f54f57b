"""Calibration-free leverage scores."""

from __future__ import annotations

import torch

from sparsellm.methods.structured.spectral import leverage_scores, outlier_channels


def test_leverage_of_orthogonal_rows() -> None:
    # rows e1*3, e2*1, 0: top direction (90% of energy) is e1 -> only row 0 has leverage.
    rows = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert leverage_scores(rows, energy=0.85).tolist() == [1.0, 0.0, 0.0]
    assert leverage_scores(rows, energy=1.0).tolist() == [1.0, 1.0, 0.0]


def test_outlier_weight_channel_is_flagged() -> None:
    g = torch.Generator().manual_seed(0)
    w_down = torch.randn(64, 256, generator=g) * 0.1  # (hidden, channels)
    assert not outlier_channels(w_down).any()  # Gaussian maxima stay near 4-5 sigma
    w_down[7, 42] = 3.0  # a "super weight": ~30 sigma, alone in its column
    assert outlier_channels(w_down).nonzero().flatten().tolist() == [42]
