import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsellm as sl
from sparsellm.errors import SparseLLMError
from sparsellm.export.hf import check_out_dir, check_replaceable
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


def test_refuses_non_empty_out_and_overwrites_a_previous_run_atomically(tmp_path):
    out = tmp_path / "out"
    model = tiny_model("gpt2")
    sl.save(model, None, out, {"run": 1})
    (out / "keep.txt").write_text("x")
    with pytest.raises(SparseLLMError, match="not empty"):
        sl.save(model, None, out, {"run": 2})
    assert json.loads((out / "sparsellm_manifest.json").read_text())["run"] == 1
    sl.save(model, None, out, {"run": 2}, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert json.loads((out / "sparsellm_manifest.json").read_text())["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_overwrite_replaces_an_empty_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert check_out_dir(out) == out
    sl.save(tiny_model("gpt2"), None, out, {"run": 1})
    assert (out / "config.json").exists()


def _victim(path):
    """`path` holding one unrelated file, which a refused overwrite must leave alone."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "precious.txt").write_text("keep me")
    return path


def _assert_refused(out, match):
    with pytest.raises(SparseLLMError, match=match):
        check_out_dir(out, overwrite=True)
    with pytest.raises(SparseLLMError, match=match):
        sl.save(tiny_model("gpt2"), None, out, {}, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_refuses_a_dir_of_unrelated_files(tmp_path):
    _assert_refused(_victim(tmp_path / "out"), "holds files but no sparsellm_manifest")


def test_overwrite_refuses_home_even_with_a_manifest(tmp_path, monkeypatch):
    home = _victim(tmp_path / "home")
    (home / "sparsellm_manifest.json").write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    _assert_refused(home, "it is the home directory")
    link = tmp_path / "link"  # symlinks are resolved
    link.symlink_to(home)
    _assert_refused(link, "it is the home directory")


def test_overwrite_refuses_cwd_and_its_parents(tmp_path, monkeypatch):
    cwd = _victim(tmp_path / "a" / "b")
    _victim(cwd.parent)
    for path in (cwd, cwd.parent):  # a manifest does not make them replaceable
        (path / "sparsellm_manifest.json").write_text("{}")
    monkeypatch.chdir(cwd)
    _assert_refused(Path("."), "it is the current directory")
    _assert_refused(Path(".."), "it is a parent of the current directory")
    empty = tmp_path / "c"
    empty.mkdir()
    monkeypatch.chdir(empty)  # even empty, the working directory is never replaced
    with pytest.raises(SparseLLMError, match="it is the current directory"):
        check_out_dir(".", overwrite=True)


def test_save_checks_out_again_right_before_replacing_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()  # empty when the save starts: allowed
    model = tiny_model("gpt2")
    original = model.save_pretrained

    def save_and_meanwhile_fill_out(*args, **kwargs):
        _victim(out)
        original(*args, **kwargs)

    monkeypatch.setattr(model, "save_pretrained", save_and_meanwhile_fill_out)
    with pytest.raises(SparseLLMError, match="holds files but no sparsellm_manifest"):
        sl.save(model, None, out, {}, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_overwrite_refuses_the_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # "/" is refused as the root, not only as a cwd parent
    with pytest.raises(SparseLLMError, match="it is the filesystem root"):
        check_out_dir("/", overwrite=True)
    with pytest.raises(SparseLLMError, match="it is the filesystem root"):
        check_replaceable("/")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")

    def fail(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        sl.save(model, None, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []
