"""Magnitude and Wanda scores/masks on hand-computed tiny matrices."""

import torch

from sparsellm.methods.weights.base import RowNormSq
from sparsellm.methods.weights.magnitude import Magnitude, MagnitudeConfig
from sparsellm.methods.weights.wanda import Wanda, WandaConfig


def test_magnitude_per_layer():
    w = torch.tensor([[1.0, -5.0], [0.2, 3.0]])
    out = Magnitude(MagnitudeConfig(sparsity=0.5)).prune(w, None)
    assert out.tolist() == [[0.0, -5.0], [0.0, 3.0]]


def test_wanda_uses_activation_norm_per_row():
    # inputs: channel 0 has norm 10, channel 1 has norm 1
    stats = RowNormSq(2)
    stats.update(torch.tensor([[6.0, 0.0], [8.0, 1.0]]))
    assert torch.allclose(stats.value, torch.tensor([100.0, 1.0]))
    w = torch.tensor([[1.0, 5.0], [0.2, 3.0]])
    # scores: row0 = [10, 5] -> prune col1; row1 = [2, 3] -> prune col0
    out = Wanda(WandaConfig(sparsity=0.5)).prune(w, stats)
    assert out.tolist() == [[1.0, 0.0], [0.0, 3.0]]
    # magnitude would have made the opposite choice on row 0
    assert Magnitude(MagnitudeConfig(sparsity=0.5)).prune(w, None)[0, 0] == 0


def test_wanda_nm_groups_along_inputs():
    stats = RowNormSq(4)
    stats.update(torch.ones(3, 4))
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    out = Wanda(WandaConfig(pattern="2:4")).prune(w, stats)
    assert out.tolist() == [[0.0, 0.0, 3.0, -4.0]]
