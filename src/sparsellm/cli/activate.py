"""`sparsellm activate`: calibrated activation sparsity, compared with dense, saved.

The saved directory is the plain dense checkpoint plus ``activation_sparsity.safetensors``
(vanilla transformers loads it dense; `sparsellm eval` / `sparsellm.load` re-apply the
thresholds) and the Result. Calibration flags are the method config's own keys, so
their defaults live on the config (`sparsellm.methods.activation.base.ActivationConfig`).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from sparsellm.cli import common
from sparsellm.errors import SparseLLMError
from sparsellm.result import Result


def add_parser(sub: Any) -> None:
    from sparsellm.methods.activation.base import ActivationConfig

    d = ActivationConfig()
    p = sub.add_parser(
        "activate",
        help="activation sparsity (TEAL, WINA, R-Sparse, CATS): calibrate thresholds, "
        "compare with dense, measure CPU decode speed, save",
        description="Calibrate per-layer activation thresholds on --calib, report dense vs "
        "sparse perplexity / KL (and --tasks), optionally measure batch-1 decode tokens/s "
        "with our CPU runtime (dense vs sparse, same kernel), and save.",
    )
    common.add_model_and_eval(p, "default")
    p.add_argument(
        "--method",
        default="teal",
        metavar="SPEC",
        help="teal (|x| thresholds) | wina (|x| x column norm) | rsparse (+ rank-r SVD "
        "path for skipped channels) | cats (SwiGLU gate threshold), a name or a full spec "
        "such as teal:sparsity=0.4 (default: teal)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help=f"share of the thresholded weight reads to skip, in [0, 0.95) ({d.sparsity})",
    )
    p.add_argument(
        "--allocation",
        choices=["greedy", "uniform"],
        default=None,
        help=f"per-layer levels inside each block: greedy by output error (TEAL) or uniform "
        f"({d.allocation})",
    )
    p.add_argument("--rank", type=int, default=None, help="R-Sparse low-rank size (32)")
    p.add_argument(
        "--head",
        action="store_true",
        help="also threshold the LM head's input at --sparsity (input methods); worth it "
        "for small models with large vocabularies, whose head caps the decode speedup",
    )
    p.add_argument("--calib", default=common.DEFAULTS["calib"], metavar="c4|wiki|PATH")
    p.add_argument("--nsamples", type=int, default=None, help=f"calibration windows ({d.nsamples})")
    p.add_argument(
        "--calib-seqlen", type=int, default=None, help=f"tokens per calibration window ({d.seqlen})"
    )
    p.add_argument("--seed", type=int, default=None, help=f"random seed ({d.seed})")
    p.add_argument(
        "--speed",
        action="store_true",
        help="measure batch-1 decode tokens/s, our runtime dense vs sparse (same kernel)",
    )
    p.add_argument(
        "--new-tokens", type=int, default=128, help="tokens generated per --speed run (128)"
    )
    p.add_argument("--out", default=None, metavar="DIR", help="save here (default: no save)")
    p.add_argument("--overwrite", action="store_true")


def config(args: argparse.Namespace) -> Any:
    """The activation config of --method and the flags, checked before any model loads."""
    from sparsellm.config import split_spec
    from sparsellm.methods.activation.apply import activation_method
    from sparsellm.registry import names

    name, _ = split_spec(args.method)
    if name not in names("activation"):
        valid = ", ".join(names("activation"))
        raise SparseLLMError(f"unknown activation method {name!r}; valid: {valid}")
    cfg = common.method_config(
        args.method,
        "activation",
        sparsity=args.sparsity,
        allocation=args.allocation,
        rank=args.rank,
        head=args.head or None,
        nsamples=args.nsamples,
        seqlen=args.calib_seqlen,
        seed=args.seed,
    )
    activation_method(cfg)  # e.g. head sparsity with a gate method
    return cfg


def run(args: argparse.Namespace) -> Result:
    import sparsellm as sl
    from sparsellm.api import versions
    from sparsellm.data.corpora import resolve_corpus, token_windows
    from sparsellm.eval.kl import compare_models
    from sparsellm.export.hf import check_out_dir
    from sparsellm.methods.activation.io import save_with_activations
    from sparsellm.methods.activation.modules import measured_sparsity, reset_counts
    from sparsellm.models.adapters import get_layout
    from sparsellm.pipeline import check_window, eval_record, quality, seed_everything
    from sparsellm.recipe import Recipe
    from sparsellm.report.markdown import quality_table, table

    common.check_counts(args)
    if args.new_tokens < 2:
        raise SparseLLMError(f"--new-tokens must be >= 2, got {args.new_tokens}")
    cfg = config(args)
    out = check_out_dir(Path(args.out), args.overwrite) if args.out else None
    names = common.tasks(args)
    calib_corpus, eval_corpus = resolve_corpus(args.calib), resolve_corpus(args.eval)
    seed_everything(cfg.seed)
    loaded = sl.load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    get_layout(model)
    check_window(model, max(args.seqlen, cfg.seqlen))
    common.check_longctx(args, model, names)
    dense = copy.deepcopy(model)
    calib = token_windows(tok, calib_corpus, cfg.nsamples, cfg.seqlen)
    report = sl.sparsify(model, Recipe((cfg,)), calib)
    windows = token_windows(tok, eval_corpus, args.eval_windows, args.seqlen)
    reset_counts(model)
    compared = compare_models(dense, model, windows)
    measured = measured_sparsity(model)
    tasks = (None, None)
    if names:
        tasks = (
            common.run_tasks(args, dense, tok, names),
            common.run_tasks(args, model, tok, names),
        )
    details: dict[str, Any] = {"config": cfg.to_dict(), "fit": report.details[0]}
    if args.speed:
        details["decode_speed"] = _decode_speed(dense, model, tok, args.new_tokens)
    result = Result(
        kind="activate",
        recipe=report.recipe.to_dict(),
        quality=quality(compared, *tasks),
        sparsity={"target": cfg.sparsity, "measured": measured},
        timings={"calibrate_s": report.seconds},
        provenance={
            "model": loaded.info,
            "calib": {
                "data": calib_corpus.describe(),
                "nsamples": cfg.nsamples,
                "seqlen": cfg.seqlen,
            },
            "eval": eval_record(eval_corpus, args.eval_windows, args.seqlen, names, args.limit),
            "seed": cfg.seed,
            "versions": versions(),
            **({"out": str(out)} if out is not None else {}),
        },
        details=details,
    )
    print(quality_table(result))
    if args.speed:
        sp = details["decode_speed"]
        rows = [["decode tok/s", sp["dense_tok_s"], sp["sparse_tok_s"], f"{sp['speedup']:.3f}x"]]
        print(table(["", "dense", cfg.to_spec(), "speedup"], rows))
    if out is not None:
        save_with_activations(model, tok, out, result.to_dict(), cfg, args.overwrite)
        print(f"saved to {out} (dense weights + activation_sparsity.safetensors)")
    return result


def _decode_speed(
    dense: Any, sparse: Any, tok: Any, new_tokens: int, repeats: int = 3
) -> dict[str, Any]:
    """Batch-1 decode tok/s of our runtime, dense and sparse alternated, medians + ratio."""
    import torch

    from sparsellm.data.corpora import resolve_corpus, token_windows
    from sparsellm.eval.speed import alternate_medians
    from sparsellm.runtime.decode import DecodeRuntime

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
        "threads": torch.get_num_threads(),
    }
