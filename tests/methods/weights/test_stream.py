"""Streamed pruning: bit-identical to the in-RAM step, resumable after kill -9, and
refusing bad checkpoints and foreign work directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsellm.calib.blockwise import STATE
from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.apply import apply_step
from sparsellm.methods.weights.sparsegpt import SparseGPTConfig
from sparsellm.methods.weights.stream import stream_prune
from sparsellm.methods.weights.wanda import WandaConfig
from sparsellm.models.shards import INDEX, Checkpoint
from sparsellm.models.tiny import tiny_model


def _save(family: str, path: Path, layers: int = 3) -> Path:
    tiny_model(family, seed=1, layers=layers).save_pretrained(path)
    return path


def _calib(n: int = 6, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(3))


def _in_ram(src: Path, cfg, calib, dtype=None) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    apply_step(model, cfg, calib, batch_size=4, calib_dtype=dtype)
    return model.state_dict()


def _streamed(work: Path) -> dict[str, torch.Tensor]:
    index = json.loads((work / INDEX).read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        out.update(load_file(work / shard))
    assert set(out) == set(index)
    return out


def _assert_same(streamed: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for key, value in streamed.items():
        assert torch.equal(value, ref[key]), key


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_streamed_equals_in_ram(tmp_path: Path, family: str) -> None:
    src = _save(family, tmp_path / "src")
    cfg, calib = SparseGPTConfig(sparsity=0.5), _calib()
    layers = stream_prune(src, tmp_path / "work", cfg, calib, batch_size=4)
    ref = _in_ram(src, cfg, calib)
    streamed = _streamed(tmp_path / "work")
    _assert_same(streamed, ref)
    # every tensor of the source is in the output, pruned ones at their sparsity
    assert set(streamed) == set(Checkpoint(src).weight_map)
    assert layers and all(abs(e["sparsity"] - 0.5) < 0.02 for e in layers.values())


def test_mapped_bf16_activations_equal_in_ram(tmp_path: Path) -> None:
    """Activations spilled to memory maps (max_memory exceeded), calibrated in bf16."""
    src = _save("qwen2", tmp_path / "src")
    cfg, calib = WandaConfig(sparsity=0.6), _calib()
    stream_prune(
        src, tmp_path / "w", cfg, calib, batch_size=4, calib_dtype=torch.bfloat16, max_memory=1
    )
    _assert_same(_streamed(tmp_path / "w"), _in_ram(src, cfg, calib, torch.bfloat16))
    assert not list((tmp_path / "w").glob("hidden-*"))  # spill files removed when done


_CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    import sparsellm.calib.blockwise as engine
    from sparsellm.methods.weights.stream import stream_prune
    from sparsellm.methods.weights.sparsegpt import SparseGPTConfig
    src, work, where, block, max_memory = sys.argv[1:6]
    real_shard, real_advance = engine.write_shard, engine.Activations.advance
    def kill(point, i):
        if point == where and i == int(block):
            os.kill(os.getpid(), signal.SIGKILL)
    def write_shard(path, tensors):
        kill("before-shard", int(path.name[6:11]) - 1)
        real_shard(path, tensors)
        kill("after-shard", int(path.name[6:11]) - 1)
    advanced = []
    def advance(self):
        real_advance(self)
        kill("after-advance", len(advanced))
        advanced.append(1)
    engine.write_shard, engine.Activations.advance = write_shard, advance
    calib = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(3))
    mm = None if max_memory == "none" else int(max_memory)
    stream_prune(src, work, SparseGPTConfig(sparsity=0.5), calib, batch_size=4,
                        max_memory=mm)
    """
)


@pytest.mark.parametrize(
    ("where", "block", "max_memory"),
    [
        ("after-shard", 1, "none"),
        ("after-advance", 2, "1"),
        ("before-shard", 0, "1"),
        ("after-shard", 3, "none"),
    ],
)
def test_killed_and_resumed_is_bit_identical(
    tmp_path: Path, where: str, block: int, max_memory: str
) -> None:
    src = _save("llama", tmp_path / "src", layers=4)
    work = tmp_path / "work"
    args = [sys.executable, "-c", _CHILD, str(src), str(work), where, str(block), max_memory]
    killed = subprocess.run(args, capture_output=True, text=True, env=os.environ.copy())
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (work / INDEX).exists()  # never looks complete
    mm = None if max_memory == "none" else int(max_memory)
    cfg, calib = SparseGPTConfig(sparsity=0.5), _calib()
    stream_prune(src, work, cfg, calib, batch_size=4, max_memory=mm)
    _assert_same(_streamed(work), _in_ram(src, cfg, calib))
    assert json.loads((work / STATE).read_text())["complete"]


def test_resume_refuses_another_command(tmp_path: Path) -> None:
    src = _save("llama", tmp_path / "src", layers=2)
    stream_prune(src, tmp_path / "w", SparseGPTConfig(sparsity=0.5), _calib(), batch_size=4)
    with pytest.raises(SparseLLMError, match=r"different command.*step"):
        stream_prune(src, tmp_path / "w", SparseGPTConfig(sparsity=0.6), _calib(), batch_size=4)
    with pytest.raises(SparseLLMError, match="calib_sha256"):
        stream_prune(src, tmp_path / "w", SparseGPTConfig(sparsity=0.5), _calib(n=4), batch_size=4)


