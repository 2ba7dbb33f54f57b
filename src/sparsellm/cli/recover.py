"""`sparsellm recover`: distil a sparse model from its dense teacher, pruned weights frozen.

Optional stages, in order: MaskLLM (learn N:M masks over the teacher's weights),
distillation (all weights, or masked LoRA adapters merged back), a soft prompt. The
Result's quality is the recovery's: ``before`` the student as loaded, ``after`` the
recovered model, ``comparison`` the recovered model against the teacher; the teacher's
own perplexity and the student's KL before recovery are under ``details.teacher``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from sparsellm.cli import common
from sparsellm.errors import SparseLLMError
from sparsellm.result import Result


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "recover",
        help="distillation fine-tuning of a sparse model from its dense teacher, masks frozen",
        description="Fine-tune SRC (a sparse model) against --teacher with KL on logits plus "
        "SquareHead per-layer normalised MSE; pruned weights stay exactly zero. With --lora "
        "only masked low-rank adapters train and are merged (zeros kept) before saving.",
    )
    common.add_model_and_eval(p, None)
    p.add_argument("--teacher", required=True, metavar="SRC", help="the dense model")
    p.add_argument(
        "--data",
        default="c4",
        metavar="c4|wiki|PATH",
        help="training text (default: c4; evaluation stays on --eval)",
    )
    p.add_argument("--nsamples", type=int, default=256, help="training windows (default 256)")
    p.add_argument(
        "--steps", type=int, default=100, help="distillation steps (default 100; 0 = none)"
    )
    p.add_argument(
        "--learn-masks",
        default=None,
        metavar="N:M",
        help="first learn N:M masks over the teacher's weights (MaskLLM, weights "
        "frozen, Gumbel-softmax, prior = the student's current mask)",
    )
    p.add_argument(
        "--mask-steps", type=int, default=200, help="MaskLLM steps with --learn-masks (default 200)"
    )
    p.add_argument(
        "--soft-prompt",
        type=int,
        default=0,
        metavar="TOKENS",
        help="last, learn a soft prompt of this many tokens (Compress-then-Prompt); saved as "
        "soft_prompt.safetensors and used by `sparsellm eval` automatically",
    )
    p.add_argument("--prompt-steps", type=int, default=100, help="soft-prompt steps (default 100)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="RANK",
        help="train masked LoRA adapters of this rank instead of all weights",
    )
    p.add_argument(
        "--adapter",
        choices=("lora", "sora", "dsee", "pst"),
        default="lora",
        help="with --lora: lora (masked LoRA), sora (rank pruned by an L1-gated vector, "
        "SoRA), dsee (low-rank plus a sparse update, DSEE) or pst (LoRA plus a learned "
        "low-rank importance score that re-chooses the mask in the same N:M pattern, PST); "
        "every kind keeps the model as sparse as it came",
    )
    p.add_argument(
        "--sora-lambda",
        type=float,
        default=1.0,
        help="SoRA's L1 strength: gates are soft-thresholded by lambda x lr per step (default 1)",
    )
    p.add_argument(
        "--dsee-sparse",
        type=int,
        default=64,
        metavar="N",
        help="DSEE's sparse update: N trainable positions per layer (default 64)",
    )
    p.add_argument("--seed", type=int, default=0)
    common.add_out(p, required=True)


def _student_result(info: dict[str, Any]) -> Result | None:
    """The Result the student was saved with (None for a model sparsellm did not write)."""
    try:
        return Result.from_dict(info.get("manifest") or {})
    except SparseLLMError:
        return None


def run(args: argparse.Namespace) -> Result:
    import sparsellm as sl
    from sparsellm.api import versions
    from sparsellm.data.corpora import resolve_corpus, token_windows
    from sparsellm.eval.kl import compare_models
    from sparsellm.export.hf import check_out_dir
    from sparsellm.methods.weights.maskllm import MaskLLMConfig, learn_masks
    from sparsellm.methods.weights.masks import parse_pattern
    from sparsellm.pipeline import (
        check_window,
        eval_record,
        quality,
        seed_everything,
        weight_sparsity,
    )
    from sparsellm.recover.distill import DistillConfig, distill, summary
    from sparsellm.recover.dsee import add_dsee
    from sparsellm.recover.lora import add_lora, merge_lora
    from sparsellm.recover.prompt import PromptedLM, train_prompt
    from sparsellm.recover.pst import add_pst
    from sparsellm.recover.sora import active_ranks, add_sora
    from sparsellm.report.markdown import quality_table

    common.check_counts(args)
    if args.adapter != "lora" and not args.lora:
        raise SparseLLMError(f"--adapter {args.adapter} needs --lora RANK (the adapter's rank)")
    if args.sora_lambda < 0 or args.dsee_sparse < 0:
        raise SparseLLMError("--sora-lambda and --dsee-sparse must be >= 0")
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
    names = common.tasks(args)
    data_corpus, eval_corpus = resolve_corpus(args.data), resolve_corpus(args.eval)
    seed_everything(args.seed)
    student, teacher = sl.load(args.model), sl.load_model(args.teacher)
    tok = student.tokenizer
    check_window(student.model, args.seqlen)
    common.check_longctx(args, student.model, names)
    data = token_windows(tok, data_corpus, args.nsamples, args.seqlen)
    windows = token_windows(tok, eval_corpus, args.eval_windows, args.seqlen)
    before = compare_models(teacher.model, student.model, windows)
    details: dict[str, Any] = {}
    timings: dict[str, float] = {}
    if pattern is not None:
        mcfg = MaskLLMConfig(n=pattern.n, m=pattern.m, steps=args.mask_steps, seed=args.seed)
        mlog = learn_masks(student.model, teacher.model, data, mcfg)
        timings["maskllm_s"] = mlog.seconds
        details["maskllm"] = {
            "steps": len(mlog.losses),
            "changed_group_fraction": mlog.changed_fraction,
            "seconds": mlog.seconds,
            "after": compare_models(teacher.model, student.model, windows),
        }
    details["training"] = None
    if args.steps > 0:
        after_step = None
        if args.adapter == "sora":
            after_step = add_sora(student.model, args.lora, lam=args.sora_lambda)[1]
        elif args.adapter == "dsee":
            add_dsee(student.model, args.lora, n_sparse=args.dsee_sparse)
        elif args.adapter == "pst":
            add_pst(student.model, args.lora)
        elif args.lora:
            add_lora(student.model, rank=args.lora)
        log = distill(student.model, teacher.model, data, cfg, after_step)
        if args.adapter == "sora":
            details["sora_ranks"] = active_ranks(student.model)
        if args.lora:
            merge_lora(student.model)
        timings["distill_s"] = log.seconds
        details["training"] = summary(log)
    evaluated = student.model
    if args.soft_prompt:
        start = time.perf_counter()
        evaluated = PromptedLM(student.model, args.soft_prompt)
        details["soft_prompt"] = train_prompt(
            evaluated, teacher.model, data, args.prompt_steps, seed=args.seed
        )
        timings["prompt_s"] = time.perf_counter() - start
    after = compare_models(teacher.model, evaluated, windows)
    after_tasks = common.run_tasks(args, evaluated, tok, names) if names else None
    prior = _student_result(student.info)
    details |= {
        "teacher": {
            "ppl": before["dense_ppl"],
            "kl_before": before["kl"],
            "top1_agreement_before": before["top1_agreement"],
        },
        "config": {
            **vars(cfg),
            "lora_rank": args.lora,
            "adapter": args.adapter if args.lora else None,
        },
        "student_kind": prior.kind if prior else None,
    }
    q = quality(after_tasks=after_tasks, after_ppl=after["sparse_ppl"])
    q["before"]["ppl"] = before["sparse_ppl"]
    q["comparison"] = {k: after[k] for k in ("kl", "top1_agreement", "tokens")}
    q["comparison"]["reference"] = "teacher"
    result = Result(
        kind="recover",
        recipe=prior.recipe if prior else {},
        quality=q,
        sparsity={
            "target": prior.sparsity.get("target") if prior else None,
            "measured": weight_sparsity(student.model),
        },
        timings=timings,
        provenance={
            "model": {k: v for k, v in student.info.items() if k != "manifest"},
            "teacher": teacher.info,
            "data": {
                "data": data_corpus.describe(),
                "nsamples": args.nsamples,
                "seqlen": args.seqlen,
            },
            "eval": eval_record(eval_corpus, args.eval_windows, args.seqlen, names, args.limit),
            "seed": args.seed,
            "versions": versions(),
            "out": str(out),
        },
        details=details,
    )
    sl.save(student.model, tok, out, manifest=result.to_dict(), overwrite=args.overwrite)
    result.write(out)
    if isinstance(evaluated, PromptedLM):
        evaluated.save_prompt(out)
    print(quality_table(result))
    print(f"teacher ppl {before['dense_ppl']:.4g}; saved recovered model to {out}")
    return result
