"""`sparsellm prune`: sparsify a model with one weight method or a recipe, compare, save.

The saved directory is a plain HF checkpoint plus its Result (``sparsellm_manifest.json``),
``report.json`` (the same Result with the flat keys of older versions) and ``report.md``.
`sparsellm run` is this command with the bundled model and an optional ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

from sparsellm.cli import common
from sparsellm.errors import SparseLLMError
from sparsellm.result import Result

DEFAULT_METHOD = "sparsegpt"


EXPORTS = ("hf", "bf16", "int8", "int4", "sparse-bf16", "sparse-int8", "sparse-int4")


def add_flags(
    p: argparse.ArgumentParser, model_default: str | None, out_required: bool, export: str = "hf"
) -> None:
    """The flags of `prune` (and `run`, which differs only in these defaults)."""
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
        "--export",
        default=export,
        choices=EXPORTS,
        metavar="FMT",
        help="how to save the pruned model: hf (plain transformers, fp32) or a compressed "
        "format (see `sparsellm export`); a compressed one is then re-evaluated from disk and "
        "its decode speed, size and RAM are compared with the dense model's "
        f"(default: {export})",
    )
    p.add_argument(
        "--no-dense-eval",
        action="store_true",
        help="skip the dense model's evaluation (no before perplexity, KL or top-1)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="prune block by block from the checkpoint's shards, writing each pruned block as "
        "its own shard: one block in RAM, for models larger than memory; resumable (rerun the "
        "same command after a kill); one weight step, saved as hf, evaluated block by block. "
        "Chosen automatically when the model would not fit in available memory",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="with --stream: calibration activations above SIZE (e.g. 2G, 512M), and a "
        "Hessian whose fp64 sum is above SIZE, are kept in memory-mapped files the OS can "
        "page out, instead of RAM (default: all in RAM)",
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
    from sparsellm.export.compressed import write_compressed
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

    if args.stream or (args.max_memory is None and _would_not_fit(args.model)):
        return run_streamed(args, steps, protocol, out, kind)
    if args.max_memory is not None:
        raise SparseLLMError("--max-memory bounds a streamed run: add --stream")
    prep = prepare(args.model, protocol)
    model, tok = prep.loaded.model, prep.loaded.tokenizer
    lengths = common.speed_lengths(args, model) if args.speed else ()
    # The dense side of the comparison: from the checkpoint, block by block, when only the
    # evaluation needs it (no second model in memory); else a dense copy.
    dense_checkpoint = None
    if not args.no_dense_eval and not args.speed and args.export == "hf":
        dense_checkpoint = _streamable_dense(prep.loaded.info.get("path"), steps, protocol)
    dense = None if args.no_dense_eval or dense_checkpoint else copy.deepcopy(model)
    result = prune_and_evaluate(
        model, dense, prep, steps, protocol, kind=kind, dense_checkpoint=dense_checkpoint
    )
    result.provenance["out"] = str(out)
    if args.speed:
        result.details["speed"] = compare_speed(dense, model, lengths)
    if args.export == "hf":
        del dense
        sl.save(model, tok, out, manifest=result.to_dict(), overwrite=args.overwrite)
    else:
        _check_exportable(model)
        write_compressed(model, tok, out, args.export, result.to_dict(), overwrite=args.overwrite)
        result.details["export"] = deployed(dense, prep, out, args.export, result)
        del dense
    if args.speed:  # per-model memory needs the saved checkpoint
        result.details["speed"]["memory"] = _memory(prep.loaded.info["path"], out, lengths)
    write(result, out)
    print(quality_table(result))
    for section in tasks_section(result):
        print(section)
    if args.speed:
        print(speed_table(result.details["speed"]))
    if "export" in result.details:
        print(deployed_table(result.details["export"]))
    print(f"saved sparse model and report to {out}")
    return result


def _streamable_dense(path: str | None, steps: Any, protocol: Any) -> Path | None:
    """The source checkpoint, if the comparison can read the dense model from it: a local
    safetensors directory, a recipe of weight steps only (final norm and head untouched),
    no prefill attention method and no tasks (those run the dense model whole)."""
    from sparsellm.models.shards import INDEX, SINGLE

    if path is None or protocol.tasks or steps.attention.prefill is not None:
        return None
    if any(s.family != "weights" for s in steps.steps):
        return None
    where = Path(path)
    return where if (where / SINGLE).is_file() or (where / INDEX).is_file() else None


def parse_size(text: str) -> int:
    """Bytes of a size such as 2G, 512M, 1.5GB, 4096 (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in units and raw[-1:] else (raw, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise SparseLLMError(
            f"--max-memory: expected a size such as 2G or 512M, got {text!r}"
        ) from None
    if value <= 0:
        raise SparseLLMError(f"--max-memory must be positive, got {text!r}")
    return int(value)


def _would_not_fit(source: str) -> bool:
    """A local checkpoint whose fp32 weights, twice (pruned model + dense reference), are
    more than the memory available now: such a run is streamed without being asked."""
    from sparsellm.eval.memory import available_bytes
    from sparsellm.models.load import resolve_source
    from sparsellm.models.shards import Checkpoint, fp32_bytes

    try:
        kind, where = resolve_source(source)
        if kind != "dir" or not any(Path(where).glob("*.safetensors")):
            return False
        need = 2 * fp32_bytes(Checkpoint(where))
    except SparseLLMError:
        return False  # not streamable: the in-RAM path reports the problem
    available = available_bytes()
    if available is None or need <= available:
        return False
    print(
        f"{source}: {need / 2**30:.1f} GiB of fp32 weights x2 > {available / 2**30:.1f} GiB "
        "available: pruning streamed (--stream)"
    )
    return True


def run_streamed(
    args: argparse.Namespace, steps: Any, protocol: Any, out: Path, kind: str
) -> Result:
    """`prune --stream`: one weight step, block by block, resumable; saved as hf."""
    if len(steps.steps) != 1 or steps.steps[0].family != "weights" or steps.attention.prefill:
        raise SparseLLMError("--stream prunes with one weight method (no multi-step recipe)")
    for flag, value in (("--speed", args.speed), ("--export", args.export != "hf")):
        if value:
            raise SparseLLMError(
                f"{flag} needs the model in RAM: drop it with --stream (a streamed run saves "
                "a plain checkpoint; `sparsellm export` compresses it afterwards)"
            )
    return stream_step(args, steps.steps[0], protocol, out, kind)


def stream_step(args: argparse.Namespace, step: Any, protocol: Any, out: Path, kind: str) -> Result:
    """One step streamed into ``OUT.partial`` (resumable), evaluated block by block,
    written with its Result and moved to `out`; shared by `prune` and `shrink`."""
    from sparsellm.export.hf import promote_dir
    from sparsellm.report.markdown import quality_table
    from sparsellm.streaming import prepare_streamed, stream_prune_and_evaluate

    max_memory = None if args.max_memory is None else parse_size(args.max_memory)
    prep = prepare_streamed(args.model, protocol)
    work = out.with_name(f"{out.name}.partial")
    print(f"streaming into {work} (rerun the same command to resume after an interruption)")
    try:
        result = stream_prune_and_evaluate(
            prep,
            step,
            protocol,
            work,
            max_memory=max_memory,
            dense_eval=not getattr(args, "no_dense_eval", False),
            kind=kind,
        )
    except OSError as exc:  # a full disk, a vanished directory: the finished blocks stay
        raise SparseLLMError(
            f"{exc.strerror or exc} ({exc.filename or work}); the finished blocks are kept in "
            f"{work}: fix that and rerun the same command to continue"
        ) from None
    except KeyboardInterrupt:
        print(
            f"the finished blocks are kept in {work}: rerun the same command to continue",
            file=sys.stderr,
        )
        raise
    result.provenance["out"] = str(out)
    write(result, work)
    (work / "stream_state.json").unlink()
    promote_dir(work, out)
    print(quality_table(result))
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


def _check_exportable(model: Any) -> None:
    from sparsellm.methods.activation.modules import wrapped_modules

    if next(wrapped_modules(model), None) is not None:
        raise SparseLLMError(
            "a recipe with activation steps saves with --export hf; then "
            "`sparsellm export DIR --format FMT` packs it with its thresholds"
        )


def deployed(dense: Any, prep: Any, out: Path, fmt: str, result: Result) -> dict[str, Any]:
    """Dense vs exported, as a user meets them: size on disk, weights in RAM, decode tok/s
    (HF generate and our runtime on the dense model, our runtime on the export, alternated)
    and perplexity of the export reloaded from disk on the run's evaluation windows."""
    import torch

    import sparsellm as sl
    from sparsellm.eval.perplexity import perplexity
    from sparsellm.eval.speed import alternate_medians, decode_seconds, parameter_bytes
    from sparsellm.export.compressed import dir_bytes
    from sparsellm.runtime.decode import DecodeRuntime

    reloaded = sl.load(out)
    ppl = perplexity(reloaded.model, prep.eval_ids)["ppl"]
    dense_dir = prep.loaded.info.get("path")
    dense_bytes = parameter_bytes(dense)["bytes"] if dense is not None else None
    rows: dict[str, dict[str, Any]] = {
        "dense fp32, transformers": {
            "disk_bytes": dir_bytes(dense_dir) if dense_dir else None,
            "ram_bytes": dense_bytes,
            "ppl": result.metric("before", "ppl"),
        },
        "dense fp32, sparsellm runtime": {"ram_bytes": None, "ppl": result.metric("before", "ppl")},
        f"pruned {fmt}, sparsellm runtime": {"disk_bytes": dir_bytes(out), "ppl": ppl},
    }
    packed_rt = DecodeRuntime(reloaded.model, max_len=256, packed=reloaded.packed)
    reloaded.packed = None  # the runtime holds the weights (tiles may have replaced rows)
    runtimes = {f"pruned {fmt}, sparsellm runtime": packed_rt}
    jobs: dict[str, Any] = {}
    new = 64
    ids = torch.randint(0, reloaded.model.config.vocab_size, (1, 16))
    if dense is None:
        rows = {k: v for k, v in rows.items() if not k.startswith("dense")}
    else:
        runtimes["dense fp32, sparsellm runtime"] = DecodeRuntime(dense, max_len=256)
        # the new - 1 decode steps: generating `new` tokens minus generating one (prefill)
        jobs["dense fp32, transformers"] = lambda: (
            decode_seconds(dense, new) - decode_seconds(dense, 1)
        )
    for name, rt in runtimes.items():
        jobs[name] = lambda rt=rt: rt.generate(ids, new, sparse=True)["decode_s"]
    for name, s in alternate_medians(jobs, repeats=2).items():
        rows[name]["decode_tok_s"] = (new - 1) / s
    for name, rt in runtimes.items():
        rows[name]["ram_bytes"] = rt.resident_bytes()
    return {"format": fmt, "rows": rows, "new_tokens": new, "threads": torch.get_num_threads()}


def deployed_table(summary: dict[str, Any]) -> str:
    """The newcomer's table: one column per way of running the model."""
    from sparsellm.report.markdown import table

    rows = summary["rows"]
    mb = lambda b: None if b is None else f"{b / 1e6:.0f} MB"  # noqa: E731
    tok = lambda r: None if r.get("decode_tok_s") is None else f"{r['decode_tok_s']:.1f}"  # noqa: E731
    lines = [
        ["size on disk", *(mb(r.get("disk_bytes")) for r in rows.values())],
        ["weights in RAM", *(mb(r.get("ram_bytes")) for r in rows.values())],
        [f"decode tok/s (batch 1, {summary['threads']} threads)", *(tok(r) for r in rows.values())],
        ["perplexity", *(r.get("ppl") for r in rows.values())],
    ]
    return table(["", *rows], lines)
