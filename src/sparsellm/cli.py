"""Command line: `sparsellm run | prune | eval`.

Bad input ends with a one-line ``error: …`` on stderr and exit code 2, before any
long work starts and without writing anything. Progress bars go to stderr; tables to
stdout; with ``--json`` the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_RECIPE = [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "unstructured"}]
DTYPES = ("fp32", "bf16")


def _add_common(p: argparse.ArgumentParser, model_default: str | None) -> None:
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
        default="wiki",
        metavar="wiki|PATH",
        help="perplexity corpus: a bundled name or a UTF-8 text file (default: wiki)",
    )
    p.add_argument(
        "--eval-windows",
        type=int,
        default=32,
        metavar="N",
        help="number of non-overlapping evaluation windows (default: 32)",
    )
    p.add_argument(
        "--seqlen",
        type=int,
        default=512,
        help="tokens per calibration and evaluation window (default: 512)",
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
    p.add_argument(
        "--longctx-lengths",
        default="512,1024,2048,4096,8192",
        metavar="LIST",
        help="prompt lengths in tokens for the longctx tasks (default: 512,...,8192; "
        "an 8192-token sample takes ~30 s on 2 cores)",
    )
    p.add_argument(
        "--longctx-samples",
        type=int,
        default=3,
        metavar="N",
        help="samples per length for longctx tasks; needle puts them on an even depth "
        "grid 0..1 (default: 3)",
    )
    p.add_argument(
        "--limit", type=int, default=200, help="documents per zero-shot task (default: 200)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the results as the last stdout line",
    )


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib",
        default="c4",
        metavar="c4|wiki|PATH",
        help="calibration corpus (default: c4; never the evaluation corpus by default)",
    )
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--calib-dtype",
        choices=list(DTYPES),
        default="fp32",
        help="dtype of calibration forwards; statistics and weights stay fp32. "
        "bf16 pruned ~1.3-1.6x faster on a 2-core AVX-512 CPU (default: fp32)",
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="calibration windows per forward (default: 8)"
    )


def _add_prune(p: argparse.ArgumentParser, out_required: bool) -> None:
    p.add_argument(
        "--method",
        default=None,
        help="magnitude | wanda | sparsegpt (default: sparsegpt unless --recipe is given)",
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
        help="YAML recipe (list of steps); exclusive with --method/--sparsity/--pattern",
    )
    _add_calib(p)
    p.add_argument(
        "--out",
        required=out_required,
        default=None,
        metavar="DIR",
        help="where to save the sparse model (a plain HF directory)"
        + ("" if out_required else " (default: sparsellm-runs/<timestamp>)"),
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--speed",
        action="store_true",
        help="also measure prefill/decode tokens/s and memory, dense vs sparse, as ratios",
    )
    p.add_argument(
        "--speed-lengths",
        default="512,2048,8192",
        metavar="LIST",
        help="prefill lengths for --speed (default: 512,2048,8192)",
    )
    p.add_argument(
        "--no-dense-eval",
        action="store_true",
        help="skip the dense perplexity (dense_ppl is then null)",
    )


def _add_activate(sub: Any) -> None:
    """`sparsellm activate`: calibrated activation sparsity + our CPU decode runtime."""
    act = sub.add_parser(
        "activate",
        help="activation sparsity (TEAL, WINA, R-Sparse, CATS): calibrate thresholds, "
        "compare with dense, measure CPU decode speed, save",
        description="Calibrate per-layer activation thresholds on --calib, report dense vs "
        "sparse perplexity / KL (and --tasks), optionally measure batch-1 decode tokens/s "
        "with our CPU runtime (dense vs sparse, same kernel), and save. The saved directory "
        "is the plain dense checkpoint plus activation_sparsity.safetensors: vanilla "
        "transformers loads it dense, `sparsellm eval`/`sparsellm.load` re-apply sparsity.",
    )
    _add_common(act, "default")
    act.add_argument(
        "--method",
        default="teal",
        help="teal (|x| thresholds) | wina (|x| x column norm) | rsparse (+ rank-r SVD "
        "path for skipped channels) | cats (SwiGLU gate threshold) (default: teal)",
    )
    act.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="share of the thresholded weight reads to skip, in [0, 0.95) (default: 0.5)",
    )
    act.add_argument(
        "--allocation",
        choices=["greedy", "uniform"],
        default="greedy",
        help="per-layer levels inside each block: greedy by output error (TEAL) or uniform",
    )
    act.add_argument("--rank", type=int, default=32, help="R-Sparse low-rank size (default 32)")
    act.add_argument(
        "--head",
        action="store_true",
        help="also threshold the LM head's input at --sparsity (input methods); worth it "
        "for small models with large vocabularies, whose head caps the decode speedup",
    )
    act.add_argument("--calib", default="c4", metavar="c4|wiki|PATH")
    act.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    act.add_argument(
        "--calib-seqlen", type=int, default=256, help="tokens per calibration window (256)"
    )
    act.add_argument("--seed", type=int, default=0)
    act.add_argument(
        "--speed",
        action="store_true",
        help="measure batch-1 decode tokens/s, our runtime dense vs sparse (same kernel)",
    )
    act.add_argument(
        "--new-tokens", type=int, default=128, help="tokens generated per --speed run (128)"
    )
    act.add_argument("--out", default=None, metavar="DIR", help="save here (default: no save)")
    act.add_argument("--overwrite", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsellm",
        description="Make a causal LM sparse, compare it with the dense model, save it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="end-to-end on the bundled default model: prune, evaluate, report, save",
        description="Load the model (default: bundled SmolLM2-135M), calibrate on c4, prune "
        "with the default recipe (SparseGPT 50%% unstructured), compare dense vs sparse "
        "perplexity on wiki, write report.json/report.md and save the sparse model.",
    )
    _add_common(run, "default")
    _add_prune(run, out_required=False)
    prune = sub.add_parser(
        "prune",
        help="prune a model with one method or a recipe and save it",
        description="Prune SRC, evaluate dense vs sparse perplexity, save.",
    )
    _add_common(prune, None)
    _add_prune(prune, out_required=True)
    ev = sub.add_parser("eval", help="perplexity of any model (dense or a saved sparse one)")
    _add_common(ev, None)
    ev.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    ev.add_argument(
        "--harness",
        default="",
        metavar="TASKS",
        help="also run lm-evaluation-harness tasks on the in-memory model (lm-eval's HFLM, "
        "no re-save; needs `pip install lm-eval`). Names prefixed sparsellm_ (e.g. "
        "sparsellm_arc_easy) are our bundled requests converted to local lm-eval tasks, "
        "which work offline; other names are lm-eval's own (their data need network) or "
        "come from --harness-include. --limit applies",
    )
    ev.add_argument(
        "--harness-include",
        default=None,
        metavar="DIR",
        help="a directory of lm-eval task YAMLs to search as well",
    )
    _add_attention(ev)
    sw = sub.add_parser(
        "sweep",
        help="run a methods x sparsities x patterns grid (resumable) and write one report",
        description="Prune and evaluate every grid point under one protocol; finished points "
        "are kept in OUT/points and skipped when the same command runs again. N:M patterns "
        "give the group size M: at sparsity s a point uses round(s*M):M (0.3 -> 1:4, "
        "0.5 -> 2:4, 0.7 -> 3:4), deduplicated. Ends with OUT/report.html and report.md. "
        "On a Ray cluster: start it with `ray start --head` (then `ray start "
        "--address=HEAD:6379` on each worker machine) and pass --executor ray "
        "--ray-address auto; workers load the model themselves, the driver writes results.",
    )
    _add_common(sw, "default")
    _add_calib(sw)
    sw.add_argument(
        "--methods",
        default="wanda,sparsegpt,magnitude",
        metavar="LIST",
        help="comma-separated methods (default: wanda,sparsegpt,magnitude)",
    )
    sw.add_argument(
        "--sparsities",
        default="0.3,0.5,0.6,0.7",
        metavar="LIST",
        help="comma-separated sparsities in [0, 1) (default: 0.3,0.5,0.6,0.7)",
    )
    sw.add_argument(
        "--patterns",
        default="unstructured,2:4",
        metavar="LIST",
        help="comma-separated patterns (default: unstructured,2:4)",
    )
    sw.add_argument(
        "--out",
        default="sparsellm-sweep",
        metavar="DIR",
        help="sweep directory; rerun with the same DIR to resume (default: sparsellm-sweep)",
    )
    sw.add_argument(
        "--overwrite", action="store_true", help="discard an existing sweep in --out and start over"
    )
    sw.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: one process, points in turn (default); ray: one Ray task per point",
    )
    sw.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster address ('auto' for a `ray start` cluster; default: start a local one)",
    )
    sw.add_argument(
        "--ray-cpus-per-point",
        type=float,
        default=None,
        metavar="N",
        help="CPUs each Ray point reserves (default: all of the cluster's)",
    )
    sw.add_argument(
        "--save-models",
        action="store_true",
        help="also save every point's weights (538 MB each for the default model)",
    )
    rec = sub.add_parser(
        "recover",
        help="distillation fine-tuning of a sparse model from its dense teacher, masks frozen",
        description="Fine-tune SRC (a sparse model) against --teacher with KL on logits plus "
        "SquareHead per-layer normalised MSE; pruned weights stay exactly zero. With --lora "
        "only masked low-rank adapters train and are merged (zeros kept) before saving.",
    )
    _add_common(rec, None)
    rec.add_argument("--teacher", required=True, metavar="SRC", help="the dense model")
    rec.add_argument(
        "--data",
        default="c4",
        metavar="c4|wiki|PATH",
        help="training text (default: c4; evaluation stays on --eval)",
    )
    rec.add_argument("--nsamples", type=int, default=256, help="training windows (default 256)")
    rec.add_argument(
        "--steps",
        type=int,
        default=100,
        help="distillation steps (default 100; 0 = only --learn-masks)",
    )
    rec.add_argument(
        "--learn-masks",
        default=None,
        metavar="N:M",
        help="first learn N:M masks over the teacher's weights (MaskLLM, weights "
        "frozen, Gumbel-softmax, prior = the student's current mask)",
    )
    rec.add_argument(
        "--mask-steps", type=int, default=200, help="MaskLLM steps with --learn-masks (default 200)"
    )
    rec.add_argument(
        "--soft-prompt",
        type=int,
        default=0,
        metavar="TOKENS",
        help="last, learn a soft prompt of this many tokens (Compress-then-Prompt); saved as "
        "soft_prompt.safetensors and used by `sparsellm eval` automatically",
    )
    rec.add_argument(
        "--prompt-steps", type=int, default=100, help="soft-prompt steps (default 100)"
    )
    rec.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    rec.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    rec.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="RANK",
        help="train masked LoRA adapters of this rank instead of all weights",
    )
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--out", required=True, metavar="DIR")
    rec.add_argument("--overwrite", action="store_true")
    _add_activate(sub)
    rep = sub.add_parser(
        "report",
        help="render runs and sweeps as Markdown + self-contained HTML with plots",
        description="Read each RUN_DIR's sparsellm_manifest.json (a sweep directory expands "
        "to its points) and write report.md, report.html and plots/*.png: summary table, "
        "essential-sparsity knees, quality-vs-sparsity curves, a quality/cost Pareto plot, "
        "per-layer sparsity, and each run's provenance.",
    )
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or sweep directories")
    rep.add_argument(
        "--out", default="sparsellm-report", metavar="DIR", help="(default: sparsellm-report)"
    )
    rep.add_argument("--title", default="sparsellm report", help="page title")
    rep.add_argument("--json", action="store_true", help="print the written paths as JSON")
    _add_shrink_parser(sub)
    return parser


def _recipe(args: argparse.Namespace) -> list[dict[str, Any]] | Any:
    from sparsellm.errors import SparseLLMError
    from sparsellm.recipe import parse_recipe, read_recipe

    if args.recipe:
        if args.method or args.sparsity is not None or args.pattern:
            raise SparseLLMError("--recipe cannot be combined with --method/--sparsity/--pattern")
        return parse_recipe(read_recipe(args.recipe))
    step: dict[str, Any] = dict(DEFAULT_RECIPE[0])
    if args.method:
        step["method"] = args.method
    step["pattern"] = args.pattern or "unstructured"
    step["sparsity"] = args.sparsity
    if step["sparsity"] is None and step["pattern"] == "unstructured":
        step["sparsity"] = 0.5
    return parse_recipe([step])


def _check_counts(args: argparse.Namespace) -> None:
    from sparsellm.errors import SparseLLMError

    for name in ("eval_windows", "seqlen", "nsamples", "batch_size", "limit", "longctx_samples"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SparseLLMError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.seqlen < 2:
        raise SparseLLMError("--seqlen must be at least 2")


def _tasks(args: argparse.Namespace) -> tuple[str, ...]:
    """Validated task names from --tasks (checked before any long work)."""
    from sparsellm.eval.suite import resolve_tasks

    return resolve_tasks(args.tasks)


def _int_list(value: str, flag: str) -> tuple[int, ...]:
    from sparsellm.errors import SparseLLMError

    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise SparseLLMError(f"{flag} must be comma-separated integers, got {value!r}") from None


def _check_longctx(args: argparse.Namespace, model: Any, tasks: tuple[str, ...]) -> None:
    """Long-context lengths must fit the model's window: refuse before the long work."""
    from sparsellm.eval.longctx import TASKS, check_lengths

    if any(t in TASKS for t in tasks):
        check_lengths(model, _int_list(args.longctx_lengths, "--longctx-lengths"))


