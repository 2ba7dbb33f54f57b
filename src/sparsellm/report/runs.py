"""Finding runs on disk and reducing each to the numbers a comparison needs.

A run is a directory whose ``sparsellm_manifest.json`` is a `sparsellm.result.Result`:
the output of every command (prune, run, shrink, activate, recover, ``eval --out``)
and every sweep point. A sweep directory holds its points under ``points/``; passing
it expands to them. Anything else is refused: a number without its Result (model
hash, recipe, data hashes, seeds, versions) is not reported.

Because every kind has the same Result shape, one summary row serves them all:
``dense_ppl`` is the dense reference (the parent model; the teacher for `recover`),
``sparse_ppl`` the changed model (pruned, shrunk, activation-sparse or recovered), and
``sparsity`` what the kind removes (zero weights; removed block parameters for
`shrink`; skipped weight reads for `activate`).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsellm.errors import SparseLLMError
from sparsellm.result import RESULT_FILE, Result

# curves group runs by (method, family); these kinds get a family of their own so a
# recovered or activation-sparse run never joins a pruning curve of the same method
OWN_FAMILY = ("shrink", "activate", "recover", "eval")


@dataclass
class Run:
    """One evaluated model: where it lives and its Result."""

    name: str
    path: Path
    result: Result

    @property
    def kind(self) -> str:
        return self.result.kind

    @property
    def method(self) -> str:
        return self.result.method

    @property
    def pattern(self) -> str:
        steps = self.result.recipe.get("steps") or []
        return "+".join(s["pattern"] for s in steps if "pattern" in s) or "-"

    @property
    def family(self) -> str:
        """The curve a run belongs to: unstructured, or N:M grouped by M ("N:4") so 1:4,
        2:4 and 3:4 share one; `OWN_FAMILY` kinds are their own family."""
        if self.kind in OWN_FAMILY:
            return self.kind
        p = self.pattern
        return f"N:{p.split(':')[1]}" if ":" in p and "+" not in p else p

    @property
    def sparsity(self) -> float:
        return self.result.measured_sparsity

    @property
    def layers(self) -> dict[str, Any]:
        return self.result.sparsity.get("layers") or {}


def read_run(path: Path) -> Run:
    """The Run of one directory (its Result, validated)."""
    if not (path / RESULT_FILE).is_file():
        raise SparseLLMError(f"{path} has no {RESULT_FILE}")
    return Run(path.name, path, Result.read(path))


def load_runs(paths: list[str | os.PathLike]) -> list[Run]:
    """Runs from run directories and sweep directories (expanded to their points)."""
    runs: list[Run] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise SparseLLMError(f"{path} is not a directory")
        if (path / RESULT_FILE).is_file():
            runs.append(read_run(path))
            continue
        points = sorted(p.parent for p in path.glob(f"points/*/{RESULT_FILE}"))
        if not points:
            raise SparseLLMError(
                f"{path} has no {RESULT_FILE} (not a sparsellm run) and no points/*/"
                f"{RESULT_FILE} (not a sweep)"
            )
        runs += [read_run(p) for p in points]
    if not runs:
        raise SparseLLMError("no runs given")
    return runs


def task_average(tasks: dict[str, Any] | None) -> float | None:
    """Mean accuracy over evaluated tasks (None without tasks)."""
    if not tasks:
        return None
    return statistics.fmean(t["acc"] for t in tasks.values())


def speed(result: Result) -> dict[str, Any]:
    """The decode speed entry of any kind (``speed.decode``, or activate's decode_speed)."""
    details = result.details
    return (details.get("speed") or {}).get("decode") or details.get("decode_speed") or {}


def summary(run: Run) -> dict[str, Any]:
    """The comparison row of one run (None where a measurement was not taken)."""
    r = run.result
    if r.kind == "recover":
        dense = (r.details.get("teacher") or {}).get("ppl")
        dense_tasks = None
    else:
        dense = r.metric("before", "ppl")
        dense_tasks = r.metric("before", "tasks")
    sparse = r.metric("after", "ppl")
    decode = speed(r)
    return {
        "run": run.name,
        "kind": r.kind,
        "method": run.method,
        "pattern": run.pattern,
        "target": r.sparsity.get("target"),
        "sparsity": run.sparsity,
        "dense_ppl": dense,
        "sparse_ppl": sparse,
        "ppl_change": (sparse / dense - 1) if dense and sparse else None,
        "kl": r.metric("comparison", "kl"),
        "top1": r.metric("comparison", "top1_agreement"),
        "task_avg_dense": task_average(dense_tasks),
        "task_avg": task_average(r.metric("after", "tasks")),
        "decode_speedup": decode.get("speedup"),
        "decode_tok_s": decode.get("sparse_tok_s"),
        "seconds": sum(r.timings.values()) if r.timings else None,
    }
