"""Write a bench result as committed, reproducible JSON: `results/<name>.json`.

Every number the README or the docs quote must be traceable to the command that produced
it, on which commit, on which CPU, with how many threads and which library versions.
Bench scripts therefore hand their table to `write_result` instead of writing JSON
themselves; `bench/render_results.py` turns the files into Markdown.

Payload convention: ``{"rows": [{column: value, ...}, ...], "spread": optional}`` — one
dict per table row (columns are the union of keys, first-seen order); ``spread`` says how
much the numbers move run to run (a string, or a mapping column -> spread). Other keys
are kept and rendered below the table.

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # in a bench script
    from provenance import write_result
    write_result("recipes", {"rows": rows})
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sparsellm.export.hf import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "results"

# the ISA features our kernels and torch's CPU paths dispatch on (x86 flags, Arm features)
RELEVANT_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_vbmi2",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
    "sve",
    "sve2",
    "i8mm",
    "bf16",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_result(
    name: str,
    payload: dict[str, Any],
    argv: list[str] | None = None,
    *,
    out_dir: Path | None = None,
) -> Path:
    """Write `payload` with its provenance to ``<out_dir>/<name>.json`` atomically.

    `argv` defaults to ``sys.argv`` (the bench script's own command line); `out_dir` to the
    repository's ``results/`` (tests pass a temporary directory). Returns the path written.
    """
    if not _NAME.match(name):
        raise ValueError(f"result name {name!r}: use letters, digits, '.', '_' and '-'")
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"result {name!r}: payload must be {{'rows': [dict, ...], ...}}")
    record = {
        "command": command_line(sys.argv if argv is None else argv),
        "commit": git_commit(),
        "cpu": cpu_info(),
        "threads": torch_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "data": payload,
    }
    out_dir = RESULTS_DIR if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    write_json_atomic(path, record)  # a reader never sees half a file
    return path


def command_line(argv: list[str]) -> str:
    """``python bench/x.py --flag v``: a script path inside the repo is made repo-relative,
    so the command can be pasted from the repository root on any machine."""
    if not argv:
        return ""
    first = argv[0]
    if first.endswith(".py"):
        path = Path(first).resolve()
        if path.is_relative_to(REPO):
            first = path.relative_to(REPO).as_posix()
        return shlex.join(["python", first, *argv[1:]])
    return shlex.join(argv)


def git_commit() -> dict[str, Any]:
    """``{"sha": HEAD, "dirty": bool}``; dirty = tracked files outside results/ differ.

    results/ itself is left out, so writing one result does not mark the next as dirty.
    """

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results")
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def l3_cache_bytes() -> int | None:
    """The last-level (L3) cache size the OS reports. Why it is recorded: a model whose
    weights fit in it decodes from cache, not memory (a 135M model at int8 does on a
    300 MB-L3 Xeon), so its GB/s can pass the measured DRAM read bandwidth."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if size[-1:] in units and size[:-1].isdigit():
            return int(size[:-1]) * units[size[-1]]
        if size.isdigit():
            return int(size)
    return None


def cpu_info() -> dict[str, Any]:
    """CPU model, the ISA flags relevant to our kernels, the logical core count and the
    L3 size."""
    model, flags = None, set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {
        "model": model or platform.processor() or platform.machine(),
        "flags": [f for f in RELEVANT_FLAGS if f in flags],
        "logical_cores": os.cpu_count(),
        "l3_cache_bytes": l3_cache_bytes(),
        "platform": platform.platform(),
    }


def torch_threads() -> int | None:
    """torch's intra-op thread count (what every timing here depends on)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def versions() -> dict[str, str | None]:
    """Python and the libraries whose versions move our numbers."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "sparsellm"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out
