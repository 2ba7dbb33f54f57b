"""Training-free recipes beyond the baselines vs llm-compressor's SparseGPT (issue 4 bars).

Same protocol as bench/vs_llmcompressor.py: default model, calibration = first 32×512 c4
windows, perplexity + KL/top-1 to dense on the first 32×512 wiki windows, seed 0, fp32.
Each recipe prunes a fresh copy of the dense model; llm-compressor's SparseGPT runs in
its own venv on the same token tensors at 50%, 70% and 2:4. `--zeroshot` also scores the
named rows (recipes, ``dense`` or ``llmc-0.5`` / ``llmc-0.7`` / ``llmc-2:4``, the peer's
pruned weights loaded into our model) on the zero-shot group, first `--zs-limit` docs
per task. Results are merged into bench/results/recipes.json (rows and peers from
earlier runs are kept unless rerun), and one table of every row is printed.

    python bench/recipes.py [--only NAME,NAME] [--skip-peer] [--zeroshot NAME,..]
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
from sparsellm.eval.suite import resolve_tasks, run_tasks
from sparsellm.report.markdown import table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_llmcompressor import llmc_python, run_peer  # noqa: E402

OWL = {"allocation": "owl"}
EVO = {  # a CPU-sized search: 5 levels (±2×5%), 16 generations × 4 offspring
    "allocation": "evopress",
    "evo_levels": 2,
    "evo_generations": 16,
    "evo_offspring": 4,
    "evo_state": str(HERE / "results" / "evopress-admm-70.json"),
}
UPDATE = {"method": "admm_update", "iterations": 50}
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
    "admm-50": ("0.5", [{"method": "admm", "sparsity": 0.5}]),
    "admm-70": ("0.7", [{"method": "admm", "sparsity": 0.7}]),
    "admm-2:4": ("2:4", [{"method": "admm", "pattern": "2:4"}]),
    "sparsegpt-50+admm_update": ("0.5", [{"method": "sparsegpt", "sparsity": 0.5}, UPDATE]),
    "sparsegpt-70+admm_update": ("0.7", [{"method": "sparsegpt", "sparsity": 0.7}, UPDATE]),
    "sparsegpt-2:4+admm_update": ("2:4", [{"method": "sparsegpt", "pattern": "2:4"}, UPDATE]),
    "admm-owl-70": ("0.7", [{"method": "admm", "sparsity": 0.7, **OWL}]),
    "admm-evopress-70": ("0.7", [{"method": "admm", "sparsity": 0.7, **EVO}]),
    "sparsegpt-evopress-70": (  # the same search with the cheaper pruner in its database
        "0.7",
        [
            {
                "method": "sparsegpt",
                "sparsity": 0.7,
                **EVO,
                "evo_state": str(HERE / "results" / "evopress-sparsegpt-70.json"),
            }
        ],
    ),
}
PEERS = {"0.5": ("unstructured", 0.5), "0.7": ("unstructured", 0.7), "2:4": ("2:4", 0.5)}


def zeroshot(model: torch.nn.Module, tokenizer, limit: int) -> dict:
    """Accuracy per zero-shot task (first `limit` docs) and their plain average."""
    tasks = run_tasks(model, tokenizer, resolve_tasks("zeroshot"), limit)
    acc = {t: r["acc"] for t, r in tasks.items()}
    return {"acc": acc, "average": sum(acc.values()) / len(acc), "limit": limit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated recipe names")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--rerun-peer", action="store_true", help="rerun peers already stored")
    ap.add_argument("--zeroshot", default="", help="rows to score: recipes, dense, llmc-KEY")
    ap.add_argument("--zs-limit", type=int, default=100)
    ap.add_argument("--out", default=str(HERE / "results" / "recipes.json"))
    ap.add_argument("--save-dir", help="sparsellm.save every pruned model to DIR/NAME")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    zs_rows = [n for n in args.zeroshot.split(",") if n]
    unknown = [n for n in names + zs_rows if n not in RECIPES and n != "dense"]
    if any(not (n.startswith("llmc-") and n[5:] in PEERS) for n in unknown):
        raise SystemExit(f"unknown rows {unknown}; recipes: {', '.join(RECIPES)}")
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    results: dict[str, dict] = old.get("results", {})
    peers: dict[str, dict] = old.get("llmcompressor", {})
    scores: dict[str, dict] = old.get("zeroshot", {})
    torch.manual_seed(0)
    loaded = sl.load_model("default")
    dense, tok = loaded.model, loaded.tokenizer
    calib = sl.calibration(tok, "c4", 32, 512)
    windows = sl.calibration(tok, "wiki", 32, 512)
    if "dense" in zs_rows:
        scores["dense"] = zeroshot(dense, tok, args.zs_limit)
    for name in names + [n for n in zs_rows if n in RECIPES and n not in names]:
        peer_key, steps = RECIPES[name]
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = sl.sparsify(model, steps, calib)
        seconds = time.perf_counter() - start
        results[name] = {
            "peer": peer_key,
            "steps": steps,
            "seconds": seconds,
            "measured_sparsity": report.sparsity,
            **compare_models(dense, model, windows),
        }
        if args.save_dir:  # e.g. a start point for bench/recovery.py --start DIR/NAME
            sl.save(model, tok, Path(args.save_dir) / name.replace(":", "_"), overwrite=True)
        if name in zs_rows:
            scores[name] = zeroshot(model, tok, args.zs_limit)
        print(json.dumps({name: results[name]}), file=sys.stderr)
    wanted = {RECIPES[n][0] for n in names} | {n[5:] for n in zs_rows if n.startswith("llmc-")}
    if not args.skip_peer:
        python = llmc_python()
        with tempfile.TemporaryDirectory() as tmp:
            files = {"calib": Path(tmp) / "calib.pt", "eval": Path(tmp) / "eval.pt"}
            torch.save(calib, files["calib"])
            torch.save(windows, files["eval"])
            for key in sorted(wanted):
                score = f"llmc-{key}" in zs_rows
                if key in peers and not (args.rerun_peer or score):
                    continue
                pattern, sparsity = PEERS[key]
                tag = key.replace(":", "_")
                weights = Path(tmp) / f"peer-{tag}.pt" if score else None
                peers[key] = run_peer(
                    python,
                    loaded.info["path"],
                    files,
                    "sparsegpt",
                    pattern,
                    Path(tmp) / f"peer-{tag}.json",
                    sparsity,
                    save_weights=weights,
                )
                if weights:
                    model = copy.deepcopy(dense)
                    state = torch.load(weights, weights_only=True)
                    missing = set(state) - set(model.state_dict())
                    assert not missing, f"peer weights not in our model: {sorted(missing)[:3]}"
                    model.load_state_dict(state, strict=False)
                    scores[f"llmc-{key}"] = zeroshot(model, tok, args.zs_limit)
    # merge with what other runs wrote meanwhile (runs may go in parallel)
    now = json.loads(out.read_text()) if out.is_file() else {}
    results = {**now.get("results", {}), **{n: results[n] for n in names + zs_rows if n in results}}
    peers = {**now.get("llmcompressor", {}), **peers}
    scores = {**now.get("zeroshot", {}), **scores}
    dense_ppl = next(iter(results.values()))["dense_ppl"]
    rows = []
    for key, peer in sorted(peers.items()):
        zs = scores.get(f"llmc-{key}", {}).get("average")
        rows.append([f"llmc sparsegpt {key}", peer["measured_sparsity"], peer["sparse_ppl"]])
        rows[-1] += [peer["sparse_ppl"], "+0.0%", None, None, zs, peer["prune_seconds"]]
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
                scores.get(name, {}).get("average"),
                r["seconds"],
            ]
        )
    print(f"dense ppl {dense_ppl:.3f}; dense zero-shot {scores.get('dense', {}).get('average')}")
    headers = ["recipe", "sparsity", "ppl", "llmc ppl", "vs llmc", "KL", "top-1", "0-shot avg"]
    print(table([*headers, "seconds"], rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "dense_ppl": dense_ppl,
                "results": results,
                "llmcompressor": peers,
                "zeroshot": scores,
                "versions": versions(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
