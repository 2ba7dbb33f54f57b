"""Saved activation sparsity reloads exactly; vanilla transformers sees the dense model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from sparsellm.api import load
from sparsellm.config import from_dict
from sparsellm.errors import SparseLLMError
from sparsellm.methods.activation.apply import sparsify_activations
from sparsellm.methods.activation.io import (
    STATE_FILE,
    activation_state,
    load_activation_state,
    save_with_activations,
)
from sparsellm.methods.activation.teal import TEALConfig
from sparsellm.models.tiny import byte_tokenizer, tiny_model
from tests.methods.activation.helpers import act_config


@pytest.mark.parametrize(
    ("method", "head"), [("wina", False), ("rsparse", False), ("cats", False), ("teal", True)]
)
def test_save_and_load_roundtrip(
    method: str, head: bool, calib_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = tiny_model("llama").eval()
    dense_ref = model(calib_ids).logits
    cfg = act_config(method, sparsity=0.5, max_tokens=256, head=head)
    sparsify_activations(model, calib_ids, cfg)
    sparse_ref = model(calib_ids).logits
    out = tmp_path / "m"
    save_with_activations(model, byte_tokenizer(), out, {}, cfg)
    assert torch.equal(model(calib_ids).logits, sparse_ref)  # still wrapped after saving

    loaded = load(out)
    assert loaded.info["activation"] == {**cfg.to_dict(), "method": method}
    assert from_dict(loaded.info["activation"], family="activation") == cfg
    # equal up to BLAS rounding (the reloaded low-rank factors sit at other addresses)
    torch.testing.assert_close(loaded.model(calib_ids).logits, sparse_ref, rtol=1e-5, atol=1e-6)
    vanilla = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(vanilla(calib_ids).logits, dense_ref)


def test_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(SparseLLMError, match="corrupt"):
        load_activation_state(tiny_model("llama"), tmp_path)
    assert load_activation_state(tiny_model("llama"), tmp_path / "none") is None


def test_state_written_before_method_configs_still_loads(
    calib_ids: torch.Tensor, tmp_path: Path
) -> None:
    """Files from before the config split stored `dataclasses.asdict` of the one old
    config (a `rank` for every method): they re-apply, and their mapping comes back as is."""
    model = tiny_model("llama").eval()
    sparsify_activations(model, calib_ids, TEALConfig(sparsity=0.5, max_tokens=256))
    sparse_ref = model(calib_ids).logits
    tensors, meta = activation_state(model, TEALConfig(sparsity=0.5, max_tokens=256))
    old = {"method": "teal", "sparsity": 0.5, "allocation": "greedy", "rank": 32}
    save_file(tensors, str(tmp_path / STATE_FILE), metadata={**meta, "config": json.dumps(old)})
    fresh = tiny_model("llama").eval()
    assert load_activation_state(fresh, tmp_path) == old
    assert torch.equal(fresh(calib_ids).logits, sparse_ref)
