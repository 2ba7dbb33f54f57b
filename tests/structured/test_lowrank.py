"""WeLore-style ranks: threshold maths by hand, exact factors, reload."""

from __future__ import annotations

from pathlib import Path

import torch

import sparsellm
from sparsellm.models.tiny import tiny_model
from sparsellm.structured import shrink
from sparsellm.structured.lowrank import allocate_ranks, factorise, ranks_for_threshold


def test_ranks_for_threshold_by_hand() -> None:
    spectra = [torch.tensor([4.0, 2.0, 1.0]), torch.tensor([1.0, 0.9, 0.8])]
    assert ranks_for_threshold(spectra, 0.4) == [2, 3]
    assert ranks_for_threshold(spectra, 0.99) == [1, 1]


def test_allocate_prefers_fast_decay() -> None:
    fast = torch.tensor([10.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    flat = torch.ones(8)
    ranks = allocate_ranks([fast, flat], [(8, 8), (8, 8)], 0.3)
    assert ranks == [1, None]  # 1*(8+8)=16 of 64 params: 48/128 = 37.5% removed
    assert allocate_ranks([fast, flat], [(8, 8), (8, 8)], 0.0) == [None, None]


def test_full_rank_factors_are_exact() -> None:
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    assert torch.allclose(factorise(lin, 4)(x), lin(x), atol=1e-6)


def test_welore_shrinks_and_reloads(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = tiny_model("llama")
    ref = model(calib_ids).logits
    assert shrink(model, "welore", 0.0)["measured_ratio"] == 0
    assert torch.equal(model(calib_ids).logits, ref)
    report = shrink(model, "welore", 0.3)
    assert 0.2 < report["measured_ratio"] < 0.4 and report["ranks"]
    model.save_pretrained(tmp_path)
    again = sparsellm.load(tmp_path).model
    assert torch.equal(again(calib_ids).logits, model(calib_ids).logits)
