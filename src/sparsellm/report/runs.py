"""Finding runs on disk and reducing each to the numbers a comparison needs.

A run is a directory holding ``sparsellm_manifest.json`` (every `prune`/`run` output and
every sweep point). A sweep directory holds its points under ``points/``; passing it
expands to them. Anything else is refused: a number without its manifest (model hash,
recipe, data hashes, seeds, versions) is not reported.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsellm.errors import SparseLLMError
from sparsellm.export.hf import MANIFEST, read_manifest


@dataclass
class Run:
    """One evaluated sparse model: where it lives and its manifest."""

    name: str
    path: Path
    result: dict[str, Any]

    @property
    def method(self) -> str:
        return self.result.get("method", "?")

    @property
    def pattern(self) -> str:
        return self.result.get("pattern", "?")

    @property
    def family(self) -> str:
        """unstructured, or N:M patterns grouped by M ("N:4") so 1:4, 2:4, 3:4 share a curve."""
        p = self.pattern
        return f"N:{p.split(':')[1]}" if ":" in p and "+" not in p else p

    @property
    def sparsity(self) -> float:
        return float(self.result.get("measured_sparsity") or 0.0)


def _run(path: Path) -> Run:
    manifest = read_manifest(path)
    if manifest is None:
        raise SparseLLMError(f"{path} has no {MANIFEST}")
    for key in ("method", "measured_sparsity", "sparse_ppl"):
        if key not in manifest:
            raise SparseLLMError(f"{path / MANIFEST} lacks {key!r}: not a sparsellm run result")
    return Run(path.name, path, manifest)


def load_runs(paths: list[str | os.PathLike]) -> list[Run]:
    """Runs from run directories and sweep directories (expanded to their points)."""
    runs: list[Run] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise SparseLLMError(f"{path} is not a directory")
        if (path / MANIFEST).is_file():
            runs.append(_run(path))
            continue
        points = sorted(p.parent for p in path.glob(f"points/*/{MANIFEST}"))
        if not points:
            raise SparseLLMError(
                f"{path} has no {MANIFEST} (not a sparsellm run) and no points/*/{MANIFEST} "
                "(not a sweep)"
            )
        runs += [_run(p) for p in points]
    if not runs:
        raise SparseLLMError("no runs given")
    return runs


def task_average(tasks: dict[str, Any] | None) -> float | None:
    """Mean accuracy over evaluated tasks (None without tasks)."""
    if not tasks:
        return None
    return statistics.fmean(t["acc"] for t in tasks.values())


def summary(run: Run) -> dict[str, Any]:
    """The comparison row of one run (None where a measurement was not taken)."""
    r = run.result
    zs = r.get("zeroshot") or {}
    speed = r.get("speed") or {}
    dense, sparse = r.get("dense_ppl"), r.get("sparse_ppl")
    decode = speed.get("decode") or {}
    return {
        "run": run.name,
        "method": run.method,
        "pattern": run.pattern,
        "target": r.get("target_sparsity"),
        "sparsity": run.sparsity,
        "dense_ppl": dense,
        "sparse_ppl": sparse,
        "ppl_change": (sparse / dense - 1) if dense and sparse else None,
        "kl": r.get("kl"),
        "top1": r.get("top1_agreement"),
        "task_avg_dense": task_average(zs.get("dense")),
        "task_avg": task_average(zs.get("sparse")),
        "decode_speedup": decode.get("speedup"),
        "decode_tok_s": decode.get("sparse_tok_s"),
        "prune_seconds": r.get("prune_seconds"),
    }
