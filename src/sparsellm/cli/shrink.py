"""`sparsellm shrink`: structured pruning to a smaller dense model, optionally distilled.

The Result's ``before`` is the dense parent and ``after`` the shrunk model (after
recovery when ``--recover-steps`` > 0; the numbers before recovery are then under
``details.unrecovered``); ``sparsity.measured`` is the share of block parameters removed
and ``details.shrink`` the method's own report (widths, dropped blocks, ranks).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

from sparsellm.cli import common
from sparsellm.errors import SparseLLMError
from sparsellm.result import Result


def add_parser(sub: Any) -> None:
    from sparsellm.registry import names

    p = sub.add_parser(
        "shrink",
        help="structured pruning: a smaller dense model (heads, channels or blocks removed)",
        description="Remove --ratio of the transformer blocks' parameters with a structured "
        "method, compare dense vs shrunk perplexity, optionally distil, save. Uniform widths "
        "save as a plain HF checkpoint; --per-layer widths load only with sparsellm.load.",
    )
    common.add_model_and_eval(p, None)
    common.add_calib(p)
    p.add_argument("--method", required=True, choices=names("structured"), help="method")
    p.add_argument(
        "--ratio", type=float, required=True, help="fraction of block parameters to remove"
    )
    p.add_argument(
        "--per-layer",
        action="store_true",
        help="per-block budgets from angular distance (CFSP coarse step); width methods only",
    )
    p.add_argument(
        "--no-heads", action="store_true", help="width methods: remove MLP channels only"
    )
    p.add_argument(
        "--recover-steps", type=int, default=0, help="distillation steps after (default: 0)"
    )
    common.add_out(p, required=True)
    common.add_speed(p, "512,2048")
    p.add_argument(
        "--stream",
        action="store_true",
        help="shrink block by block from the checkpoint's shards, one block in RAM, for models "
        "larger than memory; resumable (rerun the same command after a kill); evaluated block "
        "by block. Block-local methods only: activation, obs, spectral, without --per-layer",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="with --stream: calibration activations above SIZE (e.g. 2G, 512M) are kept in "
        "memory-mapped files the OS can page out, instead of RAM (default: all in RAM)",
    )


def config(args: argparse.Namespace) -> Any:
    """The structured config of the flags; --per-layer / --no-heads only where declared,
    so asking them of a method without the key is an error naming the valid keys."""
    from sparsellm.config import from_dict

    raw: dict[str, Any] = {"method": args.method, "ratio": args.ratio}
    if args.per_layer:
        raw["per_layer"] = True
    if args.no_heads:
        raw["prune_heads"] = False
    return from_dict(raw, "structured")


def run(args: argparse.Namespace) -> Result:
    import sparsellm as sl
    from sparsellm.eval.kl import compare_models
    from sparsellm.eval.speed import compare_speed
    from sparsellm.export.hf import check_out_dir
    from sparsellm.pipeline import prepare, provenance, quality, run_tasks
    from sparsellm.recipe import Recipe
    from sparsellm.recover.structured import recover
    from sparsellm.report.markdown import quality_table, table

    common.check_counts(args)
    if args.calib_dtype != "fp32":
        raise SparseLLMError("structured pruning calibrates in fp32 only")
    if args.recover_steps < 0:
        raise SparseLLMError("--recover-steps must be >= 0")
    recipe = Recipe((config(args),))
    out = check_out_dir(Path(args.out), args.overwrite)
    protocol = common.protocol(args)
    if args.stream:
        return run_streamed(args, recipe.steps[0], protocol, out)
    if args.max_memory is not None:
        raise SparseLLMError("--max-memory bounds a streamed run: add --stream")
    prep = prepare(args.model, protocol)
    dense, tok = prep.loaded.model, prep.loaded.tokenizer
    lengths = common.speed_lengths(args, dense) if args.speed else ()
    model = copy.deepcopy(dense)
    report = sl.sparsify(model, recipe, prep.calib_ids, batch_size=args.batch_size)
    shrunk = report.details[0]
    timings = {"shrink_s": report.seconds}
    compared = compare_models(dense, model, prep.eval_ids)
    details: dict[str, Any] = {"shrink": shrunk}
    if args.recover_steps > 0:
        start = time.perf_counter()
        details["unrecovered"] = {"ppl": compared["sparse_ppl"]} | {
            k: compared[k] for k in ("kl", "top1_agreement")
        }
        details["recovery"] = recover(
            model, dense, prep.calib_ids, args.recover_steps, seed=args.seed
        )
        timings["recover_s"] = time.perf_counter() - start
        compared = compare_models(dense, model, prep.eval_ids)
    tasks = (None, None)
    if protocol.tasks:
        tasks = (run_tasks(dense, tok, protocol), run_tasks(model, tok, protocol))
    if args.speed:
        details["speed"] = compare_speed(dense, model, lengths)
    result = Result(
        kind="shrink",
        recipe=recipe.to_dict(),
        quality=quality(compared, *tasks),
        sparsity={"target": args.ratio, "measured": shrunk["measured_ratio"]},
        timings=timings,
        provenance=provenance(prep, protocol, out=str(out)),
        details=details,
    )
    sl.save(model, tok, out, manifest=result.to_dict(), overwrite=args.overwrite)
    result.write(out)
    print(quality_table(result))
    if "unrecovered" in details:
        before = details["unrecovered"]
        rows = [[before["ppl"], before["kl"], before["top1_agreement"]]]
        print("before recovery:\n" + table(["shrunk ppl", "KL", "top-1"], rows))
    uniform = shrunk.get("uniform", True)
    how = "a plain HF checkpoint" if uniform else "per-layer widths: load with sparsellm.load"
    print(f"removed {shrunk['measured_ratio']:.1%} of block params; saved {how} to {out}")
    return result


def run_streamed(args: argparse.Namespace, step: Any, protocol: Any, out: Path) -> Result:
    """`shrink --stream`: one block-local width step, block by block, resumable."""
    from sparsellm.cli.prune import stream_step
    from sparsellm.methods.structured.stream import check_streamable

    check_streamable(step)
    for flag, value in (("--speed", args.speed), ("--recover-steps", args.recover_steps)):
        if value:
            raise SparseLLMError(f"{flag} needs the model in RAM: drop it with --stream")
    result = stream_step(args, step, protocol, out, "shrink")
    shrunk = result.details["shrink"]
    how = "a plain HF checkpoint" if shrunk["uniform"] else "per-layer widths: sparsellm.load"
    print(f"removed {shrunk['measured_ratio']:.1%} of block params; saved {how} to {out}")
    return result
