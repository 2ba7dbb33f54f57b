from sparsellm.eval.memory import checkpoint_bytes


def test_checkpoint_bytes_counts_weight_files_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "extra.bin").write_bytes(b"x" * 10)
    (tmp_path / "config.json").write_text("{}" * 50)
    assert checkpoint_bytes(tmp_path) == 110
    assert checkpoint_bytes(tmp_path / "model.safetensors") == 100
    assert checkpoint_bytes("org/not-a-local-path") is None
