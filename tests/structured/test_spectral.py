"""Calibration-free leverage scores."""

from __future__ import annotations

import torch

from sparsellm.structured.spectral import leverage_scores


def test_leverage_of_orthogonal_rows() -> None:
    # rows e1*3, e2*1, 0: top direction (90% of energy) is e1 -> only row 0 has leverage.
    rows = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert leverage_scores(rows, energy=0.85).tolist() == [1.0, 0.0, 0.0]
    assert leverage_scores(rows, energy=1.0).tolist() == [1.0, 1.0, 0.0]
