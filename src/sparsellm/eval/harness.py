"""lm-evaluation-harness on an in-memory model, and our zero-shot requests as lm-eval tasks.

Two jobs:

* `run_harness` evaluates the torch model we hold (sparse, patched, never re-saved) with
  lm-eval's own ``HFLM`` wrapper, so users can run any lm-eval task on a pruned model
  and reviewers can check our numbers against the reference implementation.
* `write_olmo_tasks` turns our request files (see `sparsellm.eval.zeroshot`) into local
  lm-eval task definitions — YAML plus one jsonl data file per task, loaded with the
  ``json`` dataset builder, so they work offline — that make lm-eval score exactly the
  (context, continuation) requests our scorer scores, with the same metric definitions.

How the definitions line up with `zeroshot.evaluate_task` (checked against the lm-eval
0.4.13 source, ``api/task.py`` and ``models/huggingface.py``):

* shared-context multiple choice (ARC, HellaSwag, PIQA, …): ``doc_to_text`` is the
  context, ``doc_to_choice`` the continuations *with* their leading space and
  ``target_delimiter: ""``. lm-eval then requests ``(context, "" + choice)`` and its
  ``acc_norm`` divides by ``len(choice)`` in characters — our continuation, leading
  space included, exactly what our scorer divides by.
* shared-continuation multiple choice (Winogrande): lm-eval's "multiple input" mode —
  ``doc_to_text`` returns the gold index, ``doc_to_choice`` the per-choice contexts,
  ``doc_to_target`` the continuation. Only ``acc`` is defined: in this mode lm-eval's
  ``acc_norm`` divides by the length of the *context* (its "choices"), which is not our
  definition (ours divides by the shared continuation, so our acc_norm equals acc).
* greedy (LAMBADA) and QA: ``output_type: loglikelihood`` with metric ``acc``, which is
  lm-eval's ``is_greedy`` (every continuation token is the argmax) — our greedy match.
  Bits per byte is not an lm-eval ``loglikelihood`` metric and is not exported.

Tokenisation is identical: ``HFLM`` moves trailing context spaces into the continuation
and splits ``encode(context + continuation)`` at ``len(encode(context))`` as
`zeroshot.encode_pair` does; `run_harness` passes ``add_bos_token`` as
`corpora.bos_prefix` decides, so both sides prepend BOS for tokenizers that start every
text with it (Gemma) and neither adds special tokens otherwise. Remaining differences:
lm-eval left-truncates requests longer than the model window where our scorer refuses,
and for an empty context lm-eval drops the prefix token when it equals the first
continuation token; neither occurs in the bundled request files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from sparsellm.data.corpora import bos_prefix
from sparsellm.errors import SparseLLMError
from sparsellm.eval import zeroshot

LM_EVAL_PIN = "lm-eval==0.4.13"
TASK_PREFIX = "sparsellm_"  # lm-eval name of a converted task: sparsellm_<our name>
TAG = "sparsellm_olmo"  # lm-eval tag that runs every converted task at once

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


def import_lm_eval() -> tuple[Any, Any, Any]:
    """(lm_eval, TaskManager, HFLM), imported lazily: lm-eval is optional and slow to import."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SparseLLMError(
            f"the lm-evaluation-harness adapter needs lm-eval: pip install {LM_EVAL_PIN}"
        ) from None
    return lm_eval, TaskManager, HFLM


@contextlib.contextmanager
def _quiet_and_seeded() -> Iterator[None]:
    """Silence lm-eval's/datasets' INFO chatter; restore every global RNG lm-eval reseeds.

    ``simple_evaluate`` seeds `random`, numpy and torch; a caller mid-experiment should
    not find its random streams reset by an evaluation.
    """
    import numpy as np
    from datasets.utils import logging as ds_logging

    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    bars = ds_logging.is_progress_bar_enabled()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        ds_logging.disable_progress_bar()  # "Generating test split" bars, one per task
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            ds_logging.enable_progress_bar()
        random.setstate(py_state)
        np.random.set_state(np_state)


