"""Compressed checkpoints: what `export` writes is what `load` and the runtime read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsellm as sl
from sparsellm.cli import main
from sparsellm.export.compressed import write_compressed
from sparsellm.formats import pack, unpack
from sparsellm.models.adapters import block_linears, get_blocks
from sparsellm.models.tiny import byte_tokenizer, tiny_config, tiny_model
from sparsellm.runtime.decode import DecodeRuntime
from tests.cli import last_json

PACKED = ("bf16", "int8", "int4", "sparse-bf16", "sparse-int8", "sparse-int4")


def _pruned(tied: bool = False) -> torch.nn.Module:
    """A tiny llama with 50% of every block weight zeroed (magnitude, per row)."""
    if tied:
        config = tiny_config("llama")
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    else:
        model = tiny_model("llama")
    with torch.no_grad():
        for block in get_blocks(model):
            for lin in block_linears(block).values():
                w = lin.weight
                w[w.abs() < w.abs().median(dim=1, keepdim=True).values] = 0
    return model


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fmt", PACKED)
@pytest.mark.usefixtures("fp32_activations")
def test_export_load_gives_the_packed_weights(tmp_path: Path, fmt: str, tied: bool) -> None:
    model = _pruned(tied)
    out, packed = write_compressed(model, byte_tokenizer(), tmp_path / fmt, fmt, {"k": 1})
    config = json.loads((out / "config.json").read_text())
    assert config["sparsellm_format"] == fmt
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # never pickle
    loaded = sl.load(out)
    assert loaded.info["format"] == fmt
    sparse = fmt.startswith("sparse-")
    for (name, a), b in zip(model.named_modules(), loaded.model.modules(), strict=True):
        if isinstance(a, torch.nn.Linear) and "layers" in name:
            assert torch.equal(b.weight, unpack(pack(a.weight, packed[name].kind, 128)))
            assert bool((b.weight[a.weight == 0] == 0).all())  # zeros stay zero
            assert packed[name].kind.startswith("sparse-") == sparse
    head = loaded.model.get_output_embeddings().weight
    assert (head.data_ptr() == loaded.model.get_input_embeddings().weight.data_ptr()) == tied
    ids = torch.randint(0, 256, (1, 12))
    # the runtime over the stored packs computes the loaded (dequantized) model
    rt = DecodeRuntime(loaded.model, max_len=32, packed=loaded.packed)
    with torch.no_grad():
        ref = loaded.model(ids).logits
    rt.reset(1)
    torch.testing.assert_close(rt.forward(ids, 0, sparse=False), ref, rtol=1e-4, atol=1e-4)
    rt.release_model_weights()  # prompt and decode steps run on the packs alone
    rt.reset(1)
    rt.forward(ids[:, :11], 0, sparse=False)
    step = rt.forward(ids[:, 11:], 11, sparse=False)  # one token: the native Decoder
    torch.testing.assert_close(step, ref[:, 11:], rtol=1e-4, atol=1e-4)


def test_export_cli_json_keys_and_hf_exact(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    for fmt in ("hf", "sparse-int8"):
        code = main(["export", str(tiny_dir), "--format", fmt, "--out", str(tmp_path / fmt),
                     "--no-eval", "--json"])  # fmt: skip
        assert code == 0
        summary = last_json(capsys)
        assert {"format", "bytes_on_disk", "dense_fp32_bytes", "block_linear_bytes_per_param",
                "quantized_ppl", "source_ppl"} <= summary.keys()  # fmt: skip
        files = [f for f in (tmp_path / fmt).iterdir() if f.name != "sparsellm_manifest.json"]
        assert summary["bytes_on_disk"] == sum(f.stat().st_size for f in files)
    src = AutoModelForCausalLM.from_pretrained(tiny_dir)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for a, b in zip(src.parameters(), back.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("fp32_activations")
def test_generate_greedy_equals_hf_generate(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """On the same (dequantized) weights, our runtime's greedy text is HF's."""
    out = tmp_path / "int8"
    assert main(["export", str(tiny_dir), "--format", "int8", "--out", str(out), "--no-eval"]) == 0
    capsys.readouterr()
    prompt = "sparse model weights"
    code = main(["generate", "--model", str(out), "--prompt", prompt, "--max-new-tokens", "12",
                 "--json"])  # fmt: skip
    assert code == 0
    got = last_json(capsys)
    assert {"text", "prefill_tok_s", "decode_tok_s", "format", "new_tokens"} <= got.keys()
    assert got["format"] == "int8"
    loaded = sl.load(out)
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    hf = loaded.model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    new = hf[0, ids.shape[1] :].tolist()
    stop = loaded.tokenizer.eos_token_id
    new = new[: new.index(stop)] if stop in new else new
    assert got["text"] == loaded.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "unreadable"),
        ("format", "unknown sparsellm_format"),
        ("index", "sparsellm.packed"),
    ],
)
def test_damaged_checkpoint_one_line_error(
    tiny_dir: Path, tmp_path: Path, capsys, damage: str, message: str
) -> None:
    out = tmp_path / "si8"
    assert main(["export", str(tiny_dir), "--format", "sparse-int8", "--out", str(out),
                 "--no-eval"]) == 0  # fmt: skip
    weights = out / "model.safetensors"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "format":
        cfg = json.loads((out / "config.json").read_text())
        cfg["sparsellm_format"] = "sparse-fp4"
        (out / "config.json").write_text(json.dumps(cfg))
    else:
        from safetensors.torch import load_file, save_file

        save_file(load_file(weights), weights, metadata={"other": "1"})
    capsys.readouterr()
    gen = tmp_path / "never"
    code = main(["export", str(out), "--format", "int8", "--out", str(gen), "--no-eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and err[-1].startswith("error:")
    assert not gen.exists()


def test_export_refuses_bad_input(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tiny_dir), "--format", "fp8", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code = main(["export", str(tiny_dir), "--format", "int8", "--out", str(busy), "--no-eval"])
    assert code == 2 and (busy / "keep.txt").read_text() == "mine"
    code = main(["export", str(tiny_dir), "--format", "gguf-q8_0", "--out",
                 str(tmp_path / "g"), "--no-eval"])  # fmt: skip
    assert code == 2 and "gguf" in capsys.readouterr().err


def test_export_refuses_a_shrunk_model(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """Per-layer widths live in config.json keys the compressed loader does not read."""
    cfg = json.loads((tiny_dir / "config.json").read_text())
    from sparsellm.methods.structured.io import SHAPES_KEY

    cfg[SHAPES_KEY] = []
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "never"
    code = main(["export", str(tiny_dir), "--format", "int8", "--out", str(out), "--no-eval"])
    assert code == 2 and "shrunk" in capsys.readouterr().err and not out.exists()
