"""Does lm-evaluation-harness score our zero-shot requests exactly as our scorer does?

The default model is evaluated twice on the same (context, continuation) requests: by
`sparsellm.eval.zeroshot.evaluate_task`, and by lm-eval 0.4.13 on the tasks that
`write_olmo_tasks` converts from the same request files. Averages can agree while
documents disagree, so this compares every document's correctness (``acc`` and
``acc_norm``) and the largest log-likelihood difference over all requests. Prints one
row per task and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

import sparsellm as sl
from sparsellm.api import versions
from sparsellm.eval import zeroshot
from sparsellm.eval.harness import TASK_PREFIX, run_harness_samples, write_olmo_tasks
from sparsellm.report.markdown import table

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def recorded_scores() -> Iterator[list[list[tuple[float, bool]]]]:
    """Record what `score_pairs` returns inside `evaluate_task`.

    Per-document correctness then comes from the very scores behind evaluate_task's
    averages, without a second scoring pass (which would cost as much as the first).
    """
    calls: list[list[tuple[float, bool]]] = []
    original = zeroshot.score_pairs

    def record(*args: Any, **kwargs: Any) -> list[tuple[float, bool]]:
        calls.append(original(*args, **kwargs))
        return calls[-1]

    zeroshot.score_pairs = record
    try:
        yield calls
    finally:
        zeroshot.score_pairs = original


def our_documents(task: str, limit: int, scores: list[tuple[float, bool]]) -> list[dict]:
    """Per-document correctness and log-likelihoods, by evaluate_task's rules."""
    docs = zeroshot.load_docs(zeroshot.task_path(task), limit)
    it = iter(scores)
    out = []
    for doc in docs:
        lls, greedy = zip(*(next(it) for _ in doc.pairs), strict=True)
        record = {"doc_id": doc.doc_id, "loglikelihoods": list(lls)}
        if zeroshot.TASKS[task][2] == "mc":
            norm = [ll / max(len(c), 1) for ll, (_, c) in zip(lls, doc.pairs, strict=True)]
            record["acc"] = float(max(range(len(lls)), key=lls.__getitem__) == doc.gold)
            record["acc_norm"] = float(max(range(len(norm)), key=norm.__getitem__) == doc.gold)
        else:
            record["acc"] = float(all(greedy))
        out.append(record)
    return out


def compare(ours: list[dict], theirs: list[dict]) -> dict[str, Any]:
    """Documents whose correctness differs (per metric) and the largest |Δ log-likelihood|."""
    if [d["doc_id"] for d in ours] != [d["doc_id"] for d in theirs]:
        raise SystemExit("lm-eval scored other documents than we did")
    out: dict[str, Any] = {"max_abs_dll": 0.0}
    for metric in ("acc", "acc_norm"):
        if metric in theirs[0]:
            out[f"{metric}_differs"] = [
                a["doc_id"] for a, b in zip(ours, theirs, strict=True) if a[metric] != b[metric]
            ]
    for a, b in zip(ours, theirs, strict=True):
        if len(a["loglikelihoods"]) != len(b["loglikelihoods"]):
            raise SystemExit(f"document {a['doc_id']}: lm-eval made other requests than we did")
        for x, y in zip(a["loglikelihoods"], b["loglikelihoods"], strict=True):
            out["max_abs_dll"] = max(out["max_abs_dll"], abs(x - y))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--tasks", default=",".join(zeroshot.DEFAULT_TASKS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(HERE / "results" / "harness_equality.json"))
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    torch.manual_seed(0)
    model, tok = sl.load_model("default")
    timings: dict[str, float] = {}

    ours, our_docs = {}, {}
    start = time.perf_counter()
    for t in tasks:
        with recorded_scores() as calls:
            ours[t] = zeroshot.evaluate_task(model, tok, t, args.limit, args.batch_size)
        if len(calls) != 1:
            raise SystemExit(f"evaluate_task scored {t} in {len(calls)} calls; expected one")
        our_docs[t] = our_documents(t, args.limit, calls[0])
    timings["ours (evaluate_task)"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        include = write_olmo_tasks(tasks, Path(tmp), args.limit)
        start = time.perf_counter()
        metrics, samples = run_harness_samples(
            model,
            tok,
            [TASK_PREFIX + t for t in tasks],
            batch_size=args.batch_size,
            include_path=include,
        )
        timings["lm-eval (run_harness)"] = time.perf_counter() - start

    rows, result = [], {}
    for t in tasks:
        theirs = metrics[TASK_PREFIX + t]
        diff = compare(our_docs[t], samples[TASK_PREFIX + t])
        for metric in ("acc", "acc_norm"):  # our_documents applies evaluate_task's rules
            if metric in ours[t]:
                mean = sum(d[metric] for d in our_docs[t]) / len(our_docs[t])
                assert abs(mean - ours[t][metric]) < 1e-12, (t, metric)
        rows.append(
            [
                t,
                ours[t]["docs"],
                ours[t]["acc"],
                theirs["acc"],
                ours[t].get("acc_norm"),
                theirs.get("acc_norm"),
                len(diff["acc_differs"]),
                len(diff["acc_norm_differs"]) if "acc_norm_differs" in diff else None,
                f"{diff['max_abs_dll']:.2e}",
            ]
        )
        result[t] = {"ours": ours[t], "lm_eval": theirs, **diff}
    headers = ["task", "docs", "our acc", "lm-eval acc", "our acc_norm", "lm-eval acc_norm"]
    headers += ["acc differs", "acc_norm differs", "max |Δ loglik|"]
    print(table(headers, rows))
    print(table(["part", "seconds"], [[k, v] for k, v in timings.items()]))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "tasks": result,
        "limit": args.limit,
        "timings": timings,
        "versions": {**versions(), "lm_eval": version("lm-eval")},
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
