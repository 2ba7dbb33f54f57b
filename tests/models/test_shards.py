"""`copy_shard`: tensors copied as bytes from several source shards equal the originals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsellm.errors import SparseLLMError
from sparsellm.models.shards import INDEX, Checkpoint, copy_shard
from sparsellm.models.tiny import tiny_model


def _two_shards(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    src = tmp_path / "src"
    tiny_model("llama", seed=1, layers=2).save_pretrained(src)
    sd = load_file(src / "model.safetensors")
    names = sorted(sd)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    (src / "model.safetensors").unlink()
    save_file({k: sd[k] for k in first}, src / "a.safetensors")
    save_file({k: sd[k].to(torch.bfloat16) for k in second}, src / "b.safetensors")
    sd.update({k: sd[k].to(torch.bfloat16) for k in second})
    weight_map = {**{k: "a.safetensors" for k in first}, **{k: "b.safetensors" for k in second}}
    (src / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src, sd


def test_copy_shard_equals_the_source_tensors(tmp_path: Path) -> None:
    src, sd = _two_shards(tmp_path)
    names = [k for k in sd if "layers" not in k]  # from both shards
    assert len({Checkpoint(src).weight_map[k] for k in names}) == 2
    copy_shard(Checkpoint(src), names, tmp_path / "out.safetensors", chunk=100)
    got = load_file(tmp_path / "out.safetensors")
    assert sorted(got) == sorted(names)
    for k in names:
        assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]), k


def test_copy_shard_of_a_shrunk_source_fails_leaving_nothing(tmp_path: Path) -> None:
    src, _ = _two_shards(tmp_path)
    ckpt = Checkpoint(src)
    shard = src / "b.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])  # truncated after the checkpoint was opened
    names = [k for k, v in ckpt.weight_map.items() if v == "b.safetensors"]
    with pytest.raises(SparseLLMError, match="truncated"):
        copy_shard(ckpt, names, tmp_path / "out.safetensors")
    assert not list(tmp_path.glob("*out.safetensors*"))
