import pytest
import torch

from sparsellm.api import sparsify
from sparsellm.calib.gradients import gradient_l2
from sparsellm.models.tiny import tiny_model
from sparsellm.weights.gblm import gblm_score


def test_score_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norm_sq = torch.tensor([4.0, 1.0])
    grad = torch.tensor([[0.1, 1.0], [0.0, 2.0]])
    # |W| (||x|| + G) = [[1 (2 + .1), 2 (1 + 1)], [3 (2 + 0), .5 (1 + 2)]]
    expected = torch.tensor([[2.1, 4.0], [6.0, 1.5]])
    assert torch.allclose(gblm_score(w, norm_sq, grad), expected)


def test_gradient_norms_match_per_sample_autograd(calib_ids):
    model = tiny_model("llama")
    down = model.model.layers[0].mlp.down_proj
    out = gradient_l2(model, calib_ids[:3], {"d": down}, scale=100.0)
    manual = torch.zeros_like(down.weight)
    for ids in calib_ids[:3].split(1):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        manual += (100 * down.weight.grad).square()
    model.zero_grad()
    assert torch.allclose(out["d"], manual.sqrt(), rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert all(p.grad is None for p in tiny_model("llama").parameters())


def test_gblm_reduces_to_wanda_without_gradient_term(calib_ids):
    a, b = tiny_model("llama"), tiny_model("llama")
    sparsify(a, [{"method": "wanda", "sparsity": 0.5}], calib_ids)
    report = sparsify(b, [{"method": "gblm", "sparsity": 0.5, "grad_scale": 1e-20}], calib_ids)
    assert report.sparsity == pytest.approx(0.5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    c = tiny_model("llama")
    sparsify(c, [{"method": "gblm", "sparsity": 0.5}], calib_ids)
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))