def test_bad_checkpoints(tmp_path: Path) -> None:
    src = _save("llama", tmp_path / "src", layers=2)
    cfg = WandaConfig()
    shard = src / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(SparseLLMError, match="truncated"):
        stream_prune(src, tmp_path / "w1", cfg, _calib())
    assert not (tmp_path / "w1").exists()  # refused before any output
    from safetensors.torch import save_file

    full = tiny_model("llama", seed=1, layers=2).state_dict()
    del full["model.layers.1.mlp.down_proj.weight"]
    save_file({k: v.contiguous() for k, v in full.items() if k != "lm_head.weight"}, shard)
    with pytest.raises(SparseLLMError, match=r"block 1 has no tensor.*down_proj"):
        stream_prune(src, tmp_path / "w2", cfg, _calib())


def test_refuses_whole_model_steps(tmp_path: Path) -> None:
    src = _save("llama", tmp_path / "src", layers=2)
    with pytest.raises(SparseLLMError, match="cannot stream"):
        stream_prune(src, tmp_path / "w", WandaConfig(allocation="owl"), _calib())


def test_cli_stream_matches_in_ram_run(tiny_dir, text_file, tmp_path, capsys) -> None:
    """`prune --stream` saves the in-RAM run's weights, and its block-by-block evaluation
    gives the in-RAM perplexities and KL."""
    from sparsellm.cli import main
    from sparsellm.result import Result
    from tests.cli import cli_args, last_json

    outs = {}
    for name, extra in (("ram", []), ("stream", ["--stream", "--max-memory", "1K"])):
        out = tmp_path / name
        args = cli_args("prune", tiny_dir, text_file, "--method", "sparsegpt", "--json", out=out)
        assert main([*args, *extra]) == 0
        outs[name] = (Result.from_dict(last_json(capsys)), out)
    (ram, ram_dir), (streamed, stream_dir) = outs["ram"], outs["stream"]
    assert Result.read(stream_dir) == streamed
    assert not (tmp_path / "stream.partial").exists()
    assert not (stream_dir / STATE).exists()
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(ram_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(stream_dir).state_dict()
    _assert_same(b, a)
    for where, key in (("before", "ppl"), ("after", "ppl"), ("comparison", "kl")):
        assert streamed.metric(where, key) == pytest.approx(ram.metric(where, key), rel=1e-4)
    assert streamed.measured_sparsity == pytest.approx(ram.measured_sparsity)
    assert streamed.sparsity["layers"].keys() == ram.sparsity["layers"].keys()


def test_cli_stream_bad_input(tiny_dir, text_file, tmp_path, capsys) -> None:
    from sparsellm.cli import main
    from tests.cli import cli_args

    base = cli_args("prune", tiny_dir, text_file, out=tmp_path / "o")
    for extra, msg in (
        (["--stream", "--speed"], "--speed needs the model in RAM"),
        (["--stream", "--export", "int8"], "--export needs the model in RAM"),
        (["--max-memory", "1G"], "add --stream"),
        (["--stream", "--max-memory", "lots"], "expected a size"),
    ):
        assert main([*base, *extra]) == 2
        assert msg in capsys.readouterr().err


def test_disk_full_leaves_a_resumable_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard write that fails (ENOSPC) is a one-line error, leaves no partial file, and
    the same call afterwards finishes with the weights of an uninterrupted run."""
    import errno

    import sparsellm.models.shards as shards

    src = _save("llama", tmp_path / "src", layers=3)
    cfg, calib, work = SparseGPTConfig(sparsity=0.5), _calib(), tmp_path / "w"
    real = shards.save_file
    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second block's shard
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(shards, "save_file", full_disk)
    with pytest.raises(SparseLLMError, match=r"No space left on device.*rerun the same command"):
        stream_prune(src, work, cfg, calib, batch_size=4)
    assert not list(work.glob(".*.tmp")) and not (work / INDEX).exists()
    assert json.loads((work / STATE).read_text())["done"] == 1
    monkeypatch.setattr(shards, "save_file", real)
    stream_prune(src, work, cfg, calib, batch_size=4)
    _assert_same(_streamed(work), _in_ram(src, cfg, calib))


def test_cli_streams_by_itself_when_the_model_does_not_fit(
    tiny_dir, text_file, tmp_path, capsys, monkeypatch
) -> None:
    import sparsellm.eval.memory as memory
    from sparsellm.cli import main
    from tests.cli import cli_args

    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    out = tmp_path / "o"
    assert main(cli_args("prune", tiny_dir, text_file, "--method", "wanda", out=out)) == 0
    assert "pruning streamed (--stream)" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.real
def test_cli_stream_tasks_match_in_ram(tiny_dir, text_file, tmp_path, capsys) -> None:
    """`--tasks` on a streamed run (zero-shot request files, generated long-context
    samples) score both models block by block to the in-RAM run's metrics."""
    from sparsellm.cli import main
    from sparsellm.result import Result
    from tests.cli import cli_args, last_json

    tasks = ["--tasks", "arc_easy,naturalqs_open,passkey", "--limit", "3"]
    tasks += ["--longctx-lengths", "300", "--longctx-samples", "2", "--method", "wanda"]
    results = {}
    for name, extra in (("ram", []), ("stream", ["--stream"])):
        args = cli_args("prune", tiny_dir, text_file, *tasks, "--json", out=tmp_path / name)
        assert main([*args, *extra]) == 0
        results[name] = Result.from_dict(last_json(capsys))
    for side in ("before", "after"):
        ram, streamed = (results[k].metric(side, "tasks") for k in ("ram", "stream"))
        assert set(streamed) == {"arc_easy", "naturalqs_open", "passkey"}
        for task, metrics in ram.items():
            for key, value in metrics.items():
                if isinstance(value, float):
                    assert streamed[task][key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
                else:
                    assert streamed[task][key] == value, key
