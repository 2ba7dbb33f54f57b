"""How far Token Recycling can go on this CPU: how often the target accepts each position
of a wide static draft tree read out of the adjacency matrix, and, from those rates and
the measured cost of a pass of n rows, the best static tree of each size with the tokens
per pass it would emit and the speedup it bounds.

Why: a speculative speedup is (tokens emitted per pass) / (a pass's cost in decode
steps). On a GPU a pass of ~80 rows costs about a step, so the paper's tree is wide;
on a CPU each row adds to the pass, so a node pays for itself only if the target accepts
it often enough. A node is accepted only if its parent is, so its rate is at most its
parent's, and the n most accepted positions form the best n-node tree; its expected
tokens per pass are 1 + the sum of their rates (the target's own token, plus the
accepted ones). The bound is optimistic: the wide tree's passes refresh more rows of the
matrix than a small tree's would, and it leaves out the draft's own time per pass.

Each prompt is decoded greedily with every pass drafting the whole wide tree (depth
`--depth`, ranks below `--top-k`, rank sum at most `--rank-sum`), on the same prompts
as bench/speculative.py; the matrix carries over from prompt to prompt, as it does there.

    python bench/recycling_tree.py                       # default model, 2 prompts per category

Writes results/recycling-tree-<model>.json (and render_results.py the .md).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import write_result  # noqa: E402
from speculative import PROMPT_TOKENS, pass_cost, prompts  # noqa: E402

import sparsellm as sl  # noqa: E402
from sparsellm.runtime.decode import DecodeRuntime  # noqa: E402
from sparsellm.runtime.speculative import Lane, TokenRecycling  # noqa: E402


def wide_tree(depth: int, top_k: int, rank_sum: int) -> list[tuple[int, ...]]:
    """Every rank path (r1, ..., rd) with d <= depth, ranks below top_k and their sum at
    most rank_sum, shorter paths first (so parents precede children)."""
    return [
        ranks
        for d in range(1, depth + 1)
        for ranks in itertools.product(range(top_k), repeat=d)
        if sum(ranks) <= rank_sum
    ]


def best_trees(
    paths: list[tuple[int, ...]], rates: list[float], cost: dict[str, float], largest: int
) -> list[dict[str, object]]:
    """For n = 1..largest draft nodes: the n most accepted positions (ties: the shallower,
    so a parent always comes before its children), tokens per pass and the speedup bound
    (the cost of a pass of n + 1 rows interpolated between the measured sizes)."""
    order = sorted(range(len(paths)), key=lambda i: (-rates[i], len(paths[i]), paths[i]))
    sizes = sorted(int(n) for n in cost)
    steps = [cost[str(n)] for n in sizes]
    rows, total = [], 1.0
    for n, i in enumerate(order[:largest], start=1):
        total += rates[i]
        pass_steps = float(np.interp(n + 1, sizes, steps))  # held flat past the ends
        rows.append(
            {
                "draft nodes": n,
                "added position": "-".join(map(str, paths[i])),
                "its acceptance": round(rates[i], 3),
                "tokens per pass": round(total, 3),
                "pass cost (steps)": round(pass_steps, 2),
                "speedup bound": round(total / pass_steps, 3),
            }
        )
    return rows


class FixedDepth:
    """A pacer that always drafts the whole tree (Lane's `pace` protocol)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def next_k(self) -> int:
        return self.depth

    def record(self, *args: object, **kwargs: object) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--depth", type=int, default=7)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--rank-sum", type=int, default=2)
    ap.add_argument("--largest", type=int, default=15, help="largest tree reported (nodes)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)

    loaded = sl.load(args.model)
    rt = DecodeRuntime(loaded.model, max_len=2048, packed=loaded.packed)
    paths = wide_tree(args.depth, args.top_k, args.rank_sum)
    index = {p: i for i, p in enumerate(paths)}
    template = [(-1 if len(p) == 1 else index[p[:-1]], p[-1]) for p in paths]
    draft = TokenRecycling(rt.lm_head.out_features, args.top_k, template)
    offered, accepted = [0] * len(paths), [0] * len(paths)
    passes = 0
    t0 = time.perf_counter()
    items = prompts(loaded.tokenizer, args.per_category)
    for k, (category, ids) in enumerate(items):
        lane = Lane(rt, draft, args.new_tokens, switch=False)
        lane.pace = FixedDepth(args.depth)  # type: ignore[assignment]
        rt.reset(1)
        lane.start(ids)
        while not lane.done:
            p = lane.plan(nodes=len(template))
            tree = lane._tree
            nodes = draft.nodes if tree.tokens else []  # no proposal near the budget
            n = len(p.tokens)
            rows = rt.step(torch.tensor(p.tokens), torch.zeros(n, dtype=torch.int64), p.at,
                           p.rope, False, p.visible)  # fmt: skip
            emitted = lane.settle(rows)
            # the accepted path: siblings hold distinct tokens (one row's top-k)
            node = -1
            for token in emitted[:-1]:
                node = next(i for i, t in enumerate(tree.tokens)
                            if tree.parents[i] == node and t == token)  # fmt: skip
                accepted[nodes[node]] += 1
            for i in nodes:
                offered[i] += 1
            passes += 1
        print(f"[{k + 1}/{len(items)}] {category} {time.perf_counter() - t0:.0f} s", flush=True)

    rates = [a / passes for a in accepted]
    cost = pass_cost(rt, context=PROMPT_TOKENS + args.new_tokens // 2)
    rows = best_trees(paths, rates, cost, args.largest)
    best = max(rows, key=lambda r: float(r["speedup bound"]))  # type: ignore[arg-type]
    print(f"pass cost {cost}; best: {best}", flush=True)
    write_result(
        args.name or f"recycling-tree-{args.model}",
        {
            "rows": rows,
            "model": args.model,
            "prompts": f"{args.per_category} per category, last {PROMPT_TOKENS} tokens, "
            f"{args.new_tokens} new tokens, greedy (bench/speculative.py's prompts)",
            "wide_tree": f"{len(paths)} positions: depth <= {args.depth}, ranks < {args.top_k}, "
            f"rank sum <= {args.rank_sum}",
            "passes": passes,
            "pass_cost_in_steps": cost,
            "best_speedup_bound": best["speedup bound"],
            "best_tree_nodes": best["draft nodes"],
            "acceptance": "passes in which the target accepted the position / all passes",
            "offered": {
                "-".join(map(str, p)): round(o / passes, 3)
                for p, o in zip(paths, offered, strict=True)
                if o
            },
        },
    )


if __name__ == "__main__":
    main()
