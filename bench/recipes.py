"""Training-free recipes beyond the baselines vs llm-compressor's SparseGPT (issue 4 bars).

Same protocol as bench/vs_llmcompressor.py: default model, calibration = first 32×512 c4
windows, perplexity + KL/top-1 to dense on the first 32×512 wiki windows, seed 0, fp32.
Each recipe prunes a fresh copy of the dense model; llm-compressor's SparseGPT runs in
its own venv on the same token tensors at 50%, 70% and 2:4. Prints one table with
ours/llmc perplexity ratios and writes bench/results/recipes.json.

    python bench/recipes.py [--only NAME,NAME] [--skip-peer]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import sparsellm as sl
from sparsellm.api import versions
from sparsellm.eval.kl import compare_models
from sparsellm.report.markdown import table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_llmcompressor import llmc_python, run_peer  # noqa: E402

OWL = {"allocation": "owl"}
RECIPES: dict[str, tuple[str, list[dict]]] = {
    # name: (peer setting it is compared with, steps)
    "sparsegpt-50": ("0.5", [{"method": "sparsegpt", "sparsity": 0.5}]),
    "sparsegpt-50+dsnot": ("0.5", [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "dsnot"}]),
    "wanda-50+dsnot": ("0.5", [{"method": "wanda", "sparsity": 0.5}, {"method": "dsnot"}]),
    "sparsegpt-owl-50": ("0.5", [{"method": "sparsegpt", "sparsity": 0.5, **OWL}]),
    "gblm-50": ("0.5", [{"method": "gblm", "sparsity": 0.5}]),
    "gblm-owl-70+dsnot": (
        "0.7",
        [{"method": "gblm", "sparsity": 0.7, **OWL}, {"method": "dsnot", "sparsity": 0.7}],
    ),
    "sparsegpt-70": ("0.7", [{"method": "sparsegpt", "sparsity": 0.7}]),
    "sparsegpt-owl-70": ("0.7", [{"method": "sparsegpt", "sparsity": 0.7, **OWL}]),
    "sparsegpt-owl-70+dsnot": (
        "0.7",
        [{"method": "sparsegpt", "sparsity": 0.7, **OWL}, {"method": "dsnot", "sparsity": 0.7}],
    ),
    "wanda-owl-70+dsnot": (
        "0.7",
        [{"method": "wanda", "sparsity": 0.7, **OWL}, {"method": "dsnot", "sparsity": 0.7}],
    ),
    "sparsegpt-2:4": ("2:4", [{"method": "sparsegpt", "pattern": "2:4"}]),
    "sparsegpt-2:4+dsnot": (
        "2:4",
        [{"method": "sparsegpt", "pattern": "2:4"}, {"method": "dsnot", "pattern": "2:4"}],
    ),
}
PEERS = {"0.5": ("unstructured", 0.5), "0.7": ("unstructured", 0.7), "2:4": ("2:4", 0.5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated recipe names")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "recipes.json"))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(RECIPES)
    torch.manual_seed(0)
    loaded = sl.load_model("default")
    dense, tok = loaded.model, loaded.tokenizer
    calib = sl.calibration(tok, "c4", 32, 512)
    windows = sl.calibration(tok, "wiki", 32, 512)
    results: dict[str, dict] = {}
    for name in names:
        peer_key, steps = RECIPES[name]
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = sl.sparsify(model, steps, calib)
        quality = compare_models(dense, model, windows)
        results[name] = {
            "peer": peer_key,
            "steps": steps,
            "seconds": time.perf_counter() - start,
            "measured_sparsity": report.sparsity,
            **quality,
        }
        print(json.dumps({name: results[name]}), file=sys.stderr)
    peers: dict[str, dict] = {}
    if not args.skip_peer:
        python = llmc_python()
        with tempfile.TemporaryDirectory() as tmp:
            files = {"calib": Path(tmp) / "calib.pt", "eval": Path(tmp) / "eval.pt"}
            torch.save(calib, files["calib"])
            torch.save(windows, files["eval"])
            for key in sorted({results[n]["peer"] for n in names}):
                pattern, sparsity = PEERS[key]
                peers[key] = run_peer(
                    python,
                    loaded.info["path"],
                    files,
                    "sparsegpt",
                    pattern,
                    Path(tmp) / f"peer-{key.replace(':', '_')}.json",
                    sparsity,
                )
    rows = []
    for name, r in results.items():
        peer = peers.get(r["peer"], {}).get("sparse_ppl")
        rows.append(
            [
                name,
                r["measured_sparsity"],
                r["sparse_ppl"],
                peer,
                f"{(r['sparse_ppl'] / peer - 1) * 100:+.1f}%" if peer else "n/a",
                r["kl"],
                r["top1_agreement"],
                r["seconds"],
            ]
        )
    dense_ppl = next(iter(results.values()))["dense_ppl"]
    print(f"dense ppl {dense_ppl:.3f}")
    print(
        table(
            [
                "recipe",
                "sparsity",
                "ppl",
                "llmc sparsegpt ppl",
                "vs llmc",
                "KL",
                "top-1",
                "seconds",
            ],
            rows,
        )
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "dense_ppl": dense_ppl,
                "results": results,
                "llmcompressor": peers,
                "versions": versions(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