def _task_manager(
    TaskManager: Any, tasks: list[str], include_path: str | Path | None, include_defaults: bool
) -> Any:
    """A TaskManager that knows every name in `tasks`, or a SparseLLMError naming the unknown.

    Indexing lm-eval's ~15k bundled task configs takes ~6 s on 2 cores; when every
    requested name is a plain task under `include_path` (which takes precedence anyway),
    or `include_defaults` is off, only `include_path` is indexed.
    """
    local_names: list[str] = []
    manager = None
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise SparseLLMError(f"lm-eval include_path {str(include_path)!r} is not a directory")
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        local_names = manager.all_subtasks
        if include_defaults and not all(t in local_names for t in tasks):
            manager = None
    elif not include_defaults:
        raise SparseLLMError("include_defaults=False needs an include_path")
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = "lm-eval's task index" if include_defaults else ""
        if include_path is not None:
            where += (" nor " if where else "") + f"{str(include_path)!r}"
            where += f" (which holds: {', '.join(local_names) or 'no tasks'})"
        raise SparseLLMError(
            f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}: not in {where}"
        )
    return manager


def _metrics(entry: dict[str, Any], n_docs: int | None) -> dict[str, float]:
    """lm-eval's ``{"acc,none": ..}`` as ``{"acc": ..}``: numbers only, the default filter bare."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or key == "sample_len":
            continue  # "alias", stderrs lm-eval reports as "N/A"; sample_len is our "docs"
        out[key.removesuffix(",none")] = float(value)
    if n_docs is not None:
        out["docs"] = n_docs
    return out


def _sample(sample: dict[str, Any]) -> dict[str, Any]:
    """One logged lm-eval document as plain data: its id, per-doc metrics and scores.

    ``doc_id`` is the id stored in the document (our request file's, for converted
    tasks), else lm-eval's position in the split.
    """
    doc = sample.get("doc")
    doc_id = doc["doc_id"] if isinstance(doc, dict) and "doc_id" in doc else sample["doc_id"]
    # (loglikelihood, is_greedy) per request; generation tasks log strings instead
    scores = [r for r in sample["filtered_resps"] if isinstance(r, list | tuple) and len(r) == 2]
    out: dict[str, Any] = {
        "doc_id": doc_id,
        "loglikelihoods": [float(r[0]) for r in scores],
        "greedy": [bool(r[1]) for r in scores],
    }
    for metric in sample.get("metrics", []):
        value = sample.get(metric)
        if isinstance(value, int | float):
            out[metric] = float(value)
    return out


def run_harness(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    include_path: str | Path | None = None,
    include_defaults: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluate the in-memory `model` on lm-eval `tasks`; per-task metrics as plain floats.

    Runs lm-eval's ``HFLM`` around the model itself (no re-save, so sparse or patched
    models are measured as they are) with ``add_bos_token`` set to tokenise exactly as
    our scorer does (BOS only where `bos_prefix` puts one). `include_path` adds a
    directory of task YAMLs (see `write_olmo_tasks`); ``include_defaults=False`` searches
    only that directory (faster). `limit` keeps the first documents of each task. Returns e.g.
    ``{"arc_easy": {"acc": .., "acc_stderr": .., "acc_norm": .., "docs": 200}}``.
    """
    metrics, _ = run_harness_samples(
        model,
        tokenizer,
        tasks,
        limit=limit,
        batch_size=batch_size,
        include_path=include_path,
        include_defaults=include_defaults,
        log_samples=False,
    )
    return metrics


def run_harness_samples(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    include_path: str | Path | None = None,
    include_defaults: bool = True,
    log_samples: bool = True,
) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, Any]]]]:
    """`run_harness`'s metrics plus, per task, every document's result in ``doc_id`` order.

    A document's record holds ``doc_id``, lm-eval's per-document metrics (``acc``,
    ``acc_norm``, …) and each request's ``loglikelihoods`` / ``greedy`` flag, so that a
    comparison can be made document by document rather than on averages, which can hide
    differences that cancel out.
    """
    if not tasks:
        raise SparseLLMError("no lm-eval tasks given")
    lm_eval, TaskManager, HFLM = import_lm_eval()
    with _quiet_and_seeded():
        manager = _task_manager(TaskManager, list(tasks), include_path, include_defaults)
        lm = HFLM(
            pretrained=model,
            # HFLM sets a pad token on the tokenizer it gets; keep the caller's untouched.
            tokenizer=copy.deepcopy(tokenizer),
            device=str(next(model.parameters()).device),
            batch_size=batch_size,
            add_bos_token=bool(bos_prefix(tokenizer)),
        )
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
            )
        except ConnectionError as exc:  # a Hub data set, offline (after ~30 s of retries)
            raise SparseLLMError(
                f"lm-eval could not download a task's data ({exc}); offline, use local tasks "
                "such as those write_olmo_tasks writes"
            ) from None
    if results is None:  # only on non-zero ranks of a distributed run
        raise SparseLLMError("lm-eval returned no results (distributed run, non-zero rank?)")
    n_samples = results.get("n-samples", {})
    metrics = {
        task: _metrics(entry, n_samples.get(task, {}).get("effective"))
        for task, entry in results["results"].items()
    }
    samples = {
        task: sorted((_sample(s) for s in logged), key=lambda s: s["doc_id"])
        for task, logged in results.get("samples", {}).items()
    }
    return metrics, samples


