"""Save a (sparse) model as a plain HF directory, atomically, with a manifest.

The directory holds `config.json`, `model.safetensors`, the tokenizer and
`sparsellm_manifest.json` (recipe, seeds, data, versions, per-layer sparsity), so
`AutoModelForCausalLM.from_pretrained(out)` works with zeros in place and every number
can be traced back. The model is written to a temporary sibling directory and renamed
into place, so an interrupted save never leaves a half-written model at `out`.

Replacing an existing `out` deletes it, so `check_replaceable` guards every writer: only an
empty directory or a previous sparsellm output may go, never `/`, the home directory, the
current directory or one of its parents (a mistyped `--out ~ --overwrite` must not wipe
a home directory).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparsellm.errors import SparseLLMError

MANIFEST = "sparsellm_manifest.json"


def _protected(path: Path) -> str | None:
    """Why `path` (already resolved) must never be replaced, or None if it may be."""
    if path == Path(path.anchor):
        return "the filesystem root"
    home = os.path.expanduser("~")
    if home != "~" and path == Path(home).resolve():
        return "the home directory"
    cwd = Path.cwd().resolve()
    if path == cwd:
        return "the current directory"
    if path in cwd.parents:
        return "a parent of the current directory"
    return None


def check_replaceable(out: str | os.PathLike, markers: tuple[str, ...] = (MANIFEST,)) -> None:
    """Raise unless the existing directory `out` may be deleted and replaced.

    Allowed: an empty directory, or one holding one of `markers` (a file only sparsellm
    writes, so the directory is a previous run). Refused whatever it holds: `/`, `$HOME`,
    the current directory and its parents, symlinks resolved, since replacing those would
    destroy the user's files or pull the working directory away from under the process.
    """
    out = Path(out)
    resolved = out.resolve()
    why = _protected(resolved)
    if why is not None:
        raise SparseLLMError(f"refusing to replace {out}: it is {why} (choose another --out)")
    if not resolved.is_dir():
        raise SparseLLMError(f"output {out} exists and is not a directory")
    if any(resolved.iterdir()) and not any((resolved / m).is_file() for m in markers):
        raise SparseLLMError(
            f"refusing to replace {out}: it holds files but no {' or '.join(markers)}, "
            "so it is not a sparsellm output (choose another --out)"
        )


def check_out_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an `out` that `save` could not replace; call before any long work.

    An existing non-empty `out` needs `overwrite`; any existing `out` must also pass
    `check_replaceable`, since `save` swaps the whole directory, even an empty one.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SparseLLMError(f"output {out} exists and is not a directory")
    if out.is_dir():
        if any(out.iterdir()) and not overwrite:
            raise SparseLLMError(
                f"output directory {out} exists and is not empty (use --overwrite)"
            )
        check_replaceable(out)
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

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / MANIFEST, manifest)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name, (tensors, metadata) in (extra_tensors or {}).items():
            save_file(tensors, str(tmp / name), metadata=metadata)

    return write_dir_atomic(out, overwrite, fill)


def write_dir_atomic(out: str | os.PathLike, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Let `fill` write a temporary sibling of `out`, then swap it in: `out` appears
    complete or not at all, and a failure leaves the previous `out` untouched."""
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        promote_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def promote_dir(done: Path, out: Path) -> None:
    """Rename the finished directory `done` to `out` in one step, replacing an existing
    `out` (checked again with `check_replaceable`: it may have changed meanwhile)."""
    if out.exists():
        check_replaceable(out)
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(done, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(done, out)


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a saved directory, or None if it has none."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SparseLLMError(f"{file} is corrupt: {exc}") from None
