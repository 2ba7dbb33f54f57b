"""`sparsellm export SRC --format FMT --out DIR`: a compressed checkpoint of any model.

Formats: ``hf`` (a plain transformers checkpoint, fp32), ``bf16``, ``int8`` (per output
channel), ``int4`` (group-wise, ``--group``), ``sparse-bf16`` / ``sparse-int8`` /
``sparse-int4`` (bitmask + packed values where that is smaller, so pruned layers shrink
and dense ones stay dense), and ``gguf-q8_0`` (a GGUF for llama.cpp / Ollama, written
from the source's GGUF metadata). Every format except gguf is a directory that
`sparsellm.load` and every command read; `generate` runs it as stored.

The perplexity of the source and of the written checkpoint (reloaded from disk, so it is
what a user gets) are measured on the pinned protocol unless ``--no-eval``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from sparsellm.cli import common
from sparsellm.errors import SparseLLMError

FORMATS = ("hf", "bf16", "int8", "int4", "sparse-bf16", "sparse-int8", "sparse-int4", "gguf-q8_0")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a compressed (sparse and/or quantized) checkpoint or a GGUF",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("source", metavar="SRC", help="a model: 'default', a saved dir, a .gguf, ...")
    p.add_argument(
        "--format", required=True, choices=FORMATS, metavar="FMT", help=", ".join(FORMATS)
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--group",
        type=int,
        default=128,
        help="int4 group size along the input (default 128; a multiple of 32 decodes on the "
        "int8 dot-product tiles where the CPU has AVX-512 VNNI)",
    )
    p.add_argument(
        "--gguf-template",
        default=None,
        metavar="PATH",
        help="gguf-q8_0: the GGUF whose metadata (tokenizer, architecture) to use "
        "(default: the GGUF the source came from, per its manifest)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity comparison")
    p.add_argument(
        "--eval-windows",
        type=int,
        default=common.DEFAULTS["eval_windows"],
        metavar="N",
        help=f"evaluation windows (default: {common.DEFAULTS['eval_windows']})",
    )
    p.add_argument(
        "--seqlen",
        type=int,
        default=common.DEFAULTS["seqlen"],
        help=f"tokens per window (default: {common.DEFAULTS['seqlen']})",
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _template(args: argparse.Namespace, manifest: dict[str, Any] | None) -> Path:
    """The GGUF to take metadata from: --gguf-template, the source itself, or the GGUF the
    source's manifest says it was loaded from."""
    from sparsellm.models.load import resolve_source

    candidates = [args.gguf_template, args.source]
    model_info = ((manifest or {}).get("provenance") or {}).get("model") or {}
    candidates.append(model_info.get("source"))
    for c in candidates:
        if c is None:
            continue
        try:
            kind, where = resolve_source(c)
        except SparseLLMError:
            if c == args.gguf_template:
                raise
            continue
        if kind == "gguf":
            return Path(where)
        if c == args.gguf_template:
            raise SparseLLMError(f"--gguf-template {c} is not a .gguf file")
    raise SparseLLMError(
        "gguf-q8_0 needs a GGUF for the tokenizer and architecture metadata: the source "
        "records none, pass --gguf-template PATH"
    )


def _ppl(model: Any, tok: Any, args: argparse.Namespace) -> float:
    import sparsellm as sl

    ev = sl.evaluate(model, tok, "wiki", args.eval_windows, args.seqlen, 4)
    return float(ev["ppl"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import sparsellm as sl
    from sparsellm.export.compressed import (
        block_linear_bytes_per_param,
        dir_bytes,
        write_compressed,
    )
    from sparsellm.export.gguf import write_gguf_q8_0
    from sparsellm.export.hf import MANIFEST, check_out_dir, write_dir_atomic, write_json_atomic
    from sparsellm.methods.activation.io import unwrapped
    from sparsellm.methods.structured.io import has_layer_shapes
    from sparsellm.models.load import resolve_source

    if args.group < 1 or args.eval_windows < 1 or args.seqlen < 2:
        raise SparseLLMError("--group and --eval-windows must be >= 1, --seqlen >= 2")
    check_out_dir(args.out, args.overwrite)
    kind, where = resolve_source(args.source)
    source_dir = where if kind == "dir" else None
    if source_dir is not None and args.format != "hf" and has_layer_shapes(source_dir):
        raise SparseLLMError(
            f"{args.source} has per-layer shapes (a shrunk model): only --format hf keeps them"
        )
    start = time.perf_counter()
    loaded = sl.load(args.source)
    model, tok = loaded.model, loaded.tokenizer
    manifest = dict(loaded.info.get("manifest") or {})
    template = _template(args, manifest) if args.format == "gguf-q8_0" else None
    source_ppl = None if args.no_eval else _ppl(model, tok, args)
    params = {id(p): p.numel() for p in model.parameters()}
    summary: dict[str, Any] = {"format": args.format, "source": args.source, "out": args.out}
    manifest["export"] = summary
    if args.format == "hf":  # `save` keeps activation thresholds beside the weights
        out = sl.save(model, tok, args.out, manifest, overwrite=args.overwrite)
        bpp = 4.0
        reload_src = str(out)
    with unwrapped(model):
        if args.format == "gguf-q8_0":

            def fill(tmp: Path) -> None:
                write_gguf_q8_0(model, template, tmp / "model-q8_0.gguf")
                write_json_atomic(tmp / MANIFEST, manifest)

            out = write_dir_atomic(args.out, args.overwrite, fill)
            bpp = 34 / 32  # Q8_0: 32 int8 + one fp16 scale per block
            reload_src = str(out / "model-q8_0.gguf")
        elif args.format != "hf":
            out, packed = write_compressed(
                model,
                tok,
                args.out,
                args.format,
                manifest,
                overwrite=args.overwrite,
                group=args.group,
                source_dir=source_dir,
            )
            bpp = block_linear_bytes_per_param(model, packed)
            reload_src = str(out)
    quantized_ppl = None
    if not args.no_eval:
        again = sl.load(reload_src)
        quantized_ppl = _ppl(again.model, again.tokenizer, args)
    summary.update(
        bytes_on_disk=dir_bytes(out),
        dense_fp32_bytes=4 * sum(params.values()),
        block_linear_bytes_per_param=bpp,
        quantized_ppl=quantized_ppl,
        source_ppl=source_ppl,
        seconds=time.perf_counter() - start,
    )
    write_json_atomic(Path(out) / MANIFEST, manifest)
    if not args.json:
        ratio = summary["bytes_on_disk"] / summary["dense_fp32_bytes"]
        mb = summary["bytes_on_disk"] / 1e6
        print(f"wrote {out} ({args.format}): {mb:.1f} MB on disk, {ratio:.2f}x the fp32 "
              f"checkpoint, {bpp:.3f} bytes per block-linear weight")  # fmt: skip
        if quantized_ppl is not None:
            print(f"perplexity: source {source_ppl:.3f}, exported {quantized_ppl:.3f}")
    return summary
