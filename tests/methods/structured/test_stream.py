"""Streamed width pruning (`stream_shrink`, `shrink --stream`) equals the in-RAM run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sparsellm.config import from_dict
from sparsellm.errors import SparseLLMError
from sparsellm.methods.structured.base import apply_structured
from sparsellm.methods.structured.io import width_skeleton
from sparsellm.methods.structured.stream import stream_shrink
from sparsellm.models.shards import INDEX
from sparsellm.models.tiny import tiny_model


def _src(path: Path, family: str = "llama") -> Path:
    tiny_model(family, seed=1, layers=3).save_pretrained(path)
    return path


def _calib() -> torch.Tensor:
    return torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(3))


def _streamed(work: Path) -> dict[str, torch.Tensor]:
    index = json.loads((work / INDEX).read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        out.update(load_file(work / shard))
    return out


@pytest.mark.parametrize(
    ("family", "method", "heads"),
    [("llama", "activation", True), ("qwen2", "obs", True), ("llama", "spectral", False)],
)
def test_streamed_shrink_equals_in_ram(tmp_path: Path, family: str, method: str, heads: bool):
    src = _src(tmp_path / "src", family)
    cfg = from_dict({"method": method, "ratio": 0.3, "prune_heads": heads}, "structured")
    report = stream_shrink(src, tmp_path / "w", cfg, _calib(), batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = apply_structured(model, cfg, _calib(), batch_size=4)
    got, want = _streamed(tmp_path / "w"), model.state_dict()
    assert set(got) == set(want) - {"lm_head.weight"} or set(got) == set(want)
    for key, value in got.items():
        assert torch.equal(value, want[key]), key
    assert report["layer_shapes"] == ref["layer_shapes"]
    assert report["measured_ratio"] == pytest.approx(ref["measured_ratio"])
    assert report["block_params_after"] == ref["block_params_after"] < ref["block_params_before"]
    # the written config describes the new widths: plain transformers loads the output
    (tmp_path / "w" / "stream_state.json").unlink()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "w", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(ids).logits, model(ids).logits)
    skeleton_shapes = {n: p.shape for n, p in width_skeleton(tmp_path / "w").named_parameters()}
    assert skeleton_shapes == {n: p.shape for n, p in again.named_parameters()}


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"method": "taylor", "ratio": 0.2}, "taylor looks at the whole model"),
        ({"method": "activation", "ratio": 0.2, "per_layer": True}, "per_layer"),
        ({"method": "depth", "ratio": 0.2}, "depth looks at the whole model"),
    ],
)
def test_whole_model_methods_refuse_to_stream(tmp_path: Path, raw: dict, match: str) -> None:
    src = _src(tmp_path / "src")
    with pytest.raises(SparseLLMError, match=match):
        stream_shrink(src, tmp_path / "w", from_dict(raw, "structured"), _calib())
    assert not (tmp_path / "w").exists()


def test_cli_shrink_stream_matches_in_ram(tiny_dir, text_file, tmp_path, capsys) -> None:
    from sparsellm.cli import main
    from sparsellm.result import Result
    from tests.cli import cli_args, last_json

    results = {}
    for name, extra in (("ram", []), ("stream", ["--stream", "--max-memory", "1K"])):
        out = tmp_path / name
        method = ("--method", "obs", "--ratio", "0.3", "--json")
        assert main([*cli_args("shrink", tiny_dir, text_file, *method, out=out), *extra]) == 0
        results[name] = Result.from_dict(last_json(capsys))
    ram, streamed = results["ram"], results["stream"]
    assert not (tmp_path / "stream.partial").exists()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "ram").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for where, key in (("before", "ppl"), ("after", "ppl"), ("comparison", "kl")):
        assert streamed.metric(where, key) == pytest.approx(ram.metric(where, key), rel=1e-4)
    assert streamed.measured_sparsity == pytest.approx(ram.measured_sparsity)
    assert streamed.details["shrink"]["layer_shapes"] == ram.details["shrink"]["layer_shapes"]
    taylor = ("--method", "taylor", "--ratio", "0.2", "--stream")
    assert main(cli_args("shrink", tiny_dir, text_file, *taylor, out=tmp_path / "t")) == 2
    assert "cannot stream" in capsys.readouterr().err
    assert not (tmp_path / "t.partial").exists()
