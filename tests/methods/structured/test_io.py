"""Saved shrunk models reload with identical logits; configs describe the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsellm
from sparsellm.methods.structured import apply_structured
from sparsellm.methods.structured.common import head_dim
from sparsellm.methods.structured.io import SHAPES_KEY
from sparsellm.models.adapters import get_blocks
from sparsellm.models.tiny import tiny_model


def _check_config_matches(model: torch.nn.Module) -> None:
    cfg = model.config
    shapes = getattr(cfg, SHAPES_KEY, None)
    hd = head_dim(cfg)
    for i, block in enumerate(get_blocks(model)):
        s = (
            shapes[i]
            if shapes
            else {
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "intermediate_size": cfg.intermediate_size,
            }
        )
        assert block.self_attn.q_proj.weight.shape[0] == s["num_attention_heads"] * hd
        assert block.self_attn.k_proj.weight.shape[0] == s["num_key_value_heads"] * hd
        assert block.mlp.down_proj.weight.shape[1] == s["intermediate_size"]
    assert cfg.num_hidden_layers == len(get_blocks(model))


@pytest.mark.parametrize("method", ["obs", "depth"])
def test_uniform_reloads_with_vanilla_transformers(
    method: str, calib_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = tiny_model("qwen2")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    apply_structured(model, {"method": method, "ratio": 0.3}, calib_ids)
    _check_config_matches(model)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    _check_config_matches(again)
    assert torch.equal(again(calib_ids).logits, model(calib_ids).logits)


def test_per_layer_reloads_only_with_sparsellm(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = tiny_model("llama")
    apply_structured(model, "taylor:ratio=0.3,per_layer=true", calib_ids)
    assert getattr(model.config, SHAPES_KEY)
    _check_config_matches(model)
    model.save_pretrained(tmp_path)
    again = sparsellm.load(tmp_path).model
    _check_config_matches(again)
    assert torch.equal(again(calib_ids).logits, model(calib_ids).logits)
    with pytest.raises(Exception, match=r"(?i)size|shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