def _run_tasks(args: argparse.Namespace, model: Any, tok: Any, tasks: tuple[str, ...]) -> dict:
    from sparsellm.eval.suite import run_tasks

    lengths = _int_list(args.longctx_lengths, "--longctx-lengths")
    return run_tasks(model, tok, tasks, args.limit, lengths, args.longctx_samples)


def _lengths(args: argparse.Namespace, model: Any) -> tuple[int, ...]:
    """Validated --speed-lengths (each within the model's window)."""
    from sparsellm.errors import SparseLLMError
    from sparsellm.pipeline import check_window

    lengths = _int_list(args.speed_lengths, "--speed-lengths")
    for n in lengths:
        if n < 1:
            raise SparseLLMError(f"--speed-lengths must be >= 1, got {n}")
        check_window(model, n)
    return lengths


def _protocol(args: argparse.Namespace, tasks: tuple[str, ...]) -> Any:
    from sparsellm.pipeline import Protocol

    return Protocol(
        calib=getattr(args, "calib", "c4"),
        eval=args.eval,
        nsamples=getattr(args, "nsamples", 32),
        seqlen=args.seqlen,
        eval_windows=args.eval_windows,
        tasks=tasks,
        limit=args.limit,
        longctx_lengths=_int_list(args.longctx_lengths, "--longctx-lengths"),
        longctx_samples=args.longctx_samples,
        seed=getattr(args, "seed", 0),
        calib_dtype=getattr(args, "calib_dtype", "fp32"),
        batch_size=args.batch_size,
    )


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    import sparsellm as sl
    from sparsellm.errors import SparseLLMError
    from sparsellm.eval.speed import compare_speed
    from sparsellm.export.hf import MANIFEST, check_out_dir, write_json_atomic, write_text_atomic
    from sparsellm.pipeline import prepare, prune_and_evaluate
    from sparsellm.report.markdown import (
        comparison_table,
        markdown_report,
        speed_table,
        zeroshot_table,
    )

    _check_counts(args)
    steps = _recipe(args)
    _recipe_attention(args)  # a bad attention key fails before the model loads
    out = Path(args.out or f"sparsellm-runs/{time.strftime('%Y%m%d-%H%M%S')}")
    check_out_dir(out, args.overwrite)
    protocol = _protocol(args, _tasks(args))
    if args.speed and args.no_dense_eval:
        raise SparseLLMError("--speed compares against the dense model: drop --no-dense-eval")

    prep = prepare(args.model, protocol)
    loaded = prep.loaded
    model, tok = loaded.model, loaded.tokenizer
    lengths = _lengths(args, model) if args.speed else ()
    # The dense copy lets one pass after pruning give both perplexities, KL and top-1.
    dense_model = None if args.no_dense_eval else copy.deepcopy(model)
    result = prune_and_evaluate(
        model, dense_model, prep, steps, protocol, attention=_recipe_attention(args)
    )
    speed = None
    if args.speed:
        speed = result["speed"] = compare_speed(dense_model, model, lengths)
    del dense_model
    zeroshot = result["zeroshot"]
    result["out"] = str(out)
    extra = {
        "report.json": json.dumps(result, indent=2, default=str) + "\n",
        "report.md": markdown_report(result),
    }
    sl.save(model, tok, out, manifest=result, overwrite=args.overwrite, extra_files=extra)
    if speed:  # per-model memory needs the saved checkpoint: measure, then update reports
        speed["memory"] = _memory(loaded.info["path"], out, lengths)
        write_json_atomic(out / MANIFEST, result)
        write_text_atomic(out / "report.json", json.dumps(result, indent=2, default=str) + "\n")
        write_text_atomic(out / "report.md", markdown_report(result))
    print(comparison_table(result))
    if zeroshot:
        print(zeroshot_table(zeroshot["sparse"], zeroshot.get("dense")))
    if speed:
        print(speed_table(speed))
    print(f"saved sparse model and report to {out}")
    return result


