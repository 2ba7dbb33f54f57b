"""`sparsellm eval`: perplexity (and tasks, lm-eval tasks) of any model, dense or saved.

``--attention SPEC`` runs the evaluation with a sparse prefill method; ``--recipe FILE``
first applies the recipe's steps (calibrated on c4, 32 windows of --seqlen) and uses its
prefill method. A saved soft prompt (`recover --soft-prompt`) is used automatically.
``--out DIR`` writes the Result (no weights) so `sparsellm report` can show the run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from sparsellm.cli import common
from sparsellm.errors import SparseLLMError
from sparsellm.result import Result

ATTENTION = ("prefill", "kv")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity of any model (dense or a saved sparse one)")
    common.add_model_and_eval(p, None)
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    p.add_argument(
        "--harness",
        default="",
        metavar="TASKS",
        help="also run lm-evaluation-harness tasks on the in-memory model (lm-eval's HFLM, "
        "no re-save; needs `pip install lm-eval`). Names prefixed sparsellm_ (e.g. "
        "sparsellm_arc_easy) are our bundled requests converted to local lm-eval tasks, "
        "which work offline; other names are lm-eval's own (their data need network) or "
        "come from --harness-include. --limit applies",
    )
    p.add_argument(
        "--harness-include",
        default=None,
        metavar="DIR",
        help="a directory of lm-eval task YAMLs to search as well",
    )
    p.add_argument(
        "--attention",
        default="",
        metavar="SPEC",
        help="sparse prefill attention for this evaluation, NAME[:key=value,...], e.g. "
        "sink_window:sink=64,window=1024 (minference and moa calibrate on c4 first). "
        "Sequences shorter than the method's min_length stay dense",
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="FILE",
        help="a recipe file: its steps are applied first (calibrated on c4, 32 windows of "
        "--seqlen) and its attention: prefill method is used (exclusive with --attention)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write the Result here (default: none)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _recipe(args: argparse.Namespace) -> Any:
    """The validated Recipe of --recipe and --attention, or None (checked before loading)."""
    from sparsellm.config import split_spec, to_config
    from sparsellm.recipe import AttentionSpec, Recipe, load_recipe
    from sparsellm.registry import names

    recipe = load_recipe(args.recipe) if args.recipe else None
    if not args.attention:
        return recipe
    if recipe is not None and recipe.attention:
        raise SparseLLMError("--attention cannot be combined with a recipe's attention key")
    name, _ = split_spec(args.attention)
    if name not in names(ATTENTION):
        valid = ", ".join(names(ATTENTION))
        raise SparseLLMError(f"unknown attention method {name!r}; valid: {valid}")
    cfg = to_config(args.attention, ATTENTION)
    if cfg.family == "kv":
        raise SparseLLMError(
            "KV-cache methods act only while decoding; measure them with bench/attention.py"
        )
    return Recipe(recipe.steps if recipe else (), AttentionSpec(prefill=cfg))


def run(args: argparse.Namespace) -> Result:
    import sparsellm as sl
    from sparsellm.api import versions
    from sparsellm.export.hf import check_out_dir
    from sparsellm.pipeline import check_window, quality, weight_sparsity
    from sparsellm.recipe import Recipe
    from sparsellm.recover.prompt import PROMPT_FILE, PromptedLM
    from sparsellm.report.markdown import table, zeroshot_table

    common.check_counts(args)
    recipe = _recipe(args)
    names = common.tasks(args)
    harness = [t.strip() for t in args.harness.split(",") if t.strip()]
    if harness:
        from sparsellm.eval.harness import import_lm_eval

        import_lm_eval()  # fail before loading the model
    out = check_out_dir(args.out, args.overwrite) if args.out else None
    loaded = sl.load(args.model)
    tok = loaded.tokenizer
    check_window(loaded.model, args.seqlen)
    common.check_longctx(args, loaded.model, names)
    base = model = loaded.model
    if recipe is not None and recipe.steps:
        calib = sl.calibration(tok, "c4", 32, args.seqlen)
        sl.sparsify(model, Recipe(recipe.steps), calib)
    prompt_dir = Path(args.model)
    if (prompt_dir / PROMPT_FILE).is_file():  # a Compress-then-Prompt result
        if harness:
            raise SparseLLMError("--harness cannot apply this model's soft prompt")
        logging.getLogger(__name__).info("using the soft prompt in %s", prompt_dir)
        model = PromptedLM.attach(base, prompt_dir)
    prefill = recipe.attention.prefill if recipe is not None else None
    sparse_attention: Any = contextlib.nullcontext()
    if prefill is not None:
        from sparsellm.api import attention  # `sl.attention` is shadowed by the subpackage

        sparse_attention = attention(model, prefill, tok)
    start = time.perf_counter()
    with sparse_attention:
        ev = sl.evaluate(model, tok, args.eval, args.eval_windows, args.seqlen, args.batch_size)
        after_tasks = common.run_tasks(args, model, tok, names) if names else None
    details: dict[str, Any] = {
        "attention": args.attention or (prefill.to_spec() if prefill else "sdpa"),
        "block_linear_sparsity": weight_sparsity(base),
        "soft_prompt": model is not base,
    }
    if harness:
        details["harness"] = _harness(args, loaded.model, tok, harness)
    manifest = loaded.info.get("manifest") or {}
    result = Result(
        kind="eval",
        recipe=recipe.to_dict() if recipe is not None else {},
        quality=quality(after_tasks=after_tasks, after_ppl=ev["ppl"]),
        sparsity={"measured": details["block_linear_sparsity"]},
        timings={"evaluate_s": time.perf_counter() - start},
        provenance={
            "model": {k: v for k, v in loaded.info.items() if k != "manifest"},
            "model_recipe": manifest.get("recipe"),
            "eval": {
                "data": ev["data"],
                "windows": ev["windows"],
                "seqlen": args.seqlen,
                "tasks": list(names),
                "limit": args.limit,
            },
            "versions": versions(),
        },
        details=details,
    )
    result.quality["after"] |= {"nll": ev["nll"], "tokens": ev["tokens"]}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result.write(out)
    print(
        table(
            ["model", "corpus", "windows", "perplexity", "block-linear sparsity"],
            [[args.model, ev["data"]["name"], ev["windows"], ev["ppl"], result.measured_sparsity]],
        )
    )
    if after_tasks:
        print(zeroshot_table(after_tasks))
    if harness:
        rows = [
            [t, m.get("docs"), m.get("acc"), m.get("acc_norm")]
            for t, m in details["harness"].items()
        ]
        print(table(["lm-eval task", "docs", "acc", "acc_norm"], rows))
    return result


def _harness(args: argparse.Namespace, model: Any, tok: Any, names: list[str]) -> dict:
    """lm-eval on the in-memory model; sparsellm_* names are converted from our requests."""
    from sparsellm.eval.harness import TASK_PREFIX, run_harness, write_olmo_tasks

    ours = [n.removeprefix(TASK_PREFIX) for n in names if n.startswith(TASK_PREFIX)]
    if ours and args.harness_include:
        raise SparseLLMError("use either sparsellm_* tasks or --harness-include, not both")
    with tempfile.TemporaryDirectory(prefix="sparsellm-lm-eval-") as tmp:
        include = args.harness_include
        if ours:
            include = str(write_olmo_tasks(ours, Path(tmp), args.limit))
        return run_harness(model, tok, names, limit=args.limit, include_path=include)
