"""SliceGPT: the rotation alone is exact, slicing shrinks, saved models reload."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import sparsellm
from sparsellm.methods.structured import apply_structured
from sparsellm.methods.structured.slicing import (
    SliceGPTConfig,
    fold_norms,
    pca_basis,
    slice_model,
    width_for_ratio,
)
from sparsellm.models.adapters import BlockLayout
from sparsellm.models.tiny import tiny_model
from sparsellm.recover.structured import recover


def test_pca_basis_orders_by_variance() -> None:
    h = torch.diag(torch.tensor([1.0, 9.0, 4.0]))
    q = pca_basis(h)
    assert q.abs().argmax(0).tolist() == [1, 2, 0]
    assert torch.allclose(q.T @ q, torch.eye(3).double())


def test_pca_basis_sorts_unsorted_eigenvalues() -> None:
    # eigh returns ascending eigenvalues; the basis must start with the largest one
    q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64)).Q
    h = q @ torch.diag(torch.tensor([2.0, 5.0, 1.0, 3.0], dtype=torch.float64)) @ q.T
    basis = pca_basis(h)
    variances = torch.diag(basis.T @ h @ basis)
    assert torch.allclose(variances, torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=torch.float64))


def test_width_for_ratio_hand_value() -> None:
    # per_dim 10, d 10: dense 10*10 + 20 = 120; 25% -> 90; two d'^2 shortcuts:
    # d'=5: 50 + 50 + 10 = 110, d'=4: 40 + 32 + 8 = 80 -> 80 is closest to 90.
    assert width_for_ratio(10, 10, 0.25) == 4
    # the shortcuts cost 2d'^2: even ratio 0 slices, to d'=5 (110 is closer to 120 than 240)
    assert width_for_ratio(10, 10, 0.0) == 5


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


def _low_rank_stream(model: torch.nn.Module, rank: int) -> None:
    """Confine every residual signal to one random `rank`-dim subspace U: the embedding
    rows and everything o_proj / down_proj write are projected onto U. The norms' eps is
    zeroed: it is the one thing the sqrt(d/d') rescaling does not carry over exactly."""
    d = model.config.hidden_size
    u = torch.linalg.qr(torch.randn(d, rank)).Q
    proj = u @ u.T
    emb = model.get_input_embeddings()
    emb.weight.data = emb.weight.data @ proj
    for block in model.model.layers:
        for lin in (block.self_attn.o_proj, block.mlp.down_proj):
            lin.weight.data = proj @ lin.weight.data
    for p in model.parameters():
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    for m in model.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 0.0


@pytest.mark.parametrize("slice_head", [False, True])
def test_slicing_a_low_rank_stream_is_exact(slice_head: bool, calib_ids: torch.Tensor) -> None:
    """A stream of rank 32 sliced to d' = 32 loses nothing: the bases, shortcuts and the
    sqrt(d/d') norm correction must all be right (without it the norms are off by sqrt 2)."""
    model = tiny_model("llama")
    _low_rank_stream(model, 32)
    ref = model(calib_ids).logits
    assert slice_model(model, calib_ids, 0.5, slice_head=slice_head) == 32
    head = model.get_output_embeddings().weight
    assert head.shape[1] == (32 if slice_head else 64)
    assert torch.allclose(model(calib_ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_sliced_block_shortcuts_are_d_by_d(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    slice_model(model, calib_ids, 0.25, slice_head=True)
    for block in model.model.layers:
        assert block.attn_shortcut.shape == block.mlp_shortcut.shape == (48, 48)
        assert block.unwrap().self_attn.q_proj.in_features == 48


@pytest.mark.parametrize("slice_head", [False, True])
def test_slicegpt_shrinks_and_reloads(
    slice_head: bool, calib_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = tiny_model("llama")
    slice_model(model, calib_ids, 0.25, slice_head=slice_head)
    assert model.config.hidden_size == 48
    out = model(calib_ids, use_cache=True).logits
    model.save_pretrained(tmp_path)
    again = sparsellm.load(tmp_path).model
    assert torch.equal(again(calib_ids).logits, out)


def test_shrink_slicegpt_reports_ratio(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    report = apply_structured(model, SliceGPTConfig(ratio=0.25), calib_ids)
    assert 0.15 < report["measured_ratio"] < 0.35  # d' moves in steps of 8 here
    assert model.config.hidden_size == report["hidden_size"] < 64


@pytest.mark.parametrize("bf16", [False, True])
def test_sliced_model_distils_shortcuts_too(calib_ids: torch.Tensor, bf16: bool) -> None:
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    slice_model(student, calib_ids, 0.25)
    before = student.model.layers[0].attn_shortcut.detach().clone()
    recover(student, teacher, calib_ids, steps=2, batch_size=4, lr=1e-2, bf16=bf16)
    assert student.model.layers[0].attn_shortcut.dtype == torch.float32  # fp32 masters
    assert not torch.equal(student.model.layers[0].attn_shortcut, before)
    assert torch.isfinite(student(calib_ids).logits).all()
