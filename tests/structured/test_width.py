"""Width scorers' math by hand, and pruned tiny models: shapes, GQA groups, ratio 0."""

from __future__ import annotations

import pytest
import torch

from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import BlockLayout, get_blocks
from sparsellm.models.tiny import tiny_model
from sparsellm.structured import apply_structured
from sparsellm.structured.width import (
    activation_scores,
    damped_inverse,
    ls_update,
    obs_scores,
    taylor_scores,
)

L = BlockLayout()


def test_taylor_sums_coupled_weights_before_abs() -> None:
    wg = {
        L.q: torch.tensor([[1.0], [-3.0]]),  # 2 groups, one row each
        L.k: torch.tensor([[1.0], [1.0]]),
        L.v: torch.tensor([[0.0], [0.0]]),
        L.o: torch.tensor([[1.0, 0.5]]),
        L.gate: torch.tensor([[1.0, 1.0], [2.0, 0.0]]),  # 2 channels
        L.up: torch.tensor([[-4.0, 0.0], [0.0, 0.0]]),
        L.down: torch.tensor([[1.0, 1.0]]),
    }
    groups, channels = taylor_scores(wg, L, 2, 2)
    assert groups.tolist() == [3.0, 1.5]  # |1+1+0+1|, |-3+1+0+0.5|
    assert channels.tolist() == [1.0, 3.0]  # |2-4+1|, |2+0+1|


def test_activation_scores_weight_times_column_norm() -> None:
    w = torch.tensor([[1.0, -2.0, 0.0, 1.0]])
    col_sq = torch.tensor([4.0, 1.0, 9.0, 0.0])
    assert activation_scores(w, col_sq, 2).tolist() == [1 * 2 + 2 * 1, 0.0]


def test_obs_scores_diagonal_hessian() -> None:
    # H = diag(h): H^-1_SS = 1/h, so the error of one column is w^2 h.
    w = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    h_inv = torch.diag(torch.tensor([0.5, 0.25])).double()
    assert obs_scores(w, h_inv, 2).tolist() == pytest.approx([(1 + 1) * 2.0, 4 * 4.0])


def test_ls_update_beats_plain_slicing_and_keeps_all() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    x[:, 5] = x[:, 0] + 0.1 * torch.randn(200, generator=g)  # a redundant column
    w = torch.randn(3, 6, generator=g)
    h = x.T @ x
    keep = torch.tensor([0, 1, 2, 3, 4])
    fitted = ls_update(w, h, keep, damp=1e-6)
    err_fit = (x @ w.T - x[:, keep] @ fitted.T).norm()
    err_cut = (x @ w.T - x[:, keep] @ w[:, keep].T).norm()
    assert err_fit < 0.2 * err_cut
    assert torch.allclose(ls_update(w, h, torch.arange(6), damp=0.0), w, atol=1e-4)


def test_damped_inverse_identity() -> None:
    assert torch.allclose(damped_inverse(torch.eye(3), 0.0), torch.eye(3).double())


@pytest.mark.parametrize("method", ["taylor", "activation", "obs", "spectral"])
def test_ratio_zero_keeps_logits(method: str, calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    ref = model(calib_ids).logits
    report = apply_structured(model, {"method": method, "ratio": 0.0}, calib_ids)
    assert report["measured_ratio"] == 0
    assert torch.equal(model(calib_ids).logits, ref)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["taylor", "obs"])
def test_gqa_groups_consistent(family: str, method: str, calib_ids: torch.Tensor) -> None:
    model = tiny_model(family)
    report = apply_structured(model, {"method": method, "ratio": 0.3}, calib_ids)
    cfg = model.config
    assert report["uniform"] and 0.25 < report["measured_ratio"] < 0.35
    assert cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 2 and cfg.head_dim == 16
    for block in get_blocks(model):
        attn = block.self_attn
        assert attn.q_proj.out_features == 2 * 16 and attn.k_proj.out_features == 16
        assert attn.o_proj.in_features == 2 * 16
        assert attn.num_key_value_groups == 2
        assert block.mlp.up_proj.out_features == cfg.intermediate_size
    out = model(calib_ids, use_cache=True)  # the KV cache works with fewer heads
    assert torch.isfinite(out.logits).all()


def test_head_removal_keeps_the_group_pairing() -> None:
    """Removing group 0 by hand must equal zeroing group 0's query heads in the dense model."""
    from sparsellm.structured.common import block_shape, prune_heads

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 16))
    dense = tiny_model("llama")
    for block in get_blocks(dense):
        block.self_attn.o_proj.weight.data[:, :32] = 0  # query heads 0,1 = group 0
    for block in get_blocks(model):
        prune_heads(block, L, torch.tensor([1]), block_shape(block, L, 16), 16)
    assert torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-5)


def test_per_layer_widths_differ(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    report = apply_structured(model, "activation:ratio=0.3,per_layer=true", calib_ids)
    assert not report["uniform"]
    assert len(model.config.sparsellm_layer_shapes) == 2
    assert torch.isfinite(model(calib_ids).logits).all()


def test_bad_inputs(calib_ids: torch.Tensor) -> None:
    with pytest.raises(SparseLLMError, match="ratio"):
        apply_structured(tiny_model("llama"), "taylor:ratio=1.0", calib_ids)
    with pytest.raises(SparseLLMError, match="unknown method 'nope'"):
        apply_structured(tiny_model("llama"), {"method": "nope", "ratio": 0.2}, calib_ids)
    with pytest.raises(SparseLLMError, match="does not support 'gpt2'"):
        apply_structured(tiny_model("gpt2"), "taylor", calib_ids)
    with pytest.raises(SparseLLMError, match="calibration"):
        apply_structured(tiny_model("llama"), "obs", None)


def test_spectral_keeps_a_super_weight_channel(calib_ids: torch.Tensor) -> None:
    """A down_proj column holding one huge entry survives spectral pruning (data-free)."""
    model = tiny_model("llama")
    mlp = get_blocks(model)[0].mlp
    down = mlp.down_proj.weight
    with torch.no_grad():
        # channel 5 is one 12σ entry and nothing else: its row is a lone tail direction,
        # which leverage alone ranks among the first to go
        spike = 12 * down.std()
        mlp.gate_proj.weight[5] = 0
        mlp.up_proj.weight[5] = 0
        down[:, 5] = 0
        down[3, 5] = spike
    apply_structured(model, "spectral:ratio=0.3", calib_ids)
    kept = get_blocks(model)[0].mlp.down_proj.weight
    assert kept.shape[1] < down.shape[1]  # channels were removed...
    assert torch.isclose(kept.abs().max(), spike)  # ...but not that one
