"""`sparsellm serve`: an OpenAI-compatible HTTP server on the CPU decode runtime.

Serves /v1/completions and /v1/chat/completions (streaming with ``stream: true``),
/v1/models, /health and Prometheus /metrics. Concurrent requests share the runtime by
continuous batching, up to ``--max-batch`` at a time; with ``--draft`` (speculative
decoding) every running request's draft is verified in one shared pass. Binds to 127.0.0.1
unless ``--host`` says otherwise. Needs the ``serve`` extra (FastAPI, uvicorn,
prometheus-client).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from typing import Any

from sparsellm.errors import SparseLLMError

log = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server on the CPU runtime, with continuous batching",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--model", default="default", metavar="SRC", help="a model (default: default)")
    p.add_argument(
        "--draft",
        default=None,
        metavar="D",
        help="speculative decoding with this draft, as in generate (lossless; requests batch)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        metavar="N",
        help="requests decoded together (default 8)",
    )
    p.set_defaults(json=False)  # `main` reads it; a server prints no result


def _check(args: argparse.Namespace) -> None:
    if args.max_batch < 1:
        raise SparseLLMError("--max-batch must be >= 1")
    if not 0 < args.port < 65536:
        raise SparseLLMError("--port must be in 1..65535")
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if not _has(m)]
    if missing:
        raise SparseLLMError(f"serve needs {', '.join(missing)}: pip install 'sparsellm[serve]'")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run(args: argparse.Namespace) -> None:
    _check(args)
    import uvicorn

    import sparsellm as sl
    from sparsellm.cli.generate import build_runtime, sampler, stop_ids
    from sparsellm.models.adapters import context_window
    from sparsellm.runtime.server import create_app

    loaded = sl.load(args.model)
    window = min(context_window(loaded.model) or 4096, 4096)
    reserve, dense_target = 0, False
    if args.draft is not None:  # imported only here: the module is heavier than serving
        from sparsellm.runtime.speculative import MAX_ROWS, build_draft, prepare_target

        dense_target = prepare_target(args.draft, loaded)  # before the runtime is built
        reserve = MAX_ROWS  # cache room for a verification pass's draft rows
    rt, fmt = build_runtime(loaded, None, window)
    sparse = not dense_target
    draft = None if args.draft is None else build_draft(args.draft, rt, loaded, load=sl.load)
    app = create_app(
        rt,
        loaded.tokenizer,
        args.model,
        sampler=sampler,
        stop_ids=stop_ids(loaded.model, loaded.tokenizer),
        max_batch=args.max_batch,
        sparse=sparse,
        draft=draft,
        context=window - reserve,
    )
    batching = f"up to {args.max_batch} at once" + (
        f", drafting with {args.draft}" if draft else ""
    )
    log.info(f"serving {args.model} ({fmt}) on http://{args.host}:{args.port}/v1, {batching}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
