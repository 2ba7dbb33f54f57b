"""Prune-then-evaluate under one pinned protocol, shared by `prune`/`run` and `sweep`.

The protocol (data, window counts, tasks, seed, calibration dtype) is a value, so a
sweep can store it, compare it on resume, and hand it to remote workers; every result
dict carries it, so a number never travels without the settings that produced it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sparsellm.eval.longctx import DEFAULT_LENGTHS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Protocol:
    """Everything besides the recipe that determines a run's numbers."""

    calib: str = "c4"
    eval: str = "wiki"
    nsamples: int = 32
    seqlen: int = 512
    eval_windows: int = 32
    tasks: tuple[str, ...] = ()
    limit: int = 200
    longctx_lengths: tuple[int, ...] = DEFAULT_LENGTHS
    longctx_samples: int = 3
    seed: int = 0
    calib_dtype: str = "fp32"
    batch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protocol:
        data = dict(data)
        for key in ("tasks", "longctx_lengths"):
            data[key] = tuple(data[key])
        return cls(**data)


@dataclass
class Prepared:
    """A loaded model with the protocol's token windows, validated against its window."""

    loaded: Any
    calib_ids: torch.Tensor
    eval_ids: torch.Tensor
    corpora: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(source: str, protocol: Protocol) -> Prepared:
    """Load `source` and cut the calibration and evaluation windows."""
    from sparsellm.data.corpora import resolve_corpus, token_windows
    from sparsellm.eval.longctx import TASKS as LONGCTX
    from sparsellm.eval.longctx import check_lengths
    from sparsellm.models.load import load_model

    corpora = {"calib": resolve_corpus(protocol.calib), "eval": resolve_corpus(protocol.eval)}
    seed_everything(protocol.seed)
    loaded = load_model(source)
    check_window(loaded.model, protocol.seqlen)
    if any(t in LONGCTX for t in protocol.tasks):
        check_lengths(loaded.model, protocol.longctx_lengths)
    tok = loaded.tokenizer
    calib = token_windows(tok, corpora["calib"], protocol.nsamples, protocol.seqlen)
    evals = token_windows(tok, corpora["eval"], protocol.eval_windows, protocol.seqlen)
    return Prepared(loaded, calib, evals, corpora)


def check_window(model: torch.nn.Module, seqlen: int) -> None:
    from sparsellm.errors import SparseLLMError
    from sparsellm.models.adapters import context_window

    limit = context_window(model)
    if limit and seqlen > limit:
        raise SparseLLMError(f"--seqlen {seqlen} exceeds the model's context window {limit}")


def run_tasks(model: torch.nn.Module, tok: Any, protocol: Protocol) -> dict[str, Any]:
    from sparsellm.eval.suite import run_tasks as _run

    return _run(
        model,
        tok,
        protocol.tasks,
        protocol.limit,
        protocol.longctx_lengths,
        protocol.longctx_samples,
    )


def prune_and_evaluate(
    model: torch.nn.Module,
    dense: torch.nn.Module | None,
    prep: Prepared,
    steps: Any,
    protocol: Protocol,
    dense_tasks: dict[str, Any] | None = None,
    attention: Any = None,
) -> dict[str, Any]:
    """Prune `model` in place with `steps`, evaluate it (beside `dense` when given).

    `dense_tasks` reuses dense task results across a sweep (they do not change).
    `attention` (a recipe's `AttentionRecipe`) runs the pruned model's evaluation with
    its sparse prefill method; the dense reference keeps SDPA.
    """
    import contextlib

    from sparsellm.api import sparsify, versions
    from sparsellm.eval.kl import compare_models
    from sparsellm.eval.perplexity import perplexity

    seed_everything(protocol.seed)
    tok = prep.loaded.tokenizer
    report = sparsify(
        model,
        steps,
        prep.calib_ids,
        batch_size=protocol.batch_size,
        calib_dtype=DTYPES[protocol.calib_dtype],
    )
    quality: dict[str, Any] = {"dense_ppl": None, "kl": None, "top1_agreement": None}
    zeroshot: dict[str, Any] = {}
    if protocol.tasks and dense is not None:
        zeroshot["dense"] = dense_tasks or run_tasks(dense, tok, protocol)
    sparse_attn = contextlib.nullcontext()
    if attention is not None and attention.prefill:
        from sparsellm.attention.hf import parse_attention, prepared_attention

        sparse_attn = prepared_attention(model, tok, parse_attention(attention.prefill))
    with sparse_attn:
        if dense is not None:
            quality.update(compare_models(dense, model, prep.eval_ids))
        else:
            quality["sparse_ppl"] = perplexity(model, prep.eval_ids, desc="sparse perplexity")[
                "ppl"
            ]
        if protocol.tasks:
            zeroshot["sparse"] = run_tasks(model, tok, protocol)
    p = protocol
    return {
        "method": "+".join(s["method"] for s in report.steps),
        "pattern": "+".join(s["pattern"] for s in report.steps),
        "target_sparsity": report.steps[-1]["sparsity"],
        "measured_sparsity": report.sparsity,
        "prune_seconds": report.seconds,
        "dense_ppl": quality["dense_ppl"],
        "sparse_ppl": quality["sparse_ppl"],
        "kl": quality["kl"],
        "top1_agreement": quality["top1_agreement"],
        "zeroshot": zeroshot,
        "speed": None,
        "model": prep.loaded.info,
        "recipe": report.steps,
        "attention": attention.to_dict() if attention is not None else None,
        "calib": {
            "data": prep.corpora["calib"].describe(),
            "nsamples": p.nsamples,
            "seqlen": p.seqlen,
            "dtype": p.calib_dtype,
        },
        "eval": {
            "data": prep.corpora["eval"].describe(),
            "windows": p.eval_windows,
            "seqlen": p.seqlen,
            "tasks": list(p.tasks),
            "limit": p.limit,
        },
        "protocol": p.to_dict(),
        "seed": p.seed,
        "versions": versions(),
        "layers": report.layers,
    }
