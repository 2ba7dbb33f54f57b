"""`sparsellm sweep`: a methods × sparsities × patterns grid under one protocol.

Each finished point is a Result of kind ``sweep-point`` under OUT/points (see
`sparsellm.sweep`); the command itself returns the grid's bookkeeping, not a Result.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sparsellm.cli import common
from sparsellm.errors import SparseLLMError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a methods x sparsities x patterns grid (resumable) and write one report",
        description="Prune and evaluate every grid point under one protocol; finished points "
        "are kept in OUT/points and skipped when the same command runs again. N:M patterns "
        "give the group size M: at sparsity s a point uses round(s*M):M (0.3 -> 1:4, "
        "0.5 -> 2:4, 0.7 -> 3:4), deduplicated. Ends with OUT/report.html and report.md. "
        "On a Ray cluster: start it with `ray start --head` (then `ray start "
        "--address=HEAD:6379` on each worker machine) and pass --executor ray "
        "--ray-address auto; workers load the model themselves, the driver writes results.",
    )
    common.add_model_and_eval(p, "default")
    common.add_calib(p)
    p.add_argument(
        "--methods",
        default="wanda,sparsegpt,magnitude",
        metavar="LIST",
        help="comma-separated weight methods (default: wanda,sparsegpt,magnitude)",
    )
    p.add_argument(
        "--sparsities",
        default="0.3,0.5,0.6,0.7",
        metavar="LIST",
        help="comma-separated sparsities in [0, 1) (default: 0.3,0.5,0.6,0.7)",
    )
    p.add_argument(
        "--patterns",
        default="unstructured,2:4",
        metavar="LIST",
        help="comma-separated patterns (default: unstructured,2:4)",
    )
    p.add_argument(
        "--out",
        default="sparsellm-sweep",
        metavar="DIR",
        help="sweep directory; rerun with the same DIR to resume (default: sparsellm-sweep)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="discard an existing sweep in --out and start over"
    )
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: one process, points in turn (default); ray: one Ray task per point",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster address ('auto' for a `ray start` cluster; default: start a local one)",
    )
    p.add_argument(
        "--ray-cpus-per-point",
        type=float,
        default=None,
        metavar="N",
        help="CPUs each Ray point reserves (default: the smallest node's CPU count, so a "
        "point fits on any node)",
    )
    p.add_argument(
        "--save-models",
        action="store_true",
        help="also save every point's weights (538 MB each for the default model)",
    )


def _float_list(value: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise SparseLLMError(f"{flag} must be comma-separated numbers, got {value!r}") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sparsellm.report.render import write_report
    from sparsellm.report.runs import load_runs
    from sparsellm.sweep import grid, open_sweep, run_local, run_ray

    common.check_counts(args)
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    points = grid(
        split(args.methods), _float_list(args.sparsities, "--sparsities"), split(args.patterns)
    )
    protocol = common.protocol(args)
    out = Path(args.out)
    todo = open_sweep(out, args.model, protocol, points, args.overwrite)
    print(f"sweep {out}: {len(points)} points, {len(points) - len(todo)} already done")
    if args.executor == "ray":
        run_ray(
            out,
            args.model,
            protocol,
            todo,
            args.ray_address,
            args.ray_cpus_per_point,
            args.save_models,
        )
    else:
        run_local(out, args.model, protocol, todo, args.save_models)
    runs = load_runs([out])
    paths = write_report(runs, out, f"sparsellm sweep: {args.model}")
    print(f"{len(runs)} points -> {paths['html']}")
    return {
        "points": [p.name for p in points],
        "ran": [p.name for p in todo],
        **{k: str(v) for k, v in paths.items()},
    }
