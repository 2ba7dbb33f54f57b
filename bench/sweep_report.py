"""Sweep 3 methods × 4 sparsities × 2 patterns on the default model, render the report,
and screenshot it in headless Chromium.

Runs `sparsellm sweep` (resumable: rerun to continue), then opens OUT/report.html with
Debian's /usr/bin/chromium and writes OUT/screenshot.png. Prints the points table and the
essential-sparsity knees; writes bench/results/sweep_report.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from sparsellm.cli import main as cli
from sparsellm.report.markdown import table
from sparsellm.report.plots import knees
from sparsellm.report.runs import load_runs, summary

HERE = Path(__file__).resolve().parent
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def screenshot(page: Path, png: Path, width: int = 1300, height: int = 4000) -> None:
    """Render `page` in headless Chromium (Debian package `chromium`) to `png`."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("headless Chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={png}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "sweep"))
    ap.add_argument("--methods", default="wanda,sparsegpt,magnitude")
    ap.add_argument("--sparsities", default="0.3,0.5,0.6,0.7")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--calib-dtype", default="fp32")
    args = ap.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    code = cli(
        [
            "sweep",
            "--methods",
            args.methods,
            "--sparsities",
            args.sparsities,
            "--patterns",
            args.patterns,
            "--out",
            str(out),
            "--calib-dtype",
            args.calib_dtype,
        ]
    )
    if code:
        raise SystemExit(code)
    wall = time.perf_counter() - start
    screenshot(out / "report.html", out / "screenshot.png")
    runs = load_runs([out])
    rows = [summary(r) for r in runs]
    print(
        table(
            ["point", "sparsity", "ppl", "KL", "top-1", "prune s"],
            [
                [r["run"], r["sparsity"], r["sparse_ppl"], r["kl"], r["top1"], r["seconds"]]
                for r in rows
            ],
        )
    )
    found = {f"{m} {f}": k for (m, f), k in knees(runs).items()}
    print(table(["curve", "knee sparsity"], [[k, v] for k, v in found.items()]))
    print(f"wall {wall:.0f} s (this invocation); screenshot {out / 'screenshot.png'}")
    result = {
        "points": rows,
        "knees": found,
        "wall_seconds_this_run": wall,
        "report": str(out / "report.html"),
        "screenshot": str(out / "screenshot.png"),
    }
    (HERE / "results" / "sweep_report.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
