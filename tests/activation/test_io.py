"""Saved activation sparsity reloads exactly; vanilla transformers sees the dense model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsellm.activation.apply import sparsify_activations
from sparsellm.activation.base import ActivationConfig
from sparsellm.activation.io import STATE_FILE, load_activation_state, save_with_activations
from sparsellm.api import load
from sparsellm.errors import SparseLLMError
from sparsellm.models.tiny import byte_tokenizer, tiny_model


@pytest.mark.parametrize(
    ("method", "head"), [("wina", False), ("rsparse", False), ("cats", False), ("teal", True)]
)
def test_save_and_load_roundtrip(
    method: str, head: bool, calib_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = tiny_model("llama").eval()
    dense_ref = model(calib_ids).logits
    cfg = ActivationConfig(method=method, sparsity=0.5, rank=4, max_tokens=256, head=head)
    sparsify_activations(model, calib_ids, cfg)
    sparse_ref = model(calib_ids).logits
    out = tmp_path / "m"
    save_with_activations(model, byte_tokenizer(), out, {}, {"m": 1})
    assert torch.equal(model(calib_ids).logits, sparse_ref)  # still wrapped after saving

    loaded = load(out)
    assert loaded.info["activation"] == {"m": 1}
    # equal up to BLAS rounding (the reloaded low-rank factors sit at other addresses)
    torch.testing.assert_close(loaded.model(calib_ids).logits, sparse_ref, rtol=1e-5, atol=1e-6)
    vanilla = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(vanilla(calib_ids).logits, dense_ref)


def test_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(SparseLLMError, match="corrupt"):
        load_activation_state(tiny_model("llama"), tmp_path)
    assert load_activation_state(tiny_model("llama"), tmp_path / "none") is None
