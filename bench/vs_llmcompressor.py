"""Side by side with llm-compressor: Wanda and SparseGPT, same model, data and protocol.

Runs on the bundled default model (or --model): calibration = first 32 windows of 512
tokens of c4, perplexity = first 32 windows of 512 tokens of wiki, seed 0, fp32 weights.
For each method × pattern it prunes a fresh copy with sparsellm (fp32 calibration
forwards, and bf16 forwards with fp32 statistics) and runs llm-compressor's one-shot
pruning (bench/_llmc_worker.py, in its own venv because it pins its own transformers)
on the same token windows. It also measures the floor: the time of two plain forward
passes over the calibration set (embeddings + blocks; no lm_head, which pruning never
runs), since sequential pruning needs one pass to collect statistics and one to
propagate the pruned outputs.

Prints a table and writes ``results/vs_llmcompressor-<model>.json`` (with command,
commit, CPU flags and date; `bench/render_results.py` renders it). Run it with nothing
else on the machine: timings are ratios within one run.

    python bench/vs_llmcompressor.py                      # creates bench/.venv-llmc once
    LLMC_PYTHON=/path/to/python python bench/vs_llmcompressor.py   # reuse a venv
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import write_result

import sparsellm as sl
from sparsellm.eval.perplexity import perplexity
from sparsellm.report.markdown import table

HERE = Path(__file__).resolve().parent
LLMC_PIN = "llmcompressor==0.14.0.1"


def llmc_python() -> str:
    """Interpreter with llm-compressor: $LLMC_PYTHON, else bench/.venv-llmc (made once)."""
    if os.environ.get("LLMC_PYTHON"):
        return os.environ["LLMC_PYTHON"]
    venv = HERE / ".venv-llmc"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"installing {LLMC_PIN} into {venv} (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(py), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # CPU wheel first
        subprocess.run([*pip, LLMC_PIN, "torch==2.13.0", "gguf"], check=True)
    return str(py)


@torch.no_grad()
def floor_seconds(model: torch.nn.Module, calib: torch.Tensor, batch_size: int) -> float:
    """Wall time of two plain fp32 forward passes (embeddings + blocks) over `calib`."""
    base = model.get_decoder()
    start = time.perf_counter()
    for _ in range(2):
        for ids in calib.split(batch_size):
            base(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def run_ours(model, calib, windows, method, pattern, dtype, batch_size) -> dict:
    m = copy.deepcopy(model)
    step = {"method": method, "pattern": pattern}
    if pattern == "unstructured":
        step["sparsity"] = 0.5
    report = sl.sparsify(m, [step], calib, batch_size=batch_size, calib_dtype=dtype)
    ppl = perplexity(m, windows, desc=f"{method} {pattern}")["ppl"]
    return {
        "prune_seconds": report.seconds,
        "sparse_ppl": ppl,
        "measured_sparsity": report.sparsity,
    }


def run_peer(
    python: str,
    model_dir: str,
    files: dict[str, Path],
    method: str,
    pattern: str,
    out: Path,
    sparsity: float = 0.5,
    save_weights: Path | None = None,
) -> dict:
    cmd = [
        python,
        str(HERE / "_llmc_worker.py"),
        "--model",
        model_dir,
        "--calib",
        str(files["calib"]),
        "--eval",
        str(files["eval"]),
        "--method",
        method,
        "--sparsity",
        str(sparsity),
        "--pattern",
        pattern,
        "--out",
        str(out),
    ]
    if save_weights:
        cmd += ["--save-weights", str(save_weights)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument(
        "--dtypes", default="fp32,bf16", help="our calibration forward dtypes (fp32, bf16)"
    )
    ap.add_argument("--skip-peer", action="store_true", help="only run sparsellm")
    ap.add_argument(
        "--skip-floor", action="store_true", help="skip timing the two plain forward passes"
    )
    ap.add_argument("--name", default=None, help="result name (default vs_llmcompressor-MODEL)")
    args = ap.parse_args()
    torch.manual_seed(0)

    loaded = sl.load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    calib = sl.calibration(tok, "c4", args.nsamples, args.seqlen)
    windows = sl.calibration(tok, "wiki", args.eval_windows, args.seqlen)
    floor = None if args.skip_floor else floor_seconds(model, calib, args.batch_size)
    dense_ppl = perplexity(model, windows, desc="dense")["ppl"]
    python = None if args.skip_peer else llmc_python()

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"calib": Path(tmp) / "calib.pt", "eval": Path(tmp) / "eval.pt"}
        torch.save(calib, files["calib"])
        torch.save(windows, files["eval"])
        for method in args.methods.split(","):
            for pattern in args.patterns.split(","):
                entry = {"method": method, "pattern": pattern}
                for name in args.dtypes.split(","):
                    entry[f"ours_{name}"] = run_ours(
                        model, calib, windows, method, pattern, DTYPES[name], args.batch_size
                    )
                if python:
                    entry["llmcompressor"] = run_peer(
                        python,
                        loaded.info["path"],
                        files,
                        method,
                        pattern,
                        Path(tmp) / f"{method}-{pattern[0]}.json",
                    )
                results.append(entry)
                rows.append(_row(entry, floor))
                print(json.dumps(entry), file=sys.stderr)

    headers = [
        "method",
        "pattern",
        "ppl ours fp32",
        "ppl ours bf16",
        "ppl llmc",
        "ours/llmc ppl",
        "s ours fp32",
        "s ours bf16",
        "s llmc",
        "x floor fp32",
        "x floor bf16",
        "x floor llmc",
        "speedup fp32",
        "speedup bf16",
    ]
    print(
        f"dense ppl {dense_ppl:.4f}; floor (2 plain fp32 passes) {floor or float('nan'):.1f}s; "
        f"{args.nsamples}x{args.seqlen} c4 calib, {args.eval_windows}x{args.seqlen} wiki eval"
    )
    print(table(headers, rows))
    flat = [dict(zip(headers, row, strict=True)) for row in rows]
    for r in flat:
        r["model"] = args.model
    path = write_result(
        args.name or f"vs_llmcompressor-{args.model}",
        {
            "rows": flat,
            "dense_ppl": dense_ppl,
            "floor_seconds": floor,
            "protocol": vars(args),
            "results": results,
        },
    )
    print(f"wrote {path}")


DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _row(e: dict, floor: float | None) -> list:
    """One table row; "n/a" where the peer or the bf16 run was skipped."""
    na = "n/a"
    o32, o16, peer = e["ours_fp32"], e.get("ours_bf16"), e.get("llmcompressor")

    def ratio(a: dict | None, b: dict | None, key: str) -> float | str:
        return a[key] / b[key] if a and b else na

    return [
        e["method"],
        e["pattern"],
        o32["sparse_ppl"],
        o16["sparse_ppl"] if o16 else na,
        peer["sparse_ppl"] if peer else na,
        f"{o32['sparse_ppl'] / peer['sparse_ppl']:.4f}" if peer else na,
        o32["prune_seconds"],
        o16["prune_seconds"] if o16 else na,
        peer["prune_seconds"] if peer else na,
        o32["prune_seconds"] / floor if floor else na,
        o16["prune_seconds"] / floor if o16 and floor else na,
        peer["prune_seconds"] / floor if peer and floor else na,
        ratio(peer, o32, "prune_seconds"),
        ratio(peer, o16, "prune_seconds"),
    ]


if __name__ == "__main__":
    main()
