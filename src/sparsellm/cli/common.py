"""Flag groups shared by the commands (declared once) and the checks that run before work.

Defaults come from `sparsellm.pipeline.Protocol`'s fields, so the CLI, the sweep and
the Python pipeline can never disagree about what "the default protocol" is. A command
whose meaning of a flag differs (activation calibrates on 16 windows, `eval` batches 4)
passes its own default explicitly.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from sparsellm.errors import SparseLLMError
from sparsellm.pipeline import DTYPES, Protocol

DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Protocol)}


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def add_model_and_eval(p: argparse.ArgumentParser, model_default: str | None) -> None:
    """--model, the evaluation protocol (corpus, windows, tasks) and --json."""
    p.add_argument(
        "--model",
        default=model_default,
        required=model_default is None,
        metavar="SRC",
        help="'default' (bundled SmolLM2-135M), 'gemma3-270m' or 'qwen0.5b' (optional chunk "
        "packages, see README), a local HF directory, a .gguf file, or a Hugging Face Hub id"
        + (f" (default: {model_default})" if model_default else ""),
    )
    p.add_argument(
        "--eval",
        default=DEFAULTS["eval"],
        metavar="wiki|PATH",
        help="perplexity corpus: a bundled name or a UTF-8 text file "
        f"(default: {DEFAULTS['eval']})",
    )
    p.add_argument(
        "--eval-windows",
        type=int,
        default=DEFAULTS["eval_windows"],
        metavar="N",
        help=f"number of non-overlapping evaluation windows (default: {DEFAULTS['eval_windows']})",
    )
    p.add_argument(
        "--seqlen",
        type=int,
        default=DEFAULTS["seqlen"],
        help=f"tokens per calibration and evaluation window (default: {DEFAULTS['seqlen']})",
    )
    p.add_argument(
        "--tasks",
        default="",
        metavar="LIST",
        help="tasks to evaluate too: names or groups, comma-separated, e.g. arc_easy,piqa. "
        "Groups: zeroshot (9 multiple-choice tasks + lambada), knowledge (naturalqs_open, "
        "jeopardy closed-book; squad, coqa reading), longctx (passkey, needle, vartrack); "
        "'all' = every task (default: none)",
    )
    lengths = _csv(DEFAULTS["longctx_lengths"])
    p.add_argument(
        "--longctx-lengths",
        default=lengths,
        metavar="LIST",
        help=f"prompt lengths in tokens for the longctx tasks (default: {lengths}; "
        "an 8192-token sample takes ~30 s on 2 cores)",
    )
    p.add_argument(
        "--longctx-samples",
        type=int,
        default=DEFAULTS["longctx_samples"],
        metavar="N",
        help="samples per length for longctx tasks; needle puts them on an even depth "
        f"grid 0..1 (default: {DEFAULTS['longctx_samples']})",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULTS["limit"],
        help=f"documents per zero-shot task (default: {DEFAULTS['limit']})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the results (the run's Result) as the last stdout line",
    )


def add_calib(
    p: argparse.ArgumentParser,
    *,
    nsamples: int = DEFAULTS["nsamples"],
    dtype: bool = True,
    batch_size: bool = True,
) -> None:
    """--calib, --nsamples, --seed and (unless turned off) --calib-dtype, --batch-size."""
    p.add_argument(
        "--calib",
        default=DEFAULTS["calib"],
        metavar="c4|wiki|PATH",
        help=f"calibration corpus (default: {DEFAULTS['calib']}; never the evaluation corpus "
        "by default)",
    )
    p.add_argument(
        "--nsamples", type=int, default=nsamples, help=f"calibration windows (default: {nsamples})"
    )
    p.add_argument(
        "--seed", type=int, default=DEFAULTS["seed"], help=f"random seed ({DEFAULTS['seed']})"
    )
    if dtype:
        p.add_argument(
            "--calib-dtype",
            choices=list(DTYPES),
            default=DEFAULTS["calib_dtype"],
            help="dtype of calibration forwards; statistics and weights stay fp32. "
            "bf16 pruned ~1.3-1.6x faster on a 2-core AVX-512 CPU "
            f"(default: {DEFAULTS['calib_dtype']})",
        )
    if batch_size:
        p.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULTS["batch_size"],
            help=f"calibration windows per forward (default: {DEFAULTS['batch_size']})",
        )


def add_out(p: argparse.ArgumentParser, required: bool, default_help: str = "") -> None:
    """--out DIR and --overwrite (a non-empty DIR is replaced only with --overwrite)."""
    p.add_argument(
        "--out",
        required=required,
        default=None,
        metavar="DIR",
        help="where to save the model and its sparsellm_manifest.json (the run's Result)"
        + (f" (default: {default_help})" if default_help else ""),
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def add_speed(p: argparse.ArgumentParser, lengths: str) -> None:
    """--speed and --speed-lengths: dense vs changed model tokens/s, as ratios."""
    p.add_argument(
        "--speed",
        action="store_true",
        help="also measure prefill/decode tokens/s and memory, dense vs sparse, as ratios",
    )
    p.add_argument(
        "--speed-lengths",
        default=lengths,
        metavar="LIST",
        help=f"prefill lengths for --speed (default: {lengths})",
    )


# --- checks and conversions (all before any long work) ----------------------------------------


def check_counts(args: argparse.Namespace) -> None:
    """Every count flag the command has must be >= 1 (and --seqlen >= 2)."""
    for name in ("eval_windows", "seqlen", "nsamples", "batch_size", "limit", "longctx_samples"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SparseLLMError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.seqlen < 2:
        raise SparseLLMError("--seqlen must be at least 2")


def int_list(value: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise SparseLLMError(f"{flag} must be comma-separated integers, got {value!r}") from None


def tasks(args: argparse.Namespace) -> tuple[str, ...]:
    """Validated task names from --tasks."""
    from sparsellm.eval.suite import resolve_tasks

    return resolve_tasks(args.tasks)


def protocol(args: argparse.Namespace) -> Protocol:
    """The command's flags as a Protocol (flags a command lacks keep Protocol's defaults)."""
    values = {
        "tasks": tasks(args),
        "longctx_lengths": int_list(args.longctx_lengths, "--longctx-lengths"),
    }
    for name in DEFAULTS:
        if name not in values and hasattr(args, name):
            values[name] = getattr(args, name)
    return Protocol(**values)


def run_tasks(args: argparse.Namespace, model: Any, tok: Any, names: tuple[str, ...]) -> dict:
    """--tasks on `model` with the command's --limit and long-context settings."""
    from sparsellm.eval.suite import run_tasks as run

    lengths = int_list(args.longctx_lengths, "--longctx-lengths")
    return run(model, tok, names, args.limit, lengths, args.longctx_samples)


