import pytest
import torch

from sparsellm.api import sparsify
from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.admm import admm_prune, gradual_mask, gradual_sparsity
from sparsellm.methods.weights.masks import Pattern, nm_mask, unstructured_mask
from sparsellm.methods.weights.sparsegpt import sparsegpt_prune
from sparsellm.models.tiny import tiny_model
from sparsellm.recipe import parse_recipe


def _inputs(tokens=512, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, dim // 4, generator=g)
    mix = torch.randn(dim // 4, dim, generator=g)
    return base @ mix + 0.1 * torch.randn(tokens, dim, generator=g)


def _error(w, w_hat, x):
    return ((x @ (w - w_hat).t()) ** 2).sum().item()


def _optimum(w0, a, pruned):
    """Per row, the exact minimiser of (w - w0) A (w - w0)ᵀ with w = 0 where pruned."""
    out = torch.zeros_like(w0, dtype=torch.float64)
    a, w0 = a.double(), w0.double()
    for r in range(w0.shape[0]):
        k, p = ~pruned[r], pruned[r]
        out[r, k] = w0[r, k] + torch.linalg.solve(a[k][:, k], a[k][:, p] @ w0[r, p])
    return out


def test_cubic_schedule_grows_to_the_target():
    levels = [gradual_sparsity(0.6, t, 5) for t in range(5)]
    assert levels == sorted(levels) and levels[-1] == pytest.approx(0.6)
    assert levels[0] == pytest.approx(0.6 * (1 - 0.8**3))


def test_gradual_nm_mask_is_exact_at_n_over_m_and_looser_before():
    scores = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gradual_mask(scores, 0.5, Pattern(2, 4)), nm_mask(scores, 2, 4))
    early = gradual_mask(scores, 0.25, Pattern(2, 4))
    assert int(early.sum()) == 16 and not (early & ~nm_mask(scores, 2, 4)).any()
    for pattern in (Pattern(), Pattern(2, 4)):  # the fast threshold agrees without ties
        fast = gradual_mask(scores, 0.3, pattern, exact=False)
        assert torch.equal(fast, gradual_mask(scores, 0.3, pattern))


def test_two_weights_hand_computed():
    # one row, prune w0 = 0.1: the optimum moves w1 by w0·A01/A11 (the OBS update).
    h = torch.tensor([[2.0, 0.6], [0.6, 1.0]])
    w = torch.tensor([[0.1, 1.0]])
    out = admm_prune(w, h, 0.5, iterations=300, mask_iterations=1, dampening=0.0)
    assert out[0, 0] == 0
    assert out[0, 1].item() == pytest.approx(1.0 + 0.1 * 0.6 / 1.0, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_fixed_mask_reaches_the_least_squares_optimum(seed):
    x = _inputs(seed=seed)
    h = x.t() @ x / len(x)
    w0 = torch.randn(6, 32, generator=torch.Generator().manual_seed(seed))
    pruned = unstructured_mask(torch.rand(6, 32, generator=torch.Generator().manual_seed(9)), 0.5)
    lam = 0.1  # dampening is relative to the normalised (unit) diagonal
    out = admm_prune(w0, h, 0.0, mask=pruned, iterations=2000, dampening=lam)
    d = h.diagonal().sqrt()
    expected = _optimum(w0, h + lam * torch.diag(d.square()), pruned)
    assert (out[pruned] == 0).all()
    assert torch.allclose(out.double(), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_update_on_sparsegpt_mask_never_worse_than_sparsegpt(seed, pattern):
    x = _inputs(dim=64, seed=seed)
    h = x.t() @ x
    w0 = torch.randn(32, 64, generator=torch.Generator().manual_seed(100 + seed))
    nm = (2, 4) if pattern == "2:4" else (0, 0)
    sgpt = sparsegpt_prune(w0, h, 0.6 if not nm[0] else 0.5, *nm, blocksize=16)
    out = admm_prune(w0, h, 0.0, mask=sgpt == 0, iterations=500, dampening=1e-4)
    assert torch.equal(out == 0, sgpt == 0)
    assert _error(w0, out, x) <= _error(w0, sgpt, x)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_gradual_admm_is_exactly_sparse_and_beats_one_shot_masks(pattern):
    x = _inputs(dim=64)
    h = x.t() @ x
    w0 = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    p = Pattern(2, 4) if pattern == "2:4" else Pattern()
    out = admm_prune(w0, h, 0.5, p)
    assert (out == 0).float().mean().item() == pytest.approx(0.5, abs=1e-9)
    if p.is_nm:
        assert ((out == 0).view(48, -1, 4).sum(-1) == 2).all()
    wanda = w0.abs() * h.diagonal().sqrt()
    mask = nm_mask(wanda, 2, 4) if p.is_nm else unstructured_mask(wanda, 0.5, "row")
    assert _error(w0, out, x) < 0.7 * _error(w0, w0.masked_fill(mask, 0.0), x)


def test_recipe_admm_update_after_sparsegpt_keeps_its_mask(calib_ids):
    base, model = tiny_model("llama"), tiny_model("llama")
    step = {"method": "sparsegpt", "sparsity": 0.6}
    sparsify(base, [step], calib_ids)
    report = sparsify(model, [step, {"method": "admm_update"}], calib_ids)
    assert report.sparsity == pytest.approx(0.6, abs=1e-3)
    moved = 0
    for a, b in zip(model.parameters(), base.parameters(), strict=True):
        if a.dim() == 2 and (b == 0).any():
            assert torch.equal(a == 0, b == 0)
            moved += int((a != b).sum())
    assert moved > 0
    alone = tiny_model("llama")
    assert sparsify(alone, [{"method": "admm", "pattern": "2:4"}], calib_ids).sparsity == 0.5


def test_config_errors():
    with pytest.raises(SparseLLMError, match="mask_iterations"):
        parse_recipe([{"method": "admm", "mask_iterations": 30, "iterations": 20}])
    with pytest.raises(SparseLLMError, match="rho"):
        parse_recipe([{"method": "admm", "rho": 0}])
