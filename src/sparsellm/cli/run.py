"""`sparsellm run`: `prune` end to end on the bundled default model, ``--out`` optional."""

from __future__ import annotations

import argparse
from typing import Any

from sparsellm.cli import prune
from sparsellm.result import Result


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="end-to-end on the bundled default model: prune, evaluate, report, save",
        description="Load the model (default: bundled SmolLM2-135M), calibrate on c4, prune "
        f"with the default method ({prune.DEFAULT_METHOD}, 50%% unstructured), compare dense "
        "vs sparse perplexity on wiki, save the sparse model compressed (sparse-int8: bitmask + "
        "int8 values), reload it and compare size, RAM, decode speed and perplexity with the "
        "dense model; write report.json/report.md.",
    )
    prune.add_flags(p, model_default="default", out_required=False, export="sparse-int8")


def run(args: argparse.Namespace) -> Result:
    return prune.run(args, kind="run")
