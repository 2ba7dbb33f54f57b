"""Width scorers' math by hand; pruned tiny models: what goes, the OBS refit, per-layer
budgets, GQA groups, ratio 0."""

from __future__ import annotations

import pytest
import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.structured import apply_structured
from sparsellm.methods.structured.common import block_distances
from sparsellm.methods.structured.width import (
    ActivationConfig,
    ObsConfig,
    SpectralConfig,
    TaylorConfig,
    WidthConfig,
    activation_scores,
    damped_inverse,
    ls_update,
    obs_scores,
    taylor_scores,
)
from sparsellm.models.adapters import BlockLayout, get_blocks
from sparsellm.models.tiny import tiny_model

L = BlockLayout()
WIDTH: list[type[WidthConfig]] = [TaylorConfig, ActivationConfig, ObsConfig, SpectralConfig]


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


@pytest.mark.parametrize("cls", WIDTH)
def test_ratio_zero_keeps_logits(cls: type[WidthConfig], calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    ref = model(calib_ids).logits
    report = apply_structured(model, cls(ratio=0.0), calib_ids)
    assert report["measured_ratio"] == 0
    assert torch.equal(model(calib_ids).logits, ref)


DEAD_GROUP, DEAD_CHANNELS = 0, (3, 7)


@pytest.mark.parametrize("cls", WIDTH)
def test_every_scorer_removes_planted_dead_structures(
    cls: type[WidthConfig], calib_ids: torch.Tensor
) -> None:
    """A GQA group and two MLP channels that own only zero weights contribute nothing;
    every scorer gives them score 0 (|Σw·g|, Σ|W|·‖x‖, the OBS error and the leverage
    of zero rows all vanish), so they must be among what goes, and nothing dead stays."""
    model, dense = tiny_model("llama"), tiny_model("llama")
    for m in (model, dense):
        for block in get_blocks(m):
            attn, mlp = block.self_attn, block.mlp
            with torch.no_grad():
                rows = slice(DEAD_GROUP * 32, DEAD_GROUP * 32 + 32)  # 2 query heads of 16
                attn.q_proj.weight[rows] = 0
                attn.o_proj.weight[:, rows] = 0
                attn.k_proj.weight[DEAD_GROUP * 16 : DEAD_GROUP * 16 + 16] = 0
                attn.v_proj.weight[DEAD_GROUP * 16 : DEAD_GROUP * 16 + 16] = 0
                for c in DEAD_CHANNELS:
                    mlp.gate_proj.weight[c] = mlp.up_proj.weight[c] = mlp.down_proj.weight[:, c] = 0
    apply_structured(model, cls(ratio=0.3), calib_ids)
    for pruned, ref in zip(get_blocks(model), get_blocks(dense), strict=True):
        assert torch.equal(pruned.self_attn.k_proj.weight, ref.self_attn.k_proj.weight[16:])
        assert torch.equal(pruned.self_attn.q_proj.weight, ref.self_attn.q_proj.weight[32:])
        gate = pruned.mlp.gate_proj.weight
        assert gate.shape[0] < 128 - len(DEAD_CHANNELS)  # live channels went too
        assert (gate.abs().sum(1) > 0).all()  # but no dead one stayed


def test_obs_refit_is_the_least_squares_fit_on_calibration_inputs(
    calib_ids: torch.Tensor,
) -> None:
    """Block 0's down_proj after OBS pruning: its kept columns are re-fit so that, on the
    calibration inputs, they reproduce the dense output as well as least squares can,
    clearly better than the dense weights merely sliced."""
    model, dense = tiny_model("llama"), tiny_model("llama")
    xs: list[torch.Tensor] = []
    down = get_blocks(dense)[0].mlp.down_proj
    handle = down.register_forward_hook(lambda _m, a, _o: xs.append(a[0].flatten(0, 1)))
    dense(calib_ids)
    handle.remove()
    apply_structured(model, ObsConfig(ratio=0.3, prune_heads=False), calib_ids)
    # heads untouched, so block 0's MLP input is the dense one: kept channels = kept rows
    up, up_dense = get_blocks(model)[0].mlp.up_proj.weight, get_blocks(dense)[0].mlp.up_proj.weight
    keep = torch.tensor([int((up_dense == row).all(1).nonzero()) for row in up])
    x, w = torch.cat(xs).double(), down.weight.double()
    refit = get_blocks(model)[0].mlp.down_proj.weight.double()
    y, xk = x @ w.T, x[:, keep]
    best = torch.linalg.lstsq(xk, y).solution
    err_refit, err_best = (y - xk @ refit.T).norm(), (y - xk @ best).norm()
    err_sliced = (y - xk @ w[:, keep].T).norm()
    assert err_best < 0.9 * err_sliced  # this data leaves room to re-fit
    assert err_refit <= 1.01 * err_best  # and the refit takes it (damping costs < 1%)


def test_per_layer_budgets_follow_angular_distance(calib_ids: torch.Tensor) -> None:
    """Two blocks, spread 0.5: block ratios 0.3·(1 ± 0.5), the block that turns the stream
    less loses 45% of its parameters, the other 15%; the mean stays 0.3."""
    model = tiny_model("llama")
    distance = block_distances(model, calib_ids, 4)
    before = [sum(p.numel() for p in b.parameters()) for b in get_blocks(model)]
    report = apply_structured(model, ActivationConfig(ratio=0.3, per_layer=True), calib_ids)
    expected = [0.45, 0.15] if distance[0] < distance[1] else [0.15, 0.45]
    assert report["block_ratios"] == pytest.approx(expected)
    after = [sum(p.numel() for p in b.parameters()) for b in get_blocks(model)]
    removed = [1 - a / b for a, b in zip(after, before, strict=True)]
    assert removed == pytest.approx(expected, abs=0.01)
    assert not report["uniform"] and report["measured_ratio"] == pytest.approx(0.3, abs=0.01)
    assert len(model.config.sparsellm_layer_shapes) == 2


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
    from sparsellm.methods.structured.common import block_shape, prune_heads

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 16))
    dense = tiny_model("llama")
    for block in get_blocks(dense):
        block.self_attn.o_proj.weight.data[:, :32] = 0  # query heads 0,1 = group 0
    for block in get_blocks(model):
        prune_heads(block, L, torch.tensor([1]), block_shape(block, L, 16), 16)
    assert torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-5)


