"""`sparsellm prune`: sparsify a model with one weight method or a recipe, compare, save.

The saved directory is a plain HF checkpoint plus its Result (``sparsellm_manifest.json``),
``report.json`` (the same Result with the flat keys of older versions) and ``report.md``.
`sparsellm run` is this command with the bundled model and an optional ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

from sparsellm.cli import common
from sparsellm.errors import SparseLLMError
from sparsellm.result import Result

DEFAULT_METHOD = "sparsegpt"


def add_flags(p: argparse.ArgumentParser, model_default: str | None, out_required: bool) -> None:
    """The flags of `prune` (and `run`, which differs only in these two defaults)."""
    from sparsellm.registry import names

    common.add_model_and_eval(p, model_default)
    p.add_argument(
        "--method",
        default=None,
        metavar="SPEC",
        help="weight method, a name or a full spec such as wanda:sparsity=0.6,allocation=owl; "
        f"methods: {', '.join(names('weights'))} (default: {DEFAULT_METHOD} unless --recipe "
        "is given)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="fraction of weights to zero in [0, 1) (default 0.5; N:M implies N/M)",
    )
    p.add_argument(
        "--pattern",
        default=None,
        metavar="unstructured|N:M",
        help="unstructured (default), or N:M = N zeros in every M consecutive "
        "input weights, e.g. 2:4, 4:8",
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="FILE",
        help="YAML recipe (steps of any family, optional attention:); exclusive with "
        "--method/--sparsity/--pattern",
    )
    common.add_calib(p)
    common.add_out(p, out_required, "" if out_required else "sparsellm-runs/<timestamp>")
    common.add_speed(p, "512,2048,8192")
    p.add_argument(
        "--no-dense-eval",
        action="store_true",
        help="skip the dense model's evaluation (no before perplexity, KL or top-1)",
    )


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model with one method or a recipe and save it",
        description="Prune SRC, evaluate dense vs sparse perplexity, save.",
    )
    add_flags(p, model_default=None, out_required=True)


def recipe(args: argparse.Namespace) -> Any:
    """The validated Recipe of --recipe, or of --method/--sparsity/--pattern."""
    from sparsellm.recipe import Recipe, load_recipe

    if args.recipe:
        if args.method or args.sparsity is not None or args.pattern:
            raise SparseLLMError("--recipe cannot be combined with --method/--sparsity/--pattern")
        return load_recipe(args.recipe)
    cfg = common.method_config(
        args.method or DEFAULT_METHOD, "weights", sparsity=args.sparsity, pattern=args.pattern
    )
    return Recipe((cfg,))


def run(args: argparse.Namespace, kind: str = "prune") -> Result:
    import sparsellm as sl
    from sparsellm.eval.speed import compare_speed
    from sparsellm.export.hf import check_out_dir
    from sparsellm.pipeline import prepare, prune_and_evaluate
    from sparsellm.report.markdown import quality_table, speed_table, tasks_section

    common.check_counts(args)
    steps = recipe(args)
    out = Path(args.out or f"sparsellm-runs/{time.strftime('%Y%m%d-%H%M%S')}")
    check_out_dir(out, args.overwrite)
    protocol = common.protocol(args)
    if args.speed and args.no_dense_eval:
        raise SparseLLMError("--speed compares against the dense model: drop --no-dense-eval")

    prep = prepare(args.model, protocol)
    model, tok = prep.loaded.model, prep.loaded.tokenizer
    lengths = common.speed_lengths(args, model) if args.speed else ()
    # The dense copy lets one pass after pruning give both perplexities, KL and top-1.
    dense = None if args.no_dense_eval else copy.deepcopy(model)
    result = prune_and_evaluate(model, dense, prep, steps, protocol, kind=kind)
    result.provenance["out"] = str(out)
    if args.speed:
        result.details["speed"] = compare_speed(dense, model, lengths)
    del dense
    sl.save(model, tok, out, manifest=result.to_dict(), overwrite=args.overwrite)
    if args.speed:  # per-model memory needs the saved checkpoint
        result.details["speed"]["memory"] = _memory(prep.loaded.info["path"], out, lengths)
    write(result, out)
    print(quality_table(result))
    for section in tasks_section(result):
        print(section)
    if args.speed:
        print(speed_table(result.details["speed"]))
    print(f"saved sparse model and report to {out}")
    return result


def write(result: Result, out: Path) -> None:
    """The Result as the manifest, plus report.json (flat keys too) and report.md."""
    from sparsellm.export.hf import write_text_atomic
    from sparsellm.pipeline import flat_view
    from sparsellm.report.markdown import markdown_report

    result.write(out)
    text = json.dumps(flat_view(result), indent=2, default=str) + "\n"
    write_text_atomic(out / "report.json", text)
    write_text_atomic(out / "report.md", markdown_report(result))


def _memory(dense_path: str, sparse_path: Path, lengths: tuple[int, ...]) -> dict[str, Any]:
    """Checkpoint bytes and peak RSS of each model alone (fresh process, one prefill)."""
    from sparsellm.eval.memory import checkpoint_bytes, measure_peak_rss

    length = sorted(lengths)[len(lengths) // 2]
    out: dict[str, Any] = {"prefill_length": length}
    for name, path in (("dense", dense_path), ("sparse", sparse_path)):
        out[name] = {"checkpoint_bytes": checkpoint_bytes(path), **measure_peak_rss(path, length)}
    return out
