import pytest
import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.base import Hessian
from sparsellm.methods.weights.masks import nm_mask, unstructured_mask
from sparsellm.methods.weights.sparsegpt import (
    SparseGPT,
    SparseGPTConfig,
    inverse_hessian_factor,
    sparsegpt_prune,
)


def _recon_error(w, w_hat, x):
    return ((x @ w.t() - x @ w_hat.t()) ** 2).sum().item()


def _correlated_inputs(tokens=512, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, dim // 4, generator=g)
    mix = torch.randn(dim // 4, dim, generator=g)
    return base @ mix + 0.1 * torch.randn(tokens, dim, generator=g)


def test_two_weight_obs_update_hand_computed():
    # Minimising (w - ŵ)ᵀ H (w - ŵ) with ŵ0 = 0 gives ŵ1 = w1 + w0 * H01 / H11.
    h = torch.tensor([[2.0, 0.6], [0.6, 1.0]])
    w = torch.tensor([[0.1, 1.0]])
    out = sparsegpt_prune(w, h, sparsity=0.5, dampening=1e-9)
    assert out[0, 0] == 0
    assert out[0, 1].item() == pytest.approx(1.0 + 0.1 * 0.6 / 1.0, rel=1e-5)


def test_identity_hessian_reduces_to_magnitude():
    w = torch.randn(8, 32)
    out = sparsegpt_prune(w, torch.eye(32), sparsity=0.5, blocksize=32)
    expected = w.masked_fill(unstructured_mask(w.abs(), 0.5, per="layer"), 0.0)
    assert torch.allclose(out, expected, atol=1e-6)
    out_nm = sparsegpt_prune(w, torch.eye(32), sparsity=0.5, n=2, m=4)
    assert torch.allclose(out_nm, w.masked_fill(nm_mask(w.abs(), 2, 4), 0.0), atol=1e-6)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_beats_magnitude_and_is_exactly_sparse(pattern):
    x = _correlated_inputs()
    w = torch.randn(48, 64)
    stats = Hessian(64)
    stats.update(x)
    pruner = SparseGPT(
        SparseGPTConfig(
            sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern, blocksize=16
        )
    )
    out = pruner.prune(w, stats)
    assert (out == 0).float().mean().item() == pytest.approx(0.5, abs=1e-9)
    if pattern != "unstructured":
        n, m = map(int, pattern.split(":"))
        assert ((out == 0).view(48, -1, m).sum(-1) == n).all()
        mag = w.masked_fill(nm_mask(w.abs(), n, m), 0.0)
    else:
        mag = w.masked_fill(unstructured_mask(w.abs(), 0.5), 0.0)
    assert _recon_error(w, out, x) < 0.7 * _recon_error(w, mag, x)


def test_dead_inputs_are_pruned_and_singular_hessian_handled():
    x = _correlated_inputs(dim=32)
    x[:, 5] = 0.0
    stats = Hessian(32)
    stats.update(x)
    out = sparsegpt_prune(torch.randn(4, 32), stats.value, sparsity=0.25)
    assert (out[:, 5] == 0).all()
    assert torch.isfinite(out).all()


def test_not_positive_definite_raises_clear_error():
    h = -torch.eye(8)
    with pytest.raises(SparseLLMError, match="positive definite"):
        sparsegpt_prune(torch.randn(2, 8), h, sparsity=0.5)


def test_hessian_does_not_depend_on_batching():
    """Per-window fp32 partials summed in fp64: 1 window per update == 8 windows per update,
    bit for bit, and both match an fp64 reference to fp32 rounding."""
    from sparsellm.methods.weights.base import Hessian, RowNormSq

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 48, generator=gen) * torch.logspace(-2, 2, 48)
    one, eight = Hessian(48), Hessian(48)
    for window in x.split(1):
        one.update(window)
    eight.update(x)
    assert torch.equal(one.value, eight.value)
    ref = torch.einsum("bti,btj->ij", x.double(), x.double()) / (8 * 64)
    torch.testing.assert_close(
        one.value.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item()
    )
    a, b = RowNormSq(48), RowNormSq(48)
    for window in x.split(1):
        a.update(window)
    b.update(x)
    assert torch.equal(a.value, b.value)


def test_sparsegpt_same_masks_for_any_calibration_batch(calib_ids):
    import sparsellm as sl
    from sparsellm.models.tiny import tiny_model

    masks = []
    for batch in (1, len(calib_ids)):
        model = tiny_model("llama")
        sl.sparsify(model, ["sparsegpt:sparsity=0.5"], calib_ids, batch_size=batch)
        masks.append([p == 0 for n, p in model.named_parameters() if "layers" in n])
    assert all(torch.equal(a, b) for a, b in zip(*masks, strict=True))


def test_inverse_hessian_factor_is_the_cholesky_factor_of_the_damped_inverse() -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 13, dtype=torch.float64)
    h = (x.t() @ x / 40).float()
    h0 = h.clone()
    u = inverse_hessian_factor(h, 0.1)
    assert torch.equal(h, h0), "the caller's H is not modified"
    a = h.double() + 0.1 * h.double().diagonal().mean() * torch.eye(13, dtype=torch.float64)
    assert torch.equal(u, u.triu()) and (u.diagonal() > 0).all()
    torch.testing.assert_close(
        (u.double().t() @ u.double()) @ a, torch.eye(13, dtype=torch.float64), atol=1e-5, rtol=0
    )
    # the reference route of the paper's code gives the same factor
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(a)), upper=True)
    torch.testing.assert_close(u.double(), ref, atol=1e-5, rtol=1e-5)


def test_inverse_hessian_factor_raises_dampening_until_positive_definite() -> None:
    h = torch.diag(torch.tensor([1.0, 1.0, -1.5]))  # mean diag 1/6: λ = 0.01/6 fails
    u = inverse_hessian_factor(h, 0.01, retries=3)  # λ = 10/6 > 1.5 works
    lam = 10 / 6
    torch.testing.assert_close(
        u.diagonal(), torch.tensor([1 / (1 + lam), 1 / (1 + lam), 1 / (lam - 1.5)]).sqrt()
    )
    with pytest.raises(SparseLLMError, match="not positive definite"):
        inverse_hessian_factor(h, 0.01, retries=2)
