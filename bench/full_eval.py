"""Time a full default evaluation: perplexity + KL + 9 zero-shot tasks + speed.

Dense default model vs a 50% Wanda copy (pruned here, 32×512 c4), everything measured
in one process: perplexity and KL/top-1 on 32×512 wiki windows, the nine zero-shot
tasks on their first `--limit` documents for both models, and prefill/decode speed.
Prints a table per part and the wall time of each; writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import sparsellm as sl
from sparsellm.api import versions
from sparsellm.eval.kl import compare_models
from sparsellm.eval.speed import compare_speed
from sparsellm.eval.suite import resolve_tasks, run_tasks
from sparsellm.report.markdown import speed_table, table, zeroshot_table

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--tasks", default="zeroshot", help="tasks or groups (see sparsellm --help)")
    ap.add_argument("--speed-lengths", default="512,2048,8192")
    ap.add_argument("--longctx-lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--longctx-samples", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "full_eval.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    timings: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        timings[name] = time.perf_counter() - start
        return value

    dense, tok = timed("load", lambda: sl.load_model("default"))
    sparse = copy.deepcopy(dense)
    calib = sl.calibration(tok, "c4", 32, 512)
    timed("prune (wanda 50%)", lambda: sl.sparsify(sparse, [{"method": "wanda"}], calib))
    windows = sl.calibration(tok, "wiki", 32, 512)
    quality = timed("ppl + KL (both models)", lambda: compare_models(dense, sparse, windows))
    tasks = resolve_tasks(args.tasks)
    lc_lengths = tuple(int(n) for n in args.longctx_lengths.split(","))
    zs_dense = timed(
        "zero-shot dense",
        lambda: run_tasks(dense, tok, tasks, args.limit, lc_lengths, args.longctx_samples),
    )
    zs_sparse = timed(
        "zero-shot sparse",
        lambda: run_tasks(sparse, tok, tasks, args.limit, lc_lengths, args.longctx_samples),
    )
    lengths = tuple(int(n) for n in args.speed_lengths.split(","))
    speed = timed("speed", lambda: compare_speed(dense, sparse, lengths, repeats=1))

    print(table(["metric", "value"], [[k, v] for k, v in quality.items()]))
    print(zeroshot_table(zs_sparse, zs_dense))
    print(speed_table(speed))
    eval_total = sum(v for k, v in timings.items() if k not in ("load", "prune (wanda 50%)"))
    print(table(["part", "seconds"], [*timings.items(), ["evaluation total", eval_total]]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "quality": quality,
                "zeroshot": {"dense": zs_dense, "sparse": zs_sparse},
                "speed": speed,
                "timings": timings,
                "limit": args.limit,
                "versions": versions(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
