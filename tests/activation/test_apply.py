"""Calibration, wrapping and unwrapping on tiny random models."""

from __future__ import annotations

import pytest
import torch

from sparsellm.activation.apply import sparsify_activations
from sparsellm.activation.base import ActivationConfig
from sparsellm.activation.modules import (
    ActSparseLinear,
    ThresholdedActivation,
    activations_dense,
    measured_sparsity,
    reset_counts,
    unwrap_activations,
    wrapped_modules,
)
from sparsellm.errors import SparseLLMError
from sparsellm.models.tiny import tiny_model

METHODS = ["teal", "wina", "rsparse", "cats"]


def _config(method: str, sparsity: float, allocation: str = "greedy") -> ActivationConfig:
    return ActivationConfig(
        method=method, sparsity=sparsity, allocation=allocation, rank=4, max_tokens=256
    )


@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_gives_identical_logits(method: str, calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    ref = model(calib_ids).logits
    sparsify_activations(model, calib_ids, _config(method, 0.0))
    assert any(True for _ in wrapped_modules(model))
    assert torch.equal(model(calib_ids).logits, ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("allocation", ["greedy", "uniform"])
def test_thresholds_hit_target_on_calibration_data(
    method: str, allocation: str, calib_ids: torch.Tensor
) -> None:
    model = tiny_model("qwen2").eval()
    sparsify_activations(model, calib_ids, _config(method, 0.4, allocation))
    reset_counts(model)
    with torch.no_grad():
        model(calib_ids)
    assert measured_sparsity(model) == pytest.approx(0.4, abs=0.01)


def test_unwrap_restores_the_dense_model(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    ref = model(calib_ids).logits
    sparsify_activations(model, calib_ids, _config("rsparse", 0.5))
    sparse = model(calib_ids).logits
    assert not torch.allclose(sparse, ref)
    with activations_dense(model):
        assert torch.equal(model(calib_ids).logits, ref)
    assert torch.equal(model(calib_ids).logits, sparse)
    unwrap_activations(model)
    assert not any(True for _ in wrapped_modules(model))
    assert torch.equal(model(calib_ids).logits, ref)


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_head_sparsity_counts_in_the_target_and_unwraps(
    method: str, calib_ids: torch.Tensor
) -> None:
    model = tiny_model("llama").eval()
    ref = model(calib_ids).logits
    cfg = ActivationConfig(method=method, sparsity=0.4, max_tokens=256, head=True)
    info = sparsify_activations(model, calib_ids, cfg)
    head = model.get_output_embeddings()
    assert isinstance(head, ActSparseLinear) and info["head"]["level"] == 0.4
    reset_counts(model)
    with torch.no_grad():
        model(calib_ids)
    assert measured_sparsity(model) == pytest.approx(0.4, abs=0.01)
    assert 1 - head.kept / head.seen == pytest.approx(0.4, abs=0.02)  # the head on its own
    unwrap_activations(model)
    assert torch.equal(model(calib_ids).logits, ref)
    with pytest.raises(SparseLLMError, match="input method"):
        sparsify_activations(model, calib_ids, ActivationConfig(method="cats", head=True))


def test_wina_scale_is_the_fused_column_norm(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    attn = model.model.layers[0].self_attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    sparsify_activations(model, calib_ids, _config("wina", 0.5))
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert isinstance(proj, ActSparseLinear)
        torch.testing.assert_close(proj.col_norm, fused.norm(dim=0))
    assert attn.q_proj.threshold == attn.v_proj.threshold  # one selection per shared input


def test_rsparse_lowrank_factors_reconstruct_each_projection(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    sparsify_activations(model, calib_ids, _config("rsparse", 0.5))
    k = model.model.layers[0].self_attn.k_proj
    assert k.lr_a.shape == (k.base_layer.out_features, 4) and k.lr_b.shape[0] == 4


def test_cats_wraps_the_gate_activation(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    sparsify_activations(model, calib_ids, _config("cats", 0.5))
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.act_fn, ThresholdedActivation)
    assert not isinstance(mlp.down_proj, ActSparseLinear)


def test_unsupported_architecture_and_bad_config(calib_ids: torch.Tensor) -> None:
    with pytest.raises(SparseLLMError, match="activation sparsity does not support"):
        sparsify_activations(tiny_model("gpt2"), calib_ids, _config("teal", 0.5))
    with pytest.raises(SparseLLMError, match="unknown activation method"):
        sparsify_activations(tiny_model("llama"), calib_ids, _config("nope", 0.5))
    with pytest.raises(SparseLLMError):
        ActivationConfig(sparsity=1.2)
    with pytest.raises(SparseLLMError):
        ActivationConfig(allocation="owl")
