"""Command line: ``sparsellm COMMAND``.

Commands (one module each, in this package):

- ``run``      end to end on the bundled default model: prune, evaluate, report, save
- ``prune``    prune a model with one weight method (``--method wanda:sparsity=0.5``) or a
               recipe of any families, compare with dense, save
- ``shrink``   structured pruning: a smaller dense model, optionally distilled
- ``activate`` calibrated activation sparsity, with CPU decode speed
- ``recover``  distil a pruned model from its dense teacher (masks frozen)
- ``eval``     perplexity / tasks of any model, optionally with sparse attention
- ``sweep``    a methods × sparsities × patterns grid, resumable, local or on Ray
- ``report``   render run and sweep directories of any kind side by side
- ``export``   a compressed (sparse / quantized) checkpoint, or a GGUF for llama.cpp
- ``generate`` text from any model on the CPU decode runtime, streamed
- ``serve``    an OpenAI-compatible HTTP server on that runtime, with continuous batching

Every command that evaluates a model builds one `sparsellm.result.Result` and writes it
as the run's ``sparsellm_manifest.json``; ``report`` reads nothing else. ``--json``
prints the Result (plus the flat keys of older versions, see `pipeline.flat_view`) as
the last stdout line. Bad input ends with a one-line ``error: …`` on stderr and exit
code 2, before any long work starts and without writing anything. Progress bars go to
stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

COMMANDS = (
    "run",
    "prune",
    "shrink",
    "activate",
    "eval",
    "recover",
    "sweep",
    "report",
    "export",
    "generate",
    "serve",
)


def _module(command: str) -> Any:
    """The command's module: it has ``add_parser(sub)`` and ``run(args)``."""
    return importlib.import_module(f"sparsellm.cli.{command}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsellm",
        description="Make a causal LM sparse, compare it with the dense model, save it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        _module(command).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sparsellm.errors import SparseLLMError
    from sparsellm.pipeline import flat_view
    from sparsellm.result import Result

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _quiet_transformers()
    try:
        result = _module(args.command).run(args)
    except SparseLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was saved", file=sys.stderr)
        return 130
    if args.json:
        out = flat_view(result) if isinstance(result, Result) else result
        print(json.dumps(out, default=str))
    return 0


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
