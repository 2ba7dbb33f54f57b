"""Save a (sparse) model as a plain HF directory, atomically, with a manifest.

The directory holds `config.json`, `model.safetensors`, the tokenizer and
`sparsellm_manifest.json` (recipe, seeds, data, versions, per-layer sparsity), so
`AutoModelForCausalLM.from_pretrained(out)` works with zeros in place and every number
can be traced back. The model is written to a temporary sibling directory and renamed
into place, so an interrupted save never leaves a half-written model at `out`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparsellm.errors import SparseLLMError

MANIFEST = "sparsellm_manifest.json"


def check_out_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing non-empty `out` unless `overwrite`; call before any long work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SparseLLMError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SparseLLMError(f"output directory {out} exists and is not empty (use --overwrite)")
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file via a temp file + rename so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically (see `write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def save(
    model: Any,
    tokenizer: Any,
    out: str | os.PathLike,
    manifest: dict[str, Any],
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    extra_tensors: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] | None = None,
) -> Path:
    """Atomically write model + tokenizer + manifest (+ extra text / safetensors files).

    `extra_tensors` maps a file name to (tensors, string metadata), written with
    safetensors inside the same temporary directory, so they appear with the model or
    not at all.
    """
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / MANIFEST, manifest)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name, (tensors, metadata) in (extra_tensors or {}).items():
            save_file(tensors, str(tmp / name), metadata=metadata)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a saved directory, or None if it has none."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SparseLLMError(f"{file} is corrupt: {exc}") from None
