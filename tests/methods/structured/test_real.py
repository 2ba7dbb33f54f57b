"""The default model (SmolLM2-135M, tied embeddings, 9 heads / 3 KV heads). Marked `real`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsellm as sl
from sparsellm.methods.structured import apply_structured

pytestmark = pytest.mark.real


def test_default_model_rotation_exact_and_width_reloads(tmp_path: Path) -> None:
    model, tok = sl.load_model("default")
    ids = sl.calibration(tok, "c4", 2, 64)
    ref = model(ids).logits
    sliced = copy.deepcopy(model)
    apply_structured(sliced, "slicegpt:ratio=0", ids)
    assert torch.allclose(sliced(ids).logits, ref, atol=1e-3, rtol=1e-4)
    report = apply_structured(model, "obs:ratio=0.25", ids)
    assert report["uniform"] and 0.24 < report["measured_ratio"] < 0.26
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 6
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(again(ids).logits, model(ids).logits)