def check_longctx(args: argparse.Namespace, model: Any, names: tuple[str, ...]) -> None:
    """Long-context lengths must fit the model's window: refuse before the long work."""
    from sparsellm.eval.longctx import TASKS, check_lengths

    if any(t in TASKS for t in names):
        check_lengths(model, int_list(args.longctx_lengths, "--longctx-lengths"))


def speed_lengths(args: argparse.Namespace, model: Any) -> tuple[int, ...]:
    """Validated --speed-lengths (each within the model's window)."""
    from sparsellm.pipeline import check_window

    lengths = int_list(args.speed_lengths, "--speed-lengths")
    for n in lengths:
        if n < 1:
            raise SparseLLMError(f"--speed-lengths must be >= 1, got {n}")
        check_window(model, n)
    return lengths


def method_config(spec: str, family: str, **flags: Any) -> Any:
    """`--method` (a bare name or a full ``name:key=value`` spec) with the command's flags.

    Flags left at None are not passed; flags the method does not declare are dropped
    (R-Sparse's --rank means nothing to TEAL), and a key set both in the spec and by a
    flag is an error rather than a silent winner.
    """
    from sparsellm.config import build, spec_keys, split_spec
    from sparsellm.registry import config_class

    name, raw = split_spec(spec)
    cls = config_class(name, family)
    keys = spec_keys(cls)
    values: dict[str, Any] = dict(raw)
    for key, value in flags.items():
        if value is None or key not in keys:
            continue
        if key in raw:
            raise SparseLLMError(f"{key} is given both in --method {spec!r} and as a flag")
        values[key] = value
    return build(cls, values)