def test_bad_inputs(calib_ids: torch.Tensor) -> None:
    with pytest.raises(SparseLLMError, match="ratio"):
        apply_structured(tiny_model("llama"), "taylor:ratio=1.0", calib_ids)
    with pytest.raises(SparseLLMError, match="ratio"):
        TaylorConfig(ratio=-0.1)
    with pytest.raises(SparseLLMError, match="unknown method 'nope'"):
        apply_structured(tiny_model("llama"), {"method": "nope", "ratio": 0.2}, calib_ids)
    with pytest.raises(SparseLLMError, match="unknown key"):
        apply_structured(tiny_model("llama"), "depth:per_layer=true", calib_ids)
    with pytest.raises(SparseLLMError, match="does not support 'gpt2'"):
        apply_structured(tiny_model("gpt2"), TaylorConfig(), calib_ids)
    with pytest.raises(SparseLLMError, match="calibration"):
        apply_structured(tiny_model("llama"), ObsConfig(), None)
    with pytest.raises(SparseLLMError, match="calibration"):  # per-layer budgets read data
        apply_structured(tiny_model("llama"), SpectralConfig(per_layer=True), None)


def test_spectral_keeps_a_super_weight_channel() -> None:
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
    apply_structured(model, SpectralConfig(ratio=0.3), None)  # reads no data
    kept = get_blocks(model)[0].mlp.down_proj.weight
    assert kept.shape[1] < down.shape[1]  # channels were removed...
    assert torch.isclose(kept.abs().max(), spike)  # ...but not that one
