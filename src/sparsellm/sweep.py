"""`sparsellm sweep`: a methods × sparsities × patterns grid, resumable, local or on Ray.

Layout of a sweep directory::

    sweep.json                 the grid and the protocol (checked on resume)
    points/<name>/             one directory per finished point, written atomically:
        sparsellm_manifest.json, report.json     (no weights unless --save-models)
    report.md, report.html, plots/               rendered when the grid is done

Resume is by construction: a point whose directory exists is finished and skipped, and
a point is only renamed into place once its result is complete, so an interrupted
sweep picks up where it stopped. N:M patterns name the group size M; at sparsity s a
sweep uses round(s·M) zeros per M (0.3 → 1:4, 0.5 → 2:4, 0.7 → 3:4), and points that
round to the same pattern run once.

Executors: ``local`` runs points one after another in this process (the model is
loaded once and restored from a dense copy before each point); ``ray`` submits one
task per point to a Ray cluster (``ray.init(address)``; without an address a local
cluster is started), run by workers (Ray actors, as many as the cluster has room for)
that each load the model once and return each point's result to the driver, which
writes it — so workers need the model source but not the sweep dir.
With ``save_models`` a worker saves its model to a local temporary directory and
returns the files' bytes, which the driver writes into the point: the sweep directory
need not be on a filesystem every node shares, and the driver stays the only writer,
so points keep appearing atomically and resume works as with ``local``. Each point
reserves as many CPUs as the smallest node has, so it fits on any node.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sparsellm.errors import SparseLLMError
from sparsellm.export.hf import MANIFEST, check_replaceable, write_json_atomic
from sparsellm.methods.weights.masks import parse_pattern
from sparsellm.pipeline import (
    Prepared,
    Protocol,
    flat_view,
    prepare,
    prune_and_evaluate,
    run_tasks,
)
from sparsellm.result import Result

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Point:
    """One grid point: a single-step recipe."""

    method: str
    pattern: str
    sparsity: float | None  # None for N:M (implied)

    @property
    def name(self) -> str:
        if self.sparsity is None:
            return f"{self.method}-{self.pattern.replace(':', 'of')}"
        return f"{self.method}-{self.pattern}-{self.sparsity:.2f}"

    def recipe(self) -> list[dict[str, Any]]:
        step: dict[str, Any] = {"method": self.method, "pattern": self.pattern}
        if self.sparsity is not None:
            step["sparsity"] = self.sparsity
        return [step]


def grid(methods: list[str], sparsities: list[float], patterns: list[str]) -> list[Point]:
    """All points, validated; N:M patterns re-derived per sparsity and deduplicated."""
    from sparsellm.methods.weights.masks import check_sparsity
    from sparsellm.registry import config_class

    for m in methods:
        config_class(m, "weights")  # unknown names: an error listing the valid ones
    for s in sparsities:
        check_sparsity(s)
    points: list[Point] = []
    for method in methods:
        for pattern in patterns:
            parsed = parse_pattern(pattern)
            for s in sparsities:
                if not parsed.is_nm:
                    point = Point(method, "unstructured", s)
                else:
                    m = parsed.m
                    n = min(max(round(s * m), 1), m - 1)
                    point = Point(method, f"{n}:{m}", None)
                if point not in points:
                    points.append(point)
    if not points:
        raise SparseLLMError("the sweep grid is empty")
    return points


def _write_point(
    out: Path,
    point: Point,
    result: Result,
    model: Any = None,
    files: dict[str, bytes] | None = None,
) -> None:
    """Write a finished point into points/<name> atomically (temp dir + rename).

    The weights come as a `model` to save (local) or as the `files` a worker's
    `save_pretrained` wrote (Ray), by path relative to the point directory.
    """
    final = out / "points" / point.name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{point.name}.tmp-", dir=final.parent))
    try:
        if model is not None:
            model.save_pretrained(tmp)
        for name, data in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        result.write(tmp / MANIFEST)
        write_json_atomic(tmp / "report.json", flat_view(result))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _settings(source: str, protocol: Protocol, points: list[Point]) -> dict[str, Any]:
    """What sweep.json holds, in its JSON form (tuples as lists) so it compares on resume."""
    settings = {"model": source, "protocol": protocol.to_dict(), "points": [p.name for p in points]}
    return json.loads(json.dumps(settings))


def open_sweep(
    out: Path, source: str, protocol: Protocol, points: list[Point], overwrite: bool
) -> list[Point]:
    """Create or resume `out`; return the points still to run."""
    settings = _settings(source, protocol, points)
    file = out / SWEEP_FILE
    if file.is_file() and not overwrite:
        try:
            previous = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SparseLLMError(f"{file} is corrupt: {exc}") from None
        if {k: previous.get(k) for k in ("model", "protocol")} != {
            k: settings[k] for k in ("model", "protocol")
        }:
            raise SparseLLMError(
                f"{out} holds a sweep with a different model or protocol; "
                "use another --out or --overwrite"
            )
        settings["points"] = list(dict.fromkeys(previous.get("points", []) + settings["points"]))
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SparseLLMError(f"{out} exists, is not empty and is not a sweep (use --overwrite)")
        check_replaceable(out, (SWEEP_FILE, MANIFEST))
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(file, settings)
    return [p for p in points if not (out / "points" / p.name / MANIFEST).is_file()]


def run_local(
    out: Path,
    source: str,
    protocol: Protocol,
    todo: list[Point],
    save_models: bool = False,
    prep: Prepared | None = None,
) -> None:
    """Run `todo` in this process: load once, restore the dense weights before each point."""
    if not todo:
        return
    prep = prep or prepare(source, protocol)
    model = prep.loaded.model
    dense = copy.deepcopy(model)
    dense_tasks = run_tasks(dense, prep.loaded.tokenizer, protocol) if protocol.tasks else None
    for point in tqdm(todo, desc="sweep", unit="point"):
        model.load_state_dict(dense.state_dict())  # the dense copy is never modified
        result = prune_and_evaluate(
            model, dense, prep, point.recipe(), protocol, dense_tasks, kind="sweep-point"
        )
        result.details["sweep_point"] = point.name
        _write_point(out, point, result, model if save_models else None)


class _RayWorker:
    """A Ray actor that loads the model once and runs points as `run_local` does (the
    dense weights restored before each), so a node pays for one load, not one per point.

    A point's model is saved on the worker's own disk and sent back as bytes (see the
    module docstring for why the driver, not the worker, writes into the sweep directory).
    """

    def __init__(self, source: str, protocol: dict[str, Any]) -> None:
        self.protocol = Protocol.from_dict(protocol)
        self.prep = prepare(source, self.protocol)
        self.dense = copy.deepcopy(self.prep.loaded.model)
        self.dense_tasks = (
            run_tasks(self.dense, self.prep.loaded.tokenizer, self.protocol)
            if self.protocol.tasks
            else None
        )

    def run(self, point: Point, save_model: bool) -> tuple[Point, Result, dict[str, bytes] | None]:
        model = self.prep.loaded.model
        model.load_state_dict(self.dense.state_dict())
        try:
            result = prune_and_evaluate(
                model,
                self.dense,
                self.prep,
                point.recipe(),
                self.protocol,
                self.dense_tasks,
                kind="sweep-point",
            )
        except Exception as exc:  # the driver reports it under the point's name
            raise SparseLLMError(f"sweep point {point.name} failed: {exc}") from exc
        result.details["sweep_point"] = point.name
        if not save_model:
            return point, result, None
        with tempfile.TemporaryDirectory(prefix="sparsellm-point-") as tmp:
            model.save_pretrained(tmp)
            root = Path(tmp)
            files = {
                str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()
            }
        return point, result, files


def default_cpus_per_point(nodes: list[dict[str, Any]]) -> float:
    """CPUs a point reserves by default: the smallest alive node's count (1 if unknown).

    A point runs in one process, so it must fit on one node: asking for the cluster's
    total (more than any node has) would leave every task pending forever. Nodes
    without CPUs (e.g. a head started with ``--num-cpus 0``) run no points.
    """
    cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes if n.get("Alive")]
    return min((c for c in cpus if c > 0), default=1.0)


def run_ray(
    out: Path,
    source: str,
    protocol: Protocol,
    todo: list[Point],
    address: str | None = None,
    cpus_per_point: float | None = None,
    save_models: bool = False,
) -> None:
    """Run `todo` as Ray tasks; results are written here as they finish (resumable).

    `cpus_per_point` defaults to `default_cpus_per_point` of the cluster's nodes.
    """
    if not todo:
        return
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise SparseLLMError("--executor ray needs Ray: pip install 'ray==2.60.0'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        cpus = cpus_per_point or default_cpus_per_point(ray.nodes())
        slots = int(sum(n.get("Resources", {}).get("CPU", 0) // cpus for n in ray.nodes()
                        if n.get("Alive")))  # fmt: skip
        worker = ray.remote(num_cpus=cpus)(_RayWorker)
        workers = [
            worker.remote(source, protocol.to_dict()) for _ in range(min(len(todo), max(slots, 1)))
        ]
        pool = ActorPool(workers)
        for point in todo:
            pool.submit(lambda w, p: w.run.remote(p, save_models), point)
        with tqdm(total=len(todo), desc="sweep (ray)", unit="point") as bar:
            while pool.has_next():
                try:
                    point, result, files = pool.get_next_unordered()
                except ray.exceptions.RayError as exc:
                    cause = getattr(exc, "cause", None) or exc
                    raise SparseLLMError(str(cause).splitlines()[0]) from None
                _write_point(out, point, result, files=files)
                bar.update()
    finally:
        if started:
            ray.shutdown()
