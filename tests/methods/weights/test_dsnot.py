import pytest
import torch

from sparsellm.api import sparsify
from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.dsnot import dsnot_refine
from sparsellm.methods.weights.masks import nm_mask
from sparsellm.models.tiny import tiny_model
from sparsellm.recipe import parse_recipe


def _eps(w, dense, mean):
    return ((dense - w) * mean).sum(1)


def test_hand_checked_swap():
    # row 0: pruned {1: 3, 3: .5, 5: 1} -> eps = 4.5 > 0; grow the largest positive gain
    # (col 1, 3.0) and prune the kept negative contributor with the lowest Wanda score
    # (col 4, -0.2): eps 4.5 - 3 - 0.2 = 1.3. Then no negative kept weight is left: stop.
    # row 1 mirrors it with signs flipped.
    dense = torch.tensor([[4.0, 3, 2, 0.5, -0.2, 1], [-4.0, -3, -2, -0.5, 0.2, -1]])
    w = dense.clone()
    w[:, [1, 3, 5]] = 0
    ones = torch.ones(6)
    out = dsnot_refine(w, dense, ones, ones, ones, max_cycles=10, update_threshold=0.0)
    assert out.tolist() == [[4.0, 3, 2, 0, 0, 0], [-4.0, -3, -2, 0, 0, 0]]
    assert _eps(out, dense, ones).tolist() == pytest.approx([1.3, -1.3])


def test_variance_decides_which_weight_grows():
    # two equal gains; the one whose input varies less is the more reliable to restore
    dense = torch.tensor([[1.0, 1.0, -0.1, 5.0]])
    w = torch.tensor([[0.0, 0.0, -0.1, 5.0]])
    mean, ones = torch.ones(4), torch.ones(4)
    var = torch.tensor([4.0, 1.0, 1.0, 1.0])
    out = dsnot_refine(w, dense, mean, var, ones, max_cycles=1, update_threshold=0.0)
    assert out.tolist() == [[0.0, 1.0, 0.0, 5.0]]


def test_random_layers_error_never_grows_and_counts_hold():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 128, generator=g)
    mean = torch.randn(128, generator=g) * 0.5
    var = torch.rand(128, generator=g) + 0.1
    norm_sq = torch.rand(128, generator=g) + 0.1
    score = dense.abs() * norm_sq.sqrt()
    w = dense.masked_fill(score <= score.kthvalue(64, dim=1, keepdim=True).values, 0.0)
    before = _eps(w, dense, mean).abs()
    out = dsnot_refine(w, dense, mean, var, norm_sq, max_cycles=50, update_threshold=0.0)
    after = _eps(out, dense, mean).abs()
    assert (after <= before + 1e-5).all() and (after < before - 1e-3).sum() > 32
    assert ((out == 0).sum(1) == (w == 0).sum(1)).all()
    assert ((out == 0) | (out == dense)).all()  # every weight is 0 or its dense value


def test_nm_variant_keeps_the_pattern():
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(32, 64, generator=g)
    mean, var = torch.randn(64, generator=g), torch.rand(64, generator=g) + 0.1
    w = dense.masked_fill(nm_mask(dense.abs(), 2, 4), 0.0)
    before = _eps(w, dense, mean).abs()
    out = dsnot_refine(w, dense, mean, var, torch.ones(64), update_threshold=0.0, m=4)
    assert ((out == 0).reshape(32, 16, 4).sum(-1) == 2).all()
    assert (_eps(out, dense, mean).abs() <= before + 1e-5).all()
    assert (out != w).any()


def test_dsnot_after_wanda_in_a_recipe(calib_ids):
    model = tiny_model("llama")
    base = tiny_model("llama")
    sparsify(base, [{"method": "wanda", "sparsity": 0.5}], calib_ids)
    report = sparsify(
        model,
        [{"method": "wanda", "sparsity": 0.5}, {"method": "dsnot", "update_threshold": 0.0}],
        calib_ids,
    )
    assert report.sparsity == pytest.approx(0.5, abs=1e-6)
    changed = sum(
        int((a != b).sum()) for a, b in zip(model.parameters(), base.parameters(), strict=True)
    )
    assert changed > 0  # DSnoT moved some weights
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib_ids[:1]).logits).all()


def test_dsnot_alone_starts_from_wanda_and_config_errors(calib_ids):
    model = tiny_model("llama")
    report = sparsify(model, [{"method": "dsnot", "sparsity": 0.6}], calib_ids)
    assert report.sparsity == pytest.approx(0.6, abs=0.01)
    with pytest.raises(SparseLLMError, match="max_cycles"):
        parse_recipe([{"method": "dsnot", "max_cycles": -1}])
