"""`sparsellm report`: render run and sweep directories of any kind side by side.

Reads only Results (each directory's ``sparsellm_manifest.json``; a sweep directory
expands to its points), so prune, shrink, activate, recover and eval runs share one
summary table. Returns the written paths, not a Result.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="render runs and sweeps as Markdown + self-contained HTML with plots",
        description="Read each RUN_DIR's sparsellm_manifest.json (a sweep directory expands "
        "to its points) and write report.md, report.html and plots/*.png: summary table, "
        "essential-sparsity knees, quality-vs-sparsity curves, a quality/cost Pareto plot, "
        "per-layer sparsity, and each run's provenance.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or sweep directories")
    p.add_argument(
        "--out", default="sparsellm-report", metavar="DIR", help="(default: sparsellm-report)"
    )
    p.add_argument("--title", default="sparsellm report", help="page title")
    p.add_argument("--json", action="store_true", help="print the written paths as JSON")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sparsellm.report.render import write_report
    from sparsellm.report.runs import load_runs

    runs = load_runs(args.runs)
    paths = write_report(runs, Path(args.out), args.title)
    print(f"{len(runs)} runs -> {paths['html']} and {paths['markdown']}")
    return {"runs": len(runs), **{k: str(v) for k, v in paths.items()}}
