"""GGUF de-quantised tensor by tensor equals the model it was written from, and
transformers' own whole-model load of the same file."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from sparsellm.errors import SparseLLMError
from sparsellm.export.gguf import _permute
from sparsellm.models.gguf_stream import write_dequantized
from sparsellm.models.shards import INDEX
from sparsellm.models.tiny import tiny_model


def _write_llama_gguf(model: torch.nn.Module, path: Path, drop: str | None = None) -> None:
    """`model` as an F32 llama GGUF, named and permuted the way llama.cpp's converter
    writes it (no tokenizer: the conversion of tensors does not read one)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        base, _, suffix = name.rpartition(".")
        target = f"{names.get_name(base)}.{suffix}"
        if target == drop:
            continue
        if target.endswith("attn_q.weight"):
            t = _permute(t, cfg.num_attention_heads)
        elif target.endswith("attn_k.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        w.add_tensor(target, t.float().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("shard_bytes", [1 << 30, 40_000])
def test_streamed_dequantisation_equals_the_source(tmp_path: Path, shard_bytes: int) -> None:
    model = tiny_model("llama", seed=1, layers=2)
    path = tmp_path / "m.gguf"
    _write_llama_gguf(model, path)
    config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    out = tmp_path / "out"
    out.mkdir()
    assert write_dequantized(path, out, config, shard_bytes=shard_bytes) == "LlamaForCausalLM"
    if shard_bytes < 1 << 30:
        files = json.loads((out / INDEX).read_text())["weight_map"]
        got = {}
        for shard in sorted(set(files.values())):
            got.update(load_file(out / shard))
        assert len(set(files.values())) > 2
    else:
        got = load_file(out / "model.safetensors")
    want = model.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v.float()), k
    # transformers' whole-model GGUF load reads the same values
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=1, layers=2)
    path = tmp_path / "m.gguf"
    _write_llama_gguf(model, path, drop="blk.1.ffn_up.weight")
    config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    (tmp_path / "out").mkdir()
    with pytest.raises(SparseLLMError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        write_dequantized(path, tmp_path / "out", config)


def test_a_tied_head_needs_no_tensor_of_its_own(tmp_path: Path) -> None:
    """llama.cpp writes no ``output.weight`` when the head is the embeddings: the
    conversion must accept that (the default model is such a file)."""
    model = tiny_model("llama", seed=1, layers=2)
    path = tmp_path / "m.gguf"
    _write_llama_gguf(model, path, drop="output.weight")
    config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    config.tie_word_embeddings = True
    (tmp_path / "out").mkdir()
    write_dequantized(path, tmp_path / "out", config)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in got
    assert torch.equal(
        got["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"]
    )
