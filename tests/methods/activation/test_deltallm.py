"""DeltaLLM-style temporal deltas: the tracking rule by hand, calibration to a target,
and the wrapper's prefill/decode consistency, save/load and runtime refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsellm.api import load
from sparsellm.errors import SparseLLMError
from sparsellm.methods.activation.apply import sparsify_activations
from sparsellm.methods.activation.deltallm import (
    DeltaLLMConfig,
    calibrate_threshold,
    skipped_fraction,
    track_deltas,
)
from sparsellm.methods.activation.io import save_with_activations
from sparsellm.methods.activation.modules import (
    TemporalDeltaLinear,
    measured_sparsity,
    reset_counts,
    wrapped_modules,
)
from sparsellm.models.tiny import byte_tokenizer, tiny_model
from sparsellm.runtime.decode import DecodeRuntime


def test_tracking_rule_by_hand():
    x = torch.tensor([0.0, 0.5, 2.0, 2.2, 1.0]).view(1, 5, 1)
    x_hat, read = track_deltas(x, 1.0)
    # t1 moved 0.5 (kept 0), t2 moved 2 (refresh), t3 0.2, t4 exactly 1 (not > 1)
    assert x_hat.flatten().tolist() == [0.0, 0.0, 2.0, 2.0, 2.0]
    assert read.flatten().tolist() == [True, False, True, False, False]
    assert skipped_fraction(x, 1.0) == pytest.approx(0.75)  # 3 of the 4 after the first
    x_hat, read = track_deltas(torch.tensor([[[5.0]]]), 1.0, ref=torch.tensor([[2.0]]))
    assert x_hat.item() == 5.0 and read.item()  # a continued sequence: no dense first token


def test_calibrated_threshold_hits_the_target_on_its_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 16, generator=g).cumsum(1)  # random walks: small steps
    for target in (0.2, 0.5, 0.8):
        assert skipped_fraction(x, calibrate_threshold(x, target)) == pytest.approx(
            target, abs=0.01
        )
    assert calibrate_threshold(x, 0.0) == 0.0
    with pytest.raises(SparseLLMError):
        calibrate_threshold(x[:, :1], 0.5)


def test_config_allows_uniform_levels_only():
    with pytest.raises(SparseLLMError, match="uniform"):
        DeltaLLMConfig(allocation="greedy")
    with pytest.raises(SparseLLMError, match="head"):
        DeltaLLMConfig(head=True)


def _sparse(calib_ids: torch.Tensor, sparsity: float) -> torch.nn.Module:
    model = tiny_model("llama").eval()
    cfg = DeltaLLMConfig(sparsity=sparsity, max_tokens=256)
    sparsify_activations(model, calib_ids, cfg)
    return model


def test_sparsity_zero_gives_identical_logits(calib_ids):
    ref = tiny_model("llama").eval()(calib_ids).logits
    model = _sparse(calib_ids, 0.0)
    assert all(isinstance(m, TemporalDeltaLinear) for _, m in wrapped_modules(model))
    assert torch.equal(model(calib_ids).logits, ref)


def test_skips_about_the_target_on_calibration_data_and_changes_logits(calib_ids):
    dense = tiny_model("llama").eval()(calib_ids).logits
    model = _sparse(calib_ids, 0.4)
    reset_counts(model)
    with torch.no_grad():
        got = model(calib_ids).logits
    # every token but each sequence's first can skip: 40% of those, 31/32 of the tokens
    assert measured_sparsity(model) == pytest.approx(0.4 * 31 / 32, abs=0.03)
    assert not torch.allclose(got, dense, atol=1e-4)


def test_one_token_calls_continue_the_sequence_like_one_long_call():
    torch.manual_seed(0)
    wrapper = TemporalDeltaLinear(torch.nn.Linear(8, 4), threshold=0.5)
    x = torch.randn(1, 10, 8).cumsum(1)
    with torch.no_grad():
        full = wrapper(x)  # several tokens: a new sequence
        prefix = wrapper(x[:, :7])  # a new sequence again (prefill) ...
        steps = [wrapper(x[:, t : t + 1]) for t in range(7, 10)]  # ... then decode
    torch.testing.assert_close(torch.cat([prefix, *steps], 1), full)
    assert wrapper.seen == 2 * 10 * 8 and 0 < wrapper.kept < wrapper.seen


def test_save_load_roundtrip_and_runtime_refusal(calib_ids, tmp_path: Path):
    model = _sparse(calib_ids, 0.4)
    with torch.no_grad():
        ref = model(calib_ids).logits
    cfg = DeltaLLMConfig(sparsity=0.4, max_tokens=256)
    save_with_activations(model, byte_tokenizer(), tmp_path / "m", {}, cfg)
    loaded = load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(calib_ids).logits, ref)
    with pytest.raises(SparseLLMError, match="reference path"):
        DecodeRuntime(model)
