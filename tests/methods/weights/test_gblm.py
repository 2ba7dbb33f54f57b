import pytest
import torch

from sparsellm.api import sparsify
from sparsellm.calib.gradients import gradient_l2
from sparsellm.methods.weights.base import LayerContext, RowNormSq
from sparsellm.methods.weights.gblm import GBLM, GBLMConfig, gblm_score
from sparsellm.models.tiny import tiny_model


def test_score_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norm_sq = torch.tensor([4.0, 1.0])
    grad = torch.tensor([[0.1, 1.0], [0.0, 2.0]])
    # |W| (||x|| + G) = [[1 (2 + .1), 2 (1 + 1)], [3 (2 + 0), .5 (1 + 2)]]
    expected = torch.tensor([[2.1, 4.0], [6.0, 1.5]])
    assert torch.allclose(gblm_score(w, norm_sq, grad), expected)


def test_gradient_term_changes_the_mask_by_hand():
    # GBLM's rule (reference code, lib/prune.py): |W|·‖X_j‖ + |W|·G, lowest half per row.
    weight = torch.tensor([[1.0, 0.5, 2.0, -1.0]])
    stats = RowNormSq(4)
    stats.update(torch.tensor([[2.0, 1.0, 0.4, 3.0]]))  # one token: ‖X_j‖² = 4, 1, .16, 9
    grad = torch.tensor([[0.0, 4.0, 0.0, 0.0]])
    pruner = GBLM(GBLMConfig(sparsity=0.5))
    # Wanda alone, |W|·‖X_j‖ = [2, .5, .8, 3]: columns 1 and 2 go
    wanda = pruner.prune(weight, stats, LayerContext(grad=torch.zeros_like(grad)))
    assert torch.equal(wanda, torch.tensor([[1.0, 0.0, 0.0, -1.0]]))
    # with G: [1·(2+0), .5·(1+4), 2·(.4+0), 1·(3+0)] = [2, 2.5, .8, 3]: columns 2 and 0 go
    gblm = pruner.prune(weight, stats, LayerContext(grad=grad))
    assert torch.equal(gblm, torch.tensor([[0.0, 0.5, 0.0, -1.0]]))


def test_gradient_norms_match_per_sample_autograd(calib_ids):
    model = tiny_model("llama")
    down = model.model.layers[0].mlp.down_proj
    frozen = model.model.embed_tokens.weight
    frozen.requires_grad_(False)
    out = gradient_l2(model, calib_ids[:3], {"d": down}, scale=100.0)
    assert all(p.grad is None for p in model.parameters())  # no gradient memory left behind
    frozen_after = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen_after == ["model.embed_tokens.weight"]  # every flag restored
    manual = torch.zeros_like(down.weight)
    for ids in calib_ids[:3].split(1):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        manual += (100 * down.weight.grad).square()
    model.zero_grad()
    assert torch.allclose(out["d"], manual.sqrt(), rtol=1e-5, atol=1e-6)


def test_gblm_reduces_to_wanda_without_gradient_term(calib_ids):
    a, b = tiny_model("llama"), tiny_model("llama")
    sparsify(a, [{"method": "wanda", "sparsity": 0.5}], calib_ids)
    report = sparsify(b, [{"method": "gblm", "sparsity": 0.5, "grad_scale": 1e-20}], calib_ids)
    assert report.sparsity == pytest.approx(0.5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    c = tiny_model("llama")
    sparsify(c, [{"method": "gblm", "sparsity": 0.5}], calib_ids)
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


def test_activation_term_is_averaged_over_calibration_sequences():
    """As in the reference code, ‖X_j‖² is Σ x² / (number of sequences): two identical
    sequences give the same mask as one, where a plain sum would double the Wanda term
    against the gradient term and change the mask."""
    weight = torch.tensor([[1.0, 0.5, 2.0, -1.0]])
    grad = torch.tensor([[0.0, 4.0, 0.0, 0.0]])
    one, two = RowNormSq(4), RowNormSq(4)
    x = torch.tensor([[[2.0, 1.0, 0.4, 3.0]]])
    one.update(x)
    two.update(torch.cat([x, x]))  # two sequences of one token each
    assert torch.equal(two.per_window, one.per_window)
    pruner = GBLM(GBLMConfig(sparsity=0.5))
    ctx = LayerContext(grad=grad)
    assert torch.equal(pruner.prune(weight, two, ctx), pruner.prune(weight, one, ctx))
    # averaged: [2, .5·(1+4), 2·.4, 3] = [2, 2.5, .8, 3] keeps columns 1 and 3; the plain
    # sum (8, 2, .32, 18) would score [2.83, 2.71, 1.13, 4.24] and keep columns 0 and 3
    assert pruner.prune(weight, two, ctx)[0].nonzero().flatten().tolist() == [1, 3]
    plain = gblm_score(weight, two.value, grad)
    assert plain.argsort(dim=1)[0, 2:].tolist() == [0, 3]
