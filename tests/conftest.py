"""Shared fixtures: seeded tiny models and a tiny on-disk model + corpus for CLI tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sparsellm.models.tiny import byte_tokenizer, tiny_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def fp32_activations() -> Iterator[None]:
    """The native kernels with fp32 activations: on CPUs with AVX-512 VNNI the int8 kinds
    otherwise multiply int8-quantized activations (tested against their own reference in
    tests/runtime/test_kernels.py), so the runtime no longer computes the dequantized
    model's function to fp32 rounding, which these tests pin."""
    from sparsellm.runtime.kernels import native_kernel

    mod = native_kernel()
    if mod is None or mod.isa() != "avx512vnni":
        yield
        return
    mod.set_isa("avx512")
    try:
        yield
    finally:
        mod.set_isa("auto")


@pytest.fixture
def calib_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (8, 32), generator=g)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved as a plain HF directory with a byte-level tokenizer."""
    d = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """~6 KB of deterministic text: enough for a few 64-byte windows."""
    words = ["sparse", "model", "weights", "prune", "layer", "token", "the", "of", "and"]
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, len(words), (1200,), generator=g).tolist()
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(words[i] for i in idx), encoding="utf-8")
    return path
