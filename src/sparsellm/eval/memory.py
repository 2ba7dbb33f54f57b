"""Memory a user will see: checkpoint bytes on disk and peak RSS of one model alone.

Peak RSS is per process and never goes down, so measuring dense and sparse models in
the process that holds both says nothing about either. Each model is therefore loaded
in a fresh Python process that runs one prefill and reports its own peak
(``python -m sparsellm.eval.memory PATH --length N``); the numbers include the Python
and torch runtime, as a user's process would.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from sparsellm.errors import SparseLLMError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def checkpoint_bytes(path: str | os.PathLike) -> int | None:
    """Bytes of weight files in a checkpoint directory (None for a hub id / missing path)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))


def available_bytes() -> int | None:
    """Memory this process may still take: MemAvailable, or less under a cgroup limit
    (containers, `systemd-run -p MemoryMax=`); None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:  # "0::/path" (cgroup v2) or "4:memory:/path" (v1)
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            files = (Path("/sys/fs/cgroup") / rel.lstrip("/"), "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            where = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            files = (where, "memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            limit = (files[0] / files[1]).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:  # v1 writes "no limit" as ~2^63
                found.append(int(limit) - int((files[0] / files[2]).read_text()))
        except (OSError, ValueError):
            pass
    return min(found) if found else None


def measure_peak_rss(path: str | os.PathLike, length: int, timeout: float = 900) -> dict[str, int]:
    """Peak RSS of a fresh process that loads `path` and runs one `length`-token prefill."""
    cmd = [sys.executable, "-m", "sparsellm.eval.memory", str(path), "--length", str(length)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SparseLLMError(f"memory measurement of {path} timed out") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SparseLLMError(f"memory measurement of {path} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Peak RSS of loading one model + one prefill.")
    ap.add_argument("path")
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args(argv)
    import torch

    from sparsellm.eval.speed import prefill_seconds
    from sparsellm.models.load import load_model

    runtime = _peak()
    model = load_model(args.path).model
    loaded = _peak()
    prefill_seconds(model, args.length)
    out: dict[str, Any] = {
        "runtime_rss_bytes": runtime,
        "after_load_rss_bytes": loaded,
        "peak_rss_bytes": _peak(),
        "length": args.length,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