def _memory(dense_path: str, sparse_path: Path, lengths: tuple[int, ...]) -> dict[str, Any]:
    """Checkpoint bytes and peak RSS of each model alone (fresh process, one prefill)."""
    from sparsellm.eval.memory import checkpoint_bytes, measure_peak_rss

    length = sorted(lengths)[len(lengths) // 2]
    out: dict[str, Any] = {"prefill_length": length}
    for name, path in (("dense", dense_path), ("sparse", sparse_path)):
        out[name] = {"checkpoint_bytes": checkpoint_bytes(path), **measure_peak_rss(path, length)}
    return out


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    import sparsellm as sl
    from sparsellm.errors import SparseLLMError
    from sparsellm.models.adapters import block_linears, get_blocks, weight_matrix
    from sparsellm.pipeline import check_window
    from sparsellm.recover.prompt import PROMPT_FILE, PromptedLM
    from sparsellm.report.markdown import table, zeroshot_table

    _check_counts(args)
    _attention_method(args)  # a bad --attention fails before the model loads
    tasks = _tasks(args)
    harness = [t.strip() for t in args.harness.split(",") if t.strip()]
    if harness:
        from sparsellm.eval.harness import import_lm_eval

        import_lm_eval()  # fail before loading the model
    loaded = sl.load(args.model)
    check_window(loaded.model, args.seqlen)
    _check_longctx(args, loaded.model, tasks)
    base = model = loaded.model
    if args.recipe:
        _apply_recipe_steps(args, model, loaded.tokenizer)
    prompt_dir = Path(args.model)
    if (prompt_dir / PROMPT_FILE).is_file():  # a Compress-then-Prompt result
        if harness:
            raise SparseLLMError("--harness cannot apply this model's soft prompt")
        logging.getLogger(__name__).info("using the soft prompt in %s", prompt_dir)
        model = PromptedLM.attach(base, prompt_dir)
    with _attention(args, model, loaded.tokenizer):
        result = sl.evaluate(
            model,
            loaded.tokenizer,
            args.eval,
            args.eval_windows,
            args.seqlen,
            batch_size=args.batch_size,
        )
        if tasks:
            result["zeroshot"] = _run_tasks(args, model, loaded.tokenizer, tasks)
    result["attention"] = _attention_spec(args) or "sdpa"
    if args.recipe:
        result["recipe"] = str(args.recipe)
    linears = [weight_matrix(m) for b in get_blocks(base) for m in block_linears(b).values()]
    zeros = sum(int((w == 0).sum()) for w in linears)
    result["block_linear_sparsity"] = zeros / sum(w.numel() for w in linears)
    result["model"] = loaded.info.get("source")
    result["soft_prompt"] = model is not base
    print(
        table(
            ["model", "corpus", "windows", "perplexity", "block-linear sparsity"],
            [
                [
                    args.model,
                    result["data"]["name"],
                    result["windows"],
                    result["ppl"],
                    result["block_linear_sparsity"],
                ]
            ],
        )
    )
    if tasks:
        print(zeroshot_table(result["zeroshot"]))
    if harness:
        result["harness"] = _harness(args, loaded.model, loaded.tokenizer, harness)
        rows = [
            [t, m.get("docs"), m.get("acc"), m.get("acc_norm")]
            for t, m in result["harness"].items()
        ]
        print(table(["lm-eval task", "docs", "acc", "acc_norm"], rows))
    return result


def _harness(args: argparse.Namespace, model: Any, tok: Any, names: list[str]) -> dict:
    """lm-eval on the in-memory model; sparsellm_* names are converted from our requests."""
    import tempfile

    from sparsellm.errors import SparseLLMError
    from sparsellm.eval.harness import TASK_PREFIX, run_harness, write_olmo_tasks

    ours = [n.removeprefix(TASK_PREFIX) for n in names if n.startswith(TASK_PREFIX)]
    if ours and args.harness_include:
        raise SparseLLMError("use either sparsellm_* tasks or --harness-include, not both")
    with tempfile.TemporaryDirectory(prefix="sparsellm-lm-eval-") as tmp:
        include = args.harness_include
        if ours:
            include = str(write_olmo_tasks(ours, Path(tmp), args.limit))
        return run_harness(model, tok, names, limit=args.limit, include_path=include)


def _float_list(value: str, flag: str) -> list[float]:
    from sparsellm.errors import SparseLLMError

    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise SparseLLMError(f"{flag} must be comma-separated numbers, got {value!r}") from None


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from sparsellm.report.render import write_report
    from sparsellm.report.runs import load_runs
    from sparsellm.sweep import grid, open_sweep, run_local, run_ray

    _check_counts(args)
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    points = grid(
        split(args.methods), _float_list(args.sparsities, "--sparsities"), split(args.patterns)
    )
    protocol = _protocol(args, _tasks(args))
    out = Path(args.out)
    todo = open_sweep(out, args.model, protocol, points, args.overwrite)
    print(f"sweep {out}: {len(points)} points, {len(points) - len(todo)} already done")
    if args.executor == "ray":
        run_ray(out, args.model, protocol, todo, args.ray_address, args.ray_cpus_per_point)
    else:
        run_local(out, args.model, protocol, todo, args.save_models)
    runs = load_runs([out])
    paths = write_report(runs, out, f"sparsellm sweep: {args.model}")
    print(f"{len(runs)} points -> {paths['html']}")
    return {
        "points": [p.name for p in points],
        "ran": [p.name for p in todo],
        **{k: str(v) for k, v in paths.items()},
    }


def cmd_recover(args: argparse.Namespace) -> dict[str, Any]:
    import sparsellm as sl
    from sparsellm.data.corpora import resolve_corpus, token_windows
    from sparsellm.errors import SparseLLMError
    from sparsellm.eval.kl import compare_models
    from sparsellm.export.hf import check_out_dir
    from sparsellm.pipeline import check_window, seed_everything
    from sparsellm.recover.distill import DistillConfig, distill, summary
    from sparsellm.recover.lora import add_lora, merge_lora
    from sparsellm.recover.prompt import PromptedLM, train_prompt
    from sparsellm.report.markdown import table
    from sparsellm.weights.maskllm import MaskLLMConfig, learn_masks
    from sparsellm.weights.masks import parse_pattern

    _check_counts(args)
    cfg = DistillConfig(
        steps=max(args.steps, 1),
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        warmup=max(args.steps // 10, 1),
    )
    pattern = parse_pattern(args.learn_masks) if args.learn_masks else None
    if pattern is not None and not pattern.is_nm:
        raise SparseLLMError("--learn-masks takes an N:M pattern, e.g. 2:4")
    out = check_out_dir(Path(args.out), args.overwrite)
    tasks = _tasks(args)
    data_corpus, eval_corpus = resolve_corpus(args.data), resolve_corpus(args.eval)
    seed_everything(args.seed)
    student, teacher = sl.load(args.model), sl.load_model(args.teacher)
    tok = student.tokenizer
    check_window(student.model, args.seqlen)
    data = token_windows(tok, data_corpus, args.nsamples, args.seqlen)
    windows = token_windows(tok, eval_corpus, args.eval_windows, args.seqlen)
    before = compare_models(teacher.model, student.model, windows)
    result: dict[str, Any] = {"before": before}
    if pattern is not None:
        mcfg = MaskLLMConfig(n=pattern.n, m=pattern.m, steps=args.mask_steps, seed=args.seed)
        mlog = learn_masks(student.model, teacher.model, data, mcfg)
        result["maskllm"] = {
            "steps": len(mlog.losses),
            "changed_group_fraction": mlog.changed_fraction,
            "seconds": mlog.seconds,
            "after": compare_models(teacher.model, student.model, windows),
        }
    log = None
    if args.steps > 0:
        if args.lora:
            add_lora(student.model, rank=args.lora)
        log = distill(student.model, teacher.model, data, cfg)
        if args.lora:
            merge_lora(student.model)
    evaluated = student.model
    if args.soft_prompt:
        evaluated = PromptedLM(student.model, args.soft_prompt)
        result["soft_prompt"] = train_prompt(
            evaluated, teacher.model, data, args.prompt_steps, seed=args.seed
        )
    after = compare_models(teacher.model, evaluated, windows)
    manifest = dict(student.info.get("manifest") or {})
    result |= {
        "after": after,
        "training": summary(log) if log else None,
        "config": {**vars(cfg), "lora_rank": args.lora, "data": data_corpus.describe()},
        "teacher": teacher.info,
        "student": student.info.get("source"),
    }
    if tasks:
        result["zeroshot"] = {"sparse": _run_tasks(args, evaluated, tok, tasks)}
    manifest["recovery"] = result
    sl.save(student.model, tok, out, manifest=manifest, overwrite=args.overwrite)
    if isinstance(evaluated, PromptedLM):
        evaluated.save_prompt(out)
    print(
        table(
            ["", "dense ppl", "sparse ppl", "KL", "top-1"],
            [
                [k, r["dense_ppl"], r["sparse_ppl"], r["kl"], r["top1_agreement"]]
                for k, r in (("before", before), ("after", after))
            ],
        )
    )
    print(f"saved recovered model to {out}")
    return result


def _decode_speed(
    dense: Any, sparse: Any, tok: Any, new_tokens: int, repeats: int = 3
) -> dict[str, Any]:
    """Batch-1 decode tok/s of our runtime, dense and sparse alternated, medians + ratio."""
    from sparsellm.activation.runtime import DecodeRuntime
    from sparsellm.data.corpora import resolve_corpus, token_windows
    from sparsellm.eval.speed import alternate_medians

    prompt = token_windows(tok, resolve_corpus("wiki"), 1, 32)
    max_len = 32 + new_tokens
    runs = {"dense": DecodeRuntime(dense, max_len), "sparse": DecodeRuntime(sparse, max_len)}
    med = alternate_medians(
        {
            k: lambda k=k, rt=rt: rt.generate(prompt, new_tokens, sparse=k == "sparse")["decode_s"]
            for k, rt in runs.items()
        },
        repeats,
    )
    return {
        "dense_tok_s": (new_tokens - 1) / med["dense"],  # the first token comes from prefill
        "sparse_tok_s": (new_tokens - 1) / med["sparse"],
        "speedup": med["dense"] / med["sparse"],
        "skipped_fraction": runs["sparse"].skipped_fraction(),
        "threads": __import__("torch").get_num_threads(),
    }


def cmd_activate(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    import sparsellm as sl
    from sparsellm.activation.apply import lookup, sparsify_activations
    from sparsellm.activation.base import ActivationConfig
    from sparsellm.activation.io import save_with_activations
    from sparsellm.activation.modules import measured_sparsity, reset_counts
    from sparsellm.api import versions
    from sparsellm.data.corpora import resolve_corpus, token_windows
    from sparsellm.errors import SparseLLMError
    from sparsellm.eval.kl import compare_models
    from sparsellm.export.hf import check_out_dir
    from sparsellm.models.adapters import get_layout
    from sparsellm.pipeline import check_window, seed_everything
    from sparsellm.report.markdown import table

    _check_counts(args)
    if args.new_tokens < 2:
        raise SparseLLMError(f"--new-tokens must be >= 2, got {args.new_tokens}")
    cfg = ActivationConfig(
        method=args.method,
        sparsity=args.sparsity,
        allocation=args.allocation,
        rank=args.rank,
        nsamples=args.nsamples,
        seqlen=args.calib_seqlen,
        seed=args.seed,
        head=args.head,
    )
    lookup(cfg)
    out = check_out_dir(Path(args.out), args.overwrite) if args.out else None
    tasks = _tasks(args)
    calib_corpus, eval_corpus = resolve_corpus(args.calib), resolve_corpus(args.eval)
    seed_everything(args.seed)
    loaded = sl.load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    get_layout(model)
    check_window(model, max(args.seqlen, args.calib_seqlen))
    dense = copy.deepcopy(model)
    calib = token_windows(tok, calib_corpus, args.nsamples, args.calib_seqlen)
    start = time.perf_counter()
    fit = sparsify_activations(model, calib, cfg)
    calib_s = time.perf_counter() - start
    windows = token_windows(tok, eval_corpus, args.eval_windows, args.seqlen)
    reset_counts(model)
    quality = compare_models(dense, model, windows)
    result: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "calibration_seconds": calib_s,
        "measured_sparsity": measured_sparsity(model),
        **quality,
        "layers": fit["blocks"],
        "model": loaded.info,
        "data": {"calib": calib_corpus.describe(), "eval": eval_corpus.describe()},
        "versions": versions(),
    }
    if tasks:
        result["zeroshot"] = {
            "dense": _run_tasks(args, dense, tok, tasks),
            "sparse": _run_tasks(args, model, tok, tasks),
        }
    if args.speed:
        result["decode_speed"] = _decode_speed(dense, model, tok, args.new_tokens)
    rows = [["perplexity", quality["dense_ppl"], quality["sparse_ppl"], None]]
    rows.append(["KL / top-1", None, quality["kl"], quality["top1_agreement"]])
    if args.speed:
        sp = result["decode_speed"]
        rows.append(["decode tok/s", sp["dense_tok_s"], sp["sparse_tok_s"], sp["speedup"]])
    print(table(["", "dense", f"{cfg.method} {cfg.sparsity:g}", "ratio / top-1"], rows))
    print(f"measured sparsity on the eval windows: {result['measured_sparsity']:.3f}")
    if out is not None:
        manifest = {"activation": {k: v for k, v in result.items() if k != "layers"}}
        save_with_activations(model, tok, out, manifest, dataclasses.asdict(cfg), args.overwrite)
        print(f"saved to {out} (dense weights + activation_sparsity.safetensors)")
    return result


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from sparsellm.report.render import write_report
    from sparsellm.report.runs import load_runs

    runs = load_runs(args.runs)
    paths = write_report(runs, Path(args.out), args.title)
    print(f"{len(runs)} runs -> {paths['html']} and {paths['markdown']}")
    return {"runs": len(runs), **{k: str(v) for k, v in paths.items()}}


# --- sparse attention (issue 7): `eval --attention SPEC` ---------------------------------


def _add_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--attention",
        default="",
        metavar="SPEC",
        help="sparse prefill attention for this evaluation, NAME[:key=value,...], e.g. "
        "sink_window:sink=64,window=1024; methods: full, sink_window, power, block_topk, "
        "vertical_slash, flexprefill, minference (calibrated on c4 first). Sequences "
        "shorter than the method's min_length (default 2048) stay dense",
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="FILE",
        help="a recipe file: its weight steps are applied first (calibrated on c4, 32 "
        "windows of --seqlen) and its attention: prefill method is used (exclusive with "
        "--attention); composes weight sparsity with sparse attention",
    )


def _recipe_attention(args: argparse.Namespace) -> Any:
    """The validated attention: key of --recipe (an AttentionRecipe), or None."""
    from sparsellm.recipe import read_recipe, recipe_attention

    return recipe_attention(read_recipe(args.recipe)) if args.recipe else None


def _attention_spec(args: argparse.Namespace) -> str:
    """--attention, or the prefill spec of --recipe's attention key ("" for none)."""
    from sparsellm.errors import SparseLLMError

    from_recipe = _recipe_attention(args)
    if from_recipe is None:
        return args.attention
    if args.attention:
        raise SparseLLMError("--attention cannot be combined with a recipe's attention key")
    return from_recipe.prefill


def _attention_method(args: argparse.Namespace) -> Any:
    """The parsed prefill method of `_attention_spec`, or None."""
    from sparsellm.attention.hf import KV_METHODS, parse_attention
    from sparsellm.errors import SparseLLMError

    spec = _attention_spec(args)
    method = parse_attention(spec) if spec else None
    if isinstance(method, tuple(KV_METHODS.values())):
        raise SparseLLMError(
            "KV-cache methods act only while decoding; measure them with bench/attention.py"
        )
    return method


def _apply_recipe_steps(args: argparse.Namespace, model: Any, tokenizer: Any) -> None:
    """Prune `model` in place with the weight steps of --recipe (none: nothing to do)."""
    from sparsellm.api import sparsify
    from sparsellm.data.corpora import resolve_corpus, token_windows
    from sparsellm.recipe import parse_recipe, read_recipe

    steps = parse_recipe(read_recipe(args.recipe), allow_empty=True)
    if steps:
        calib = token_windows(tokenizer, resolve_corpus("c4"), 32, args.seqlen)
        sparsify(model, steps, calib)


def _attention(args: argparse.Namespace, model: Any, tokenizer: Any) -> Any:
    """Context manager running `model` with the --attention method (a no-op without one)."""
    import contextlib

    from sparsellm.attention.hf import prepared_attention

    method = _attention_method(args)
    if method is None:
        return contextlib.nullcontext()
    return prepared_attention(model, tokenizer, method)


# --- end sparse attention ----------------------------------------------------------------

# ---- structured pruning (`sparsellm shrink`, issue 5) --------------------------------------


def _add_shrink_parser(sub: Any) -> None:
    from sparsellm.structured import METHODS

    p = sub.add_parser(
        "shrink",
        help="structured pruning: a smaller dense model (heads, channels or blocks removed)",
        description="Remove --ratio of the transformer blocks' parameters with a structured "
        "method, compare dense vs shrunk perplexity, optionally distil, save. Uniform widths "
        "save as a plain HF checkpoint; --per-layer widths load only with sparsellm.load.",
    )
    _add_common(p, None)
    _add_calib(p)
    p.add_argument("--method", required=True, choices=METHODS, help="structured method")
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
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--speed", action="store_true", help="prefill/decode tokens/s vs dense")
    p.add_argument("--speed-lengths", default="512,2048", metavar="LIST", help="prefill lengths")


def cmd_shrink(args: argparse.Namespace) -> dict[str, Any]:
    import sparsellm as sl
    from sparsellm.errors import SparseLLMError
    from sparsellm.eval.speed import compare_speed
    from sparsellm.export.hf import check_out_dir
    from sparsellm.pipeline import prepare, run_tasks
    from sparsellm.report.markdown import table
    from sparsellm.structured.pipeline import shrink_and_evaluate

    _check_counts(args)
    if not 0.0 <= args.ratio < 1.0:
        raise SparseLLMError(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.calib_dtype != "fp32":
        raise SparseLLMError("structured pruning calibrates in fp32 only")
    if args.recover_steps < 0:
        raise SparseLLMError("--recover-steps must be >= 0")
    out = check_out_dir(Path(args.out), args.overwrite)
    protocol = _protocol(args, _tasks(args))
    prep = prepare(args.model, protocol)
    dense, tok = prep.loaded.model, prep.loaded.tokenizer
    lengths = _lengths(args, dense) if args.speed else ()
    model, result = shrink_and_evaluate(
        dense,
        args.method,
        args.ratio,
        prep.calib_ids,
        prep.eval_ids,
        per_layer=args.per_layer,
        recover_steps=args.recover_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        prune_heads=not args.no_heads,
    )
    if protocol.tasks:
        result["zeroshot"] = {
            "dense": run_tasks(dense, tok, protocol),
            "shrunk": run_tasks(model, tok, protocol),
        }
    if args.speed:
        result["speed"] = compare_speed(dense, model, lengths)
    result |= {"model": prep.loaded.info, "protocol": protocol.to_dict(), "out": str(out)}
    sl.save(model, tok, out, manifest={"structured": result}, overwrite=args.overwrite)
    rows = [["before", result["before"]]] + (
        [["after recovery", result["after"]]] if "after" in result else []
    )
    print(
        table(
            ["", "dense ppl", "shrunk ppl", "KL", "top-1"],
            [[k, r["dense_ppl"], r["sparse_ppl"], r["kl"], r["top1_agreement"]] for k, r in rows],
        )
    )
    uniform = result["shrink"].get("uniform", True)
    how = "a plain HF checkpoint" if uniform else "per-layer widths: load with sparsellm.load"
    print(f"removed {result['shrink']['measured_ratio']:.1%} of block params; saved {how} to {out}")
    return result


# ---- end of structured pruning --------------------------------------------------------------


COMMANDS = {
    "run": cmd_prune,
    "prune": cmd_prune,
    "eval": cmd_eval,
    "sweep": cmd_sweep,
    "recover": cmd_recover,
    "report": cmd_report,
    "activate": cmd_activate,
    "shrink": cmd_shrink,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sparsellm.errors import SparseLLMError

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _quiet_transformers()
    try:
        result = COMMANDS[args.command](args)
    except SparseLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was saved", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
