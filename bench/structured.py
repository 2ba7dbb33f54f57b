"""Structured pruning on the default model (or `--model`): every method at several ratios.

For each method and ratio: shrink a copy of the dense model (calibration: c4 windows, or
wiki windows disjoint from the evaluation ones with `--calib-source wiki`),
report wiki perplexity, KL and top-1 to dense, then the same after `--recover-steps`
distillation steps (0 skips recovery); optional zero-shot `--tasks` and `--speed`
(prefill 512/2048 and decode 128 tokens, side by side with dense, as ratios). Prints a
Markdown table and writes bench/results/structured.json (scratch) after every point, so
an interrupted run keeps what it finished; at the end the table goes to
`results/structured-<model>.json` (command, commit, CPU flags, date). Timed numbers need
an idle machine.

    python bench/structured.py [--methods taylor,obs,depth] [--ratios 0.1,0.2,0.25,0.3]
        [--model qwen0.5b] [--calib-source wiki] [--recover-steps 20]
        [--tasks piqa,arc_easy] [--speed] [--per-layer]
        [--tasks-ratios 0.25] [--speed-ratios 0.25]

`--tasks-ratios` / `--speed-ratios` restrict the costly zero-shot and speed parts to some
ratios (default: every ratio), so the whole table comes out of one command.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from provenance import write_result

import sparsellm as sl
from sparsellm.config import spec_keys
from sparsellm.eval.speed import compare_speed
from sparsellm.eval.suite import resolve_tasks, run_tasks
from sparsellm.export.hf import write_json_atomic
from sparsellm.recover.structured import shrink_and_evaluate
from sparsellm.registry import config_class, names
from sparsellm.report.markdown import table

HERE = Path(__file__).resolve().parent


def _mean_acc(tasks: dict[str, Any] | None) -> float | None:
    accs = [m["acc"] for m in (tasks or {}).values() if "acc" in m]
    return sum(accs) / len(accs) if accs else None


def _ratio_set(text: str) -> set[float] | None:
    """Ratios from a comma list; None (= every ratio) for an empty one."""
    return {float(x) for x in text.split(",")} if text else None


def _step(method: str, ratio: float, per_layer: bool, no_heads: bool) -> dict[str, Any]:
    """The recipe step of one point: the width-only flags go to the methods that have them
    (depth, SliceGPT and WeLore have neither), so one command sweeps every method."""
    keys = spec_keys(config_class(method, "structured"))
    step: dict[str, Any] = {"method": method, "ratio": ratio}
    if per_layer and "per_layer" in keys:
        step["per_layer"] = True
    if no_heads and "prune_heads" in keys:
        step["prune_heads"] = False
    return step


def _row(r: dict[str, Any]) -> list[Any]:
    after = r.get("after") or {}
    speed = r.get("speed") or {}
    prefill = speed.get("prefill", {})
    return [
        r["method"] + (" (per-layer)" if r["per_layer"] else ""),
        r["ratio"],
        r["shrink"]["measured_ratio"],
        r["before"]["sparse_ppl"],
        r["before"]["kl"],
        after.get("sparse_ppl"),
        _mean_acc(r.get("zeroshot")),
        *(prefill.get(str(n), {}).get("speedup") for n in (512, 2048)),
        speed.get("decode", {}).get("speedup"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--methods", default=",".join(names("structured")))
    ap.add_argument("--ratios", default="0.1,0.2,0.25,0.3")
    ap.add_argument("--per-layer", action="store_true", help="per-block budgets (width only)")
    ap.add_argument("--no-heads", action="store_true", help="width methods: MLP channels only")
    ap.add_argument("--recover-steps", type=int, default=20)
    ap.add_argument("--recover-bf16", action="store_true", help="bf16 autocast in recovery")
    ap.add_argument(
        "--train-windows",
        type=int,
        default=0,
        help="recovery text: this many c4 windows after the calibration ones (0: reuse those)",
    )
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument(
        "--calib-source",
        choices=("c4", "wiki"),
        default="c4",
        help="wiki: the windows after the evaluation ones (disjoint), as in SliceGPT's Table 1",
    )
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--tasks", default="", help="zero-shot tasks, e.g. piqa,arc_easy")
    ap.add_argument("--limit", type=int, default=200, help="documents per task")
    ap.add_argument("--tasks-ratios", default="", help="zero-shot only at these ratios")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--speed-ratios", default="", help="speed only at these ratios")
    ap.add_argument("--out", default=str(HERE / "results" / "structured.json"))
    ap.add_argument("--name", default=None, help="result name (default structured-MODEL)")
    args = ap.parse_args()
    torch.manual_seed(0)
    tasks = resolve_tasks(args.tasks)
    dense, tok = sl.load_model(args.model)
    # one read per corpus: c4 holds the calibration windows then the recovery ones
    c4 = sl.calibration(tok, "c4", args.calib_windows + args.train_windows, args.seqlen)
    train = c4[args.calib_windows :] if args.train_windows > 0 else None
    if args.calib_source == "wiki":
        wiki = sl.calibration(tok, "wiki", args.eval_windows + args.calib_windows, args.seqlen)
        windows, calib = wiki[: args.eval_windows], wiki[args.eval_windows :]
    else:
        calib = c4[: args.calib_windows]
        windows = sl.calibration(tok, "wiki", args.eval_windows, args.seqlen)
    results: dict[str, Any] = {
        "model": args.model,
        "settings": vars(args),
        "dense_zeroshot": run_tasks(dense, tok, tasks, args.limit) if tasks else None,
        "runs": [],
    }
    task_ratios = _ratio_set(args.tasks_ratios)
    speed_ratios = _ratio_set(args.speed_ratios)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        for ratio in (float(x) for x in args.ratios.split(",")):
            step = _step(method, ratio, args.per_layer, args.no_heads)
            per_layer = step.get("per_layer", False)
            model, r = shrink_and_evaluate(
                dense,
                step,
                calib,
                windows,
                recover_steps=args.recover_steps,
                recover_bf16=args.recover_bf16,
                train_ids=train,
            )
            r |= {"method": method, "ratio": ratio, "per_layer": per_layer}
            if tasks and (task_ratios is None or ratio in task_ratios):
                r["zeroshot"] = run_tasks(model, tok, tasks, args.limit)
            if args.speed and (speed_ratios is None or ratio in speed_ratios):
                r["speed"] = compare_speed(dense, model, (512, 2048), new_tokens=128)
            results["runs"].append(r)
            write_json_atomic(out, results)
            print(f"{method} {ratio}: ppl {r['before']['sparse_ppl']:.2f}", flush=True)
    dense_ppl = results["runs"][0]["before"]["dense_ppl"] if results["runs"] else None
    dense_acc = _mean_acc(results["dense_zeroshot"])
    print(f"\ndense wiki ppl {dense_ppl}  (zero-shot mean acc {dense_acc})")
    headers = ["method", "ratio", "removed", "ppl", "KL", "ppl + KD", "0-shot acc"]
    headers += ["prefill 512 x", "prefill 2048 x", "decode x"]
    rows = [_row(r) for r in results["runs"]]
    print(table(headers, rows))
    flat = [dict(zip(headers, row, strict=True)) for row in rows]
    path = write_result(
        args.name or f"structured-{args.model}",
        {"rows": flat, "dense_ppl": dense_ppl, "dense_zeroshot_acc": dense_acc, "full": results},
    )
    print(f"wrote {out} and {path}")


if __name__ == "__main__":
    main()
