"""ProSparse on the default model: ReLU-fication plus progressive L1, then the activation
sparsity reached and the perplexity, beside TEAL and CATS at the same skipped fraction.

The student is the default model with its gate activation swapped to ReLU; it trains for
`--minutes` of wall time (bf16 autocast, distillation from the dense SiLU model, as every
CPU-sized recovery here) with the L1 term λ·mean|a| on the gate activations, λ rising
along quarter sines through `--stages`. Every `--log-every` steps the zero fraction of
the training batches is logged. After training: wiki perplexity (32×512), KL and top-1
to dense, and the exact-zero fraction of the gate activations on those windows. The
baselines run on the dense model at that fraction: TEAL (every block linear's input) and
CATS (the MLP gate, the reads a zero ProSparse activation saves). Then decode speed on
our runtime: the ProSparse model with its exact zeros skipped (the fused decoder skips the
down projection's zero inputs of a ReLU model) and dense, beside the dense model with
TEAL at that level. Writes
results/prosparse-default.json (or --name) through bench/provenance.py.

    python bench/prosparse.py [--minutes 20] [--stages 25,50,75] [--lr 3e-4]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import write_result  # noqa: E402

import sparsellm as sl  # noqa: E402
from sparsellm.eval.kl import compare_models  # noqa: E402
from sparsellm.eval.speed import alternate_medians  # noqa: E402
from sparsellm.recover.distill import DistillConfig, distill, summary  # noqa: E402
from sparsellm.recover.prosparse import ActivationL1, progressive_lambda, relufy  # noqa: E402
from sparsellm.report.markdown import table  # noqa: E402
from sparsellm.runtime.decode import DecodeRuntime  # noqa: E402


@torch.no_grad()
def zero_fraction(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Exact zeros among the gate activations over `windows`, one window at a time."""
    with ActivationL1(model) as l1:
        for row in windows:
            model(input_ids=row[None], use_cache=False)
        return l1.zero_fraction()


NOTE = (
    "zero fraction: exact zeros among the MLP gate activations on the 32x512 wiki windows; "
    "TEAL/CATS at that level (at most 0.9) are calibrated skipping, not zeros"
)


def row(model: str, zeros: float, q: dict) -> dict:
    """One table row: the zero (or skipped) fraction and the quality against dense."""
    out = {"model": model, "zero fraction": zeros, "ppl": q["sparse_ppl"], "kl": q["kl"]}
    return out | {"top1": q["top1_agreement"]}


def decode_speeds(runs: dict, prompt: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """Batch-1 greedy decode on our runtime (`--new-tokens` after a 32-token wiki prompt),
    every run alternated with the others (median of `--repeats`): tok/s, the ratio to the
    dense model's dense run and the skipped share of the thresholded reads."""
    stats: dict[str, float | None] = {}

    def job(name: str, rt: DecodeRuntime, sparse: bool) -> float:
        out = rt.generate(prompt, args.new_tokens, sparse=sparse)
        stats[name] = out.get("skipped_fraction")
        return out["decode_s"]

    runtimes = {name: (DecodeRuntime(m, max_len=256), sp) for name, (m, sp) in runs.items()}
    jobs = {n: (lambda n=n, rt=rt, sp=sp: job(n, rt, sp)) for n, (rt, sp) in runtimes.items()}
    med = alternate_medians(jobs, args.repeats)
    base = med["dense, runtime dense"]
    return [
        {"run": k, "decode tok/s": args.new_tokens / v, "vs dense": base / v, "skipped": stats[k]}
        for k, v in med.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall time")
    ap.add_argument("--stages", default="25,50,75", help="λ at the end of each equal stage")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--train-windows", type=int, default=256)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=128, help="decode speed (0: skip it)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="prosparse-default", help="result name under results/")
    args = ap.parse_args()
    stages = [float(x) for x in args.stages.split(",")]
    progressive_lambda(0.0, stages)  # fail on bad stages before loading
    torch.manual_seed(0)
    dense, tok = sl.load_model("default")
    dense.eval()
    data = sl.calibration(tok, "c4", 32 + args.train_windows, 512)
    calib, train = data[:32], data[32:]
    windows = sl.calibration(tok, "wiki", 32, 512)
    rows: list[dict] = []
    trace: list[dict[str, float]] = []
    training: dict = {"minutes": args.minutes, "stages": stages, "lr": args.lr}

    def record(new: dict) -> None:
        """Add a row and rewrite the JSON at once, so a later failure loses nothing."""
        rows.append(new)
        print(new, flush=True)
        write_result(args.name, {"rows": rows, "training": training, "trace": trace,
                                 "note": NOTE})  # fmt: skip

    student = copy.deepcopy(dense)
    relufy(student)
    start = compare_models(dense, student, windows)
    record(row("ReLU, untrained", zero_fraction(student, windows), start))

    with ActivationL1(student) as l1:
        state = {"step": 0, "lam": 0.0}

        def regularizer(progress: float) -> torch.Tensor:
            state["lam"] = progressive_lambda(progress, stages)
            return state["lam"] * l1.penalty()

        def after_step(lr: float) -> None:
            state["step"] += 1
            if state["step"] % args.log_every == 0:
                trace.append({"step": state["step"], "lambda": round(state["lam"], 4),
                              "zero_fraction": round(l1.zero_fraction(), 4)})  # fmt: skip
                print(trace[-1], flush=True)
                l1.reset()

        cfg = DistillConfig(
            steps=100_000,
            batch_size=args.batch_size,
            lr=args.lr,
            max_seconds=args.minutes * 60,
            bf16=True,
            warmup=10,
        )
        training |= summary(distill(student, dense, train, cfg, after_step, regularizer))
    zeros = zero_fraction(student, windows)
    after = compare_models(dense, student, windows)
    record(row(f"ProSparse {args.minutes:g} min", zeros, after))
    level = round(min(zeros, 0.9), 4)  # 0.9: the highest level TEAL calibrates
    baselines = {}
    for method in ("teal", "cats"):
        model = copy.deepcopy(dense)
        sl.sparsify(model, [{"method": method, "sparsity": level}], calib)
        q = compare_models(dense, model, windows)
        record(row(f"dense + {method} {level}", level, q))
        baselines[method] = model
    record({"model": "dense", "zero fraction": 0.0, "ppl": start["dense_ppl"], "kl": 0.0,
            "top1": 1.0})  # fmt: skip
    headers = list(rows[0])
    print(table(headers, [[r[h] for h in headers] for r in rows]))
    if args.new_tokens:
        runs = {
            "dense, runtime dense": (dense, False),
            f"dense + teal {level}, runtime sparse": (baselines["teal"], True),
            "ProSparse, runtime dense": (student, False),
            "ProSparse, zeros skipped": (student, True),
        }
        training["decode"] = decode_speeds(runs, windows[0, :32][None], args)
        record_speed = training["decode"]
        print(table(list(record_speed[0]), [list(r.values()) for r in record_speed]))
        write_result(args.name, {"rows": rows, "training": training, "trace": trace,
                                 "note": NOTE})  # fmt: skip


if __name__ == "__main__":
    main()
