"""SliceGPT: the rotation alone is exact, slicing shrinks, saved models reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sparsellm
from sparsellm.models.adapters import BlockLayout
from sparsellm.models.tiny import tiny_model
from sparsellm.structured import shrink
from sparsellm.structured.slicing import fold_norms, pca_basis, slice_model, width_for_ratio


def test_pca_basis_orders_by_variance() -> None:
    h = torch.diag(torch.tensor([1.0, 9.0, 4.0]))
    q = pca_basis(h)
    assert q.abs().argmax(0).tolist() == [1, 2, 0]
    assert torch.allclose(q.T @ q, torch.eye(3).double())


def test_width_for_ratio_hand_value() -> None:
    # per_dim 10, d 10: dense 10*10 + 20 = 120; 25% -> 90; d'=7: 70 + 49 + 14 = 133,
    # d'=6: 60 + 36 + 12 = 108, d'=5: 50 + 25 + 10 = 85 -> closest is 5.
    assert width_for_ratio(10, 10, 0.25) == 5
    # the shortcuts cost d'^2: even ratio 0 must slice to d'=6 (60 + 36 + 12 = 108 < 120)
    assert width_for_ratio(10, 10, 0.0) == 6


def test_fold_norms_keeps_logits(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    for p in model.parameters():
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    ref = model(calib_ids).logits
    fold_norms(model, BlockLayout())
    assert torch.allclose(model(calib_ids).logits, ref, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_slicing_zero_is_exact(family: str, tied: bool, calib_ids: torch.Tensor) -> None:
    model = tiny_model(family)
    for p in model.parameters():
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)  # non-trivial norm weights to fold
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    ref = model(calib_ids).logits
    assert slice_model(model, calib_ids, 0.0) == 64
    assert not model.config.tie_word_embeddings
    assert torch.allclose(model(calib_ids).logits, ref, atol=1e-4, rtol=1e-5)


def test_slicegpt_shrinks_and_reloads(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = tiny_model("llama")
    report = shrink(model, "slicegpt", 0.25, calib_ids)
    assert 0.15 < report["measured_ratio"] < 0.35  # d' moves in steps of 8 here
    assert model.config.hidden_size == report["hidden_size"] < 64
    out = model(calib_ids, use_cache=True).logits
    model.save_pretrained(tmp_path)
    again = sparsellm.load(tmp_path).model
    assert torch.equal(again(calib_ids).logits, out)
