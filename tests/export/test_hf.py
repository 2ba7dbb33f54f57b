import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsellm as sl
from sparsellm.errors import SparseLLMError
from sparsellm.models.tiny import byte_tokenizer, tiny_model


def test_save_load_round_trip_identical_logits(tmp_path, calib_ids):
    model = tiny_model("llama")
    report = sl.sparsify(model, [{"method": "wanda", "pattern": "2:4"}], calib_ids)
    out = sl.save(model, byte_tokenizer(), tmp_path / "out", {"layers": report.layers})
    assert {"config.json", "model.safetensors", "sparsellm_manifest.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    manifest = json.loads((out / "sparsellm_manifest.json").read_text())
    assert manifest["versions"]["torch"] == torch.__version__
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = sl.load(out)
    with torch.no_grad():
        ref = model(input_ids=calib_ids).logits
        assert torch.equal(plain(input_ids=calib_ids).logits, ref)
        assert torch.equal(ours.model(input_ids=calib_ids).logits, ref)
    assert ours.info["manifest"]["layers"].keys() == report.layers.keys()
    assert (plain.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5


def test_refuses_non_empty_out_and_overwrites_atomically(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    model = tiny_model("gpt2")
    with pytest.raises(SparseLLMError, match="not empty"):
        sl.save(model, None, out, {})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    sl.save(model, None, out, {}, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")

    def fail(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        sl.save(model, None, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []
