"""Calibration, wrapping and unwrapping on tiny random models, checked on behaviour:
what the wrapped matmuls actually receive, and outputs computed by hand."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.config import MethodConfig
from sparsellm.errors import SparseLLMError
from sparsellm.methods.activation.apply import sparsify_activations
from sparsellm.methods.activation.cats import CATSConfig
from sparsellm.methods.activation.modules import (
    ActSparseLinear,
    ThresholdedActivation,
    activations_dense,
    keep_channels,
    measured_sparsity,
    reset_counts,
    unwrap_activations,
    wrapped_modules,
)
from sparsellm.methods.activation.rsparse import RSparse, RSparseConfig
from sparsellm.methods.activation.teal import TEAL, TEALConfig
from sparsellm.methods.activation.thresholds import quantile_threshold
from sparsellm.methods.activation.wina import WINA, WINAConfig
from sparsellm.models.tiny import tiny_model
from tests.methods.activation.helpers import act_config

METHODS = ["teal", "wina", "rsparse", "cats"]


def _watch(mod: nn.Module, tally: list[float]) -> list[Any]:
    """Hooks adding one wrapper's skipped and total weight reads to `tally`: a channel
    is skipped when nonzero going in but zero where the wrapped matmul reads it (the
    base linear's input; for CATS, the gate activation after the cut)."""
    w = mod.weights_per_channel
    before: list[torch.Tensor] = []

    def add(ref: torch.Tensor, got: torch.Tensor) -> None:
        tally[0] += w * float(((got == 0) & (ref != 0)).sum())
        tally[1] += w * ref.numel()

    if isinstance(mod, ActSparseLinear):
        return [
            mod.register_forward_pre_hook(lambda _m, args: before.append(args[0])),
            mod.base_layer.register_forward_pre_hook(lambda _m, args: add(before.pop(), args[0])),
        ]
    return [
        mod.base_layer.register_forward_hook(lambda _m, _a, out: before.append(out)),
        mod.register_forward_hook(lambda _m, _a, out: add(before.pop(), out)),
    ]


@contextmanager
def skipped_reads(model: nn.Module) -> Iterator[list[float]]:
    """Measure the share of weight reads skipped, independently of the wrappers' own
    counters; yields [skipped, total] (weighted by the weights each channel carries),
    filled while the model runs."""
    tally = [0.0, 0.0]
    handles = [h for _, mod in wrapped_modules(model) for h in _watch(mod, tally)]
    try:
        yield tally
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_gives_identical_logits(method: str, calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    ref = model(calib_ids).logits
    sparsify_activations(model, calib_ids, act_config(method, sparsity=0.0, max_tokens=256))
    wrappers = [m for _, m in wrapped_modules(model)]
    assert wrappers and all(float(m.threshold) == 0.0 for m in wrappers)  # "off"
    assert torch.equal(model(calib_ids).logits, ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("allocation", ["greedy", "uniform"])
def test_skipped_share_on_calibration_data_is_the_target(
    method: str, allocation: str, calib_ids: torch.Tensor
) -> None:
    """The calibration tokens, run again through the sparse model, skip 40% of the
    thresholded weight reads (thresholds are quantiles of exactly these activations)."""
    model = tiny_model("qwen2").eval()
    cfg = act_config(method, sparsity=0.4, allocation=allocation, max_tokens=256)
    sparsify_activations(model, calib_ids, cfg)
    reset_counts(model)
    with skipped_reads(model) as tally, torch.no_grad():
        model(calib_ids)
    assert tally[0] / tally[1] == pytest.approx(0.4, abs=0.01)
    # the wrappers' own counters (what reports print) agree with what the matmuls got
    assert measured_sparsity(model) == pytest.approx(tally[0] / tally[1], abs=1e-9)


def test_unwrap_restores_the_dense_model(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    ref = model(calib_ids).logits
    sparsify_activations(model, calib_ids, act_config("rsparse", sparsity=0.5, max_tokens=256))
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
    cfg = act_config(method, sparsity=0.4, max_tokens=256, head=True)
    info = sparsify_activations(model, calib_ids, cfg)
    head = model.get_output_embeddings()
    assert isinstance(head, ActSparseLinear) and info["head"]["level"] == 0.4
    assert info["method"] == method
    reset_counts(model)
    with skipped_reads(model) as tally, torch.no_grad():
        model(calib_ids)
    assert tally[0] / tally[1] == pytest.approx(0.4, abs=0.01)
    assert 1 - head.kept / head.seen == pytest.approx(0.4, abs=0.02)  # the head on its own
    unwrap_activations(model)
    assert torch.equal(model(calib_ids).logits, ref)


def test_head_with_a_gate_method_fails_before_any_work(calib_ids: torch.Tensor) -> None:
    # the check comes first: on an unsupported model it is still the error raised
    with pytest.raises(SparseLLMError, match="head sparsity needs an input method, not 'cats'"):
        sparsify_activations(tiny_model("gpt2"), calib_ids, CATSConfig(head=True))
    model = tiny_model("llama").eval()
    with pytest.raises(SparseLLMError, match="input method"):
        sparsify_activations(model, calib_ids, CATSConfig(head=True))
    assert not any(True for _ in wrapped_modules(model))


# a 3x4 weight (out=3, in=4) whose column norms are whole: 5, 2, 3, 10
W34 = torch.tensor([[3.0, 0.0, 1.0, 6.0], [4.0, 0.0, 2.0, 0.0], [0.0, 2.0, 2.0, 8.0]])
X4 = torch.tensor([[1.0, -3.0, 1.0, 0.25]])


def test_wina_scores_are_abs_x_times_column_norm_by_hand() -> None:
    scale = WINA(WINAConfig()).channel_scale(W34)
    assert scale.tolist() == [5.0, 2.0, 3.0, 10.0]
    scores = X4.abs() * scale  # |x| · ||W[:, i]||: 1·5, 3·2, 1·3, 0.25·10
    assert scores.tolist() == [[5.0, 6.0, 3.0, 2.5]]
    thr = quantile_threshold(scores, 0.5)  # the 2nd smallest: 3
    assert thr == 3.0
    lin = nn.Linear(4, 3, bias=False)
    lin.weight.data = W34.clone()
    wrapped = ActSparseLinear(lin, thr, scale)
    assert wrapped.keep_mask(X4).tolist() == [[True, True, False, False]]
    # y = W[:, :2] x[:2] = (3·1 + 0·-3, 4·1 + 0·-3, 0·1 + 2·-3)
    assert wrapped(X4).tolist() == [[3.0, 4.0, -6.0]]
    # TEAL on the same input keeps by |x| alone: only channel 1 (|x| > the median 1)
    assert TEAL(TEALConfig()).channel_scale(W34) is None
    teal_thr = quantile_threshold(X4.abs(), 0.5)
    assert keep_channels(X4, teal_thr, None).tolist() == [[False, True, False, False]]


def test_wina_judges_fused_projections_by_the_fused_column_norm(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    attn = model.model.layers[0].self_attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    sparsify_activations(model, calib_ids, act_config("wina", sparsity=0.5, max_tokens=256))
    x = torch.randn(5, fused.shape[1])
    masks = [p.keep_mask(x) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    expected = x.abs() * fused.norm(dim=0) > attn.q_proj.threshold
    assert torch.equal(masks[0], expected)


def test_rsparse_factors_by_hand() -> None:
    # rank 1 of diag(3, 1) keeps the larger direction only
    a, b = RSparse(RSparseConfig(rank=1)).low_rank(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(a @ b, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    # a rank-1 matrix u vᵀ is reproduced exactly at rank 1
    w = torch.tensor([[1.0], [2.0], [3.0]]) @ torch.tensor([[1.0, 2.0]])
    a, b = RSparse(RSparseConfig(rank=1)).low_rank(w)
    assert a.shape == (3, 1) and b.shape == (1, 2)
    torch.testing.assert_close(a @ b, w)


def test_rsparse_at_full_rank_recovers_the_dense_model(calib_ids: torch.Tensor) -> None:
    """With rank = min(out, in) of every projection (64 here) the low-rank path is W
    itself, so skipping half of the channels changes nothing: each projection's own
    slice of the fused factors must be right for the logits to match."""
    model = tiny_model("llama").eval()
    ref = model(calib_ids).logits
    cfg = act_config("rsparse", sparsity=0.5, rank=64, max_tokens=256)
    sparsify_activations(model, calib_ids, cfg)
    reset_counts(model)
    with torch.no_grad():
        got = model(calib_ids).logits
    assert measured_sparsity(model) == pytest.approx(0.5, abs=0.01)  # channels were skipped
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_cats_cuts_the_gate_activation_of_the_mlp_by_hand(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    sparsify_activations(model, calib_ids, act_config("cats", sparsity=0.5, max_tokens=256))
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.act_fn, ThresholdedActivation)
    assert not any(isinstance(m, ActSparseLinear) for m in mlp.modules())  # linears dense
    seen: dict[str, torch.Tensor] = {}
    handle = mlp.register_forward_hook(
        lambda _m, args, out: seen.update(x=args[0].reshape(-1, 64), y=out.reshape(-1, 64))
    )
    with torch.no_grad():
        model(calib_ids)
    handle.remove()
    x, thr = seen["x"], float(mlp.act_fn.threshold)
    a = F.silu(x @ mlp.gate_proj.weight.t())
    keep = a.abs() > thr
    # block 0 meets the calibration tokens exactly as calibrated: half the gates are cut
    assert 1 - keep.float().mean() == pytest.approx(0.5, abs=0.005)
    expected = ((a * keep) * (x @ mlp.up_proj.weight.t())) @ mlp.down_proj.weight.t()
    torch.testing.assert_close(seen["y"], expected, rtol=1e-5, atol=1e-6)


@dataclass(frozen=True)
class _OtherFamily(MethodConfig):
    name: ClassVar[str] = "not-activation"
    family: ClassVar[str] = "weights"


def test_unsupported_architecture_and_bad_config(calib_ids: torch.Tensor) -> None:
    with pytest.raises(SparseLLMError, match="activation sparsity does not support"):
        sparsify_activations(tiny_model("gpt2"), calib_ids, TEALConfig(max_tokens=256))
    with pytest.raises(SparseLLMError, match="is a weights method, not activation"):
        sparsify_activations(tiny_model("llama"), calib_ids, _OtherFamily())
    with pytest.raises(SparseLLMError, match="activation sparsity must be in"):
        TEALConfig(sparsity=1.2)
    with pytest.raises(SparseLLMError, match="allocation must be greedy or uniform"):
        WINAConfig(allocation="owl")
    with pytest.raises(SparseLLMError, match="rank must be >= 1"):
        RSparseConfig(rank=0)