def _records(task: str, kind: str, docs: list[zeroshot.Doc]) -> tuple[list[dict], dict]:
    """The jsonl records and the lm-eval config fields that reproduce `docs` request for request."""
    if kind in ("greedy", "qa"):
        for doc in docs:
            if len(doc.pairs) != 1:
                raise SparseLLMError(
                    f"{task}: document {doc.doc_id} has {len(doc.pairs)} requests; a greedy "
                    "task needs exactly one to map onto lm-eval's loglikelihood output"
                )
        records = [
            {"doc_id": d.doc_id, "context": d.pairs[0][0], "cont": d.pairs[0][1]} for d in docs
        ]
        return records, {
            "output_type": "loglikelihood",
            "doc_to_text": "context",
            "doc_to_target": "cont",
            "metric_list": [_ACC],
        }
    if kind != "mc":
        raise SparseLLMError(f"{task}: cannot convert task kind {kind!r} to lm-eval")
    # One mode per task: lm-eval decides "multiple input" from the first document only.
    if all(len({c for c, _ in d.pairs}) == 1 for d in docs):
        records = [
            {
                "doc_id": d.doc_id,
                "gold": d.gold,
                "context": d.pairs[0][0],
                "choices": [x for _, x in d.pairs],
            }
            for d in docs
        ]
        return records, {
            "output_type": "multiple_choice",
            "doc_to_text": "context",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [_ACC, _ACC_NORM],
        }
    if all(len({x for _, x in d.pairs}) == 1 for d in docs):
        records = [
            {
                "doc_id": d.doc_id,
                "gold": d.gold,
                "contexts": [c for c, _ in d.pairs],
                "cont": d.pairs[0][1],
            }
            for d in docs
        ]
        return records, {
            "output_type": "multiple_choice",
            "doc_to_text": "gold",  # an int: lm-eval's "multiple input" mode
            "doc_to_choice": "contexts",
            "doc_to_target": "cont",
            "metric_list": [_ACC],  # lm-eval's acc_norm here divides by context length
        }
    raise SparseLLMError(
        f"{task}: documents share neither their context nor their continuation; lm-eval's "
        "multiple_choice cannot express them"
    )


def write_olmo_tasks(tasks: list[str], out_dir: Path, limit: int | None) -> Path:
    """Write our zero-shot `tasks` as lm-eval tasks ``sparsellm_<task>`` under `out_dir`.

    Each task gets ``<name>.jsonl`` (its first `limit` documents, in file order, with our
    ``doc_id``) and ``<name>.yaml`` reading it through the offline ``json`` builder.
    Returns `out_dir`, to pass as `run_harness`'s ``include_path``.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        path = zeroshot.task_path(task)  # validates the name, finds the data package
        docs = zeroshot.load_docs(path, limit)
        if not docs:
            raise SparseLLMError(f"{path} holds no documents")
        records, fields = _records(task, zeroshot.TASKS[task][2], docs)
        name = TASK_PREFIX + task
        data = out_dir / f"{name}.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        config = {
            "task": name,
            "tag": [TAG],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "target_delimiter": "",  # continuations carry their own leading space
            **fields,
            "metadata": {"version": 1.0, "source": str(path), "limit": limit},
        }
        (out_dir / f"{name}.yaml").write_text(
            yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
    return out_dir
