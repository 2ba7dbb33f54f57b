"""Sparsify-then-evaluate under one pinned protocol, shared by the CLI commands and `sweep`.

The protocol (data, window counts, tasks, seed, calibration dtype) is a value, so a
sweep can store it, compare it on resume, and hand it to remote workers; its field
defaults are the CLI's defaults too (`sparsellm.cli.common` reads them from here), so
they live in one place. Every run ends as a `sparsellm.result.Result`; the helpers here
fill its common parts (quality, provenance) the same way for every command, so runs of
different kinds line up side by side in `sparsellm report`.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sparsellm.eval.longctx import DEFAULT_LENGTHS
from sparsellm.result import Result

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


def run_tasks(
    model: torch.nn.Module, tok: Any, protocol: Protocol, logits: Any = None
) -> dict[str, Any]:
    """The protocol's tasks on `model` (or, with `logits`, on a streamed model)."""
    from sparsellm.eval.suite import run_tasks as _run

    return _run(
        model,
        tok,
        protocol.tasks,
        protocol.limit,
        protocol.longctx_lengths,
        protocol.longctx_samples,
        logits=logits,
    )


def weight_sparsity(model: torch.nn.Module) -> float:
    """Fraction of zeros over every block linear's weight (what any pruning left)."""
    from sparsellm.models.adapters import block_linears, get_blocks, weight_matrix

    weights = [weight_matrix(m) for b in get_blocks(model) for m in block_linears(b).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def quality(
    compared: dict[str, Any] | None = None,
    before_tasks: dict[str, Any] | None = None,
    after_tasks: dict[str, Any] | None = None,
    after_ppl: float | None = None,
) -> dict[str, Any]:
    """`Result.quality` from `eval.kl.compare_models` output (or a lone `after_ppl`)."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    comparison: dict[str, Any] = {}
    if compared is not None:
        before["ppl"], after["ppl"] = compared["dense_ppl"], compared["sparse_ppl"]
        comparison = {k: compared[k] for k in ("kl", "top1_agreement", "tokens")}
    elif after_ppl is not None:
        after["ppl"] = after_ppl
    if before_tasks:
        before["tasks"] = before_tasks
    if after_tasks:
        after["tasks"] = after_tasks
    return {"before": before, "after": after, "comparison": comparison}


def eval_record(corpus: Any, windows: int, seqlen: int, tasks: Any, limit: int) -> dict[str, Any]:
    """What an evaluation read: the corpus (path, sha256), window counts and tasks."""
    return {
        "data": corpus.describe(),
        "windows": windows,
        "seqlen": seqlen,
        "tasks": list(tasks),
        "limit": limit,
    }


def provenance(prep: Prepared, protocol: Protocol, **extra: Any) -> dict[str, Any]:
    """Model, data (with hashes), window counts, seed and versions behind a run's numbers."""
    from sparsellm.api import versions

    p = protocol
    return {
        "model": {k: v for k, v in prep.loaded.info.items() if k != "manifest"},
        "calib": {
            "data": prep.corpora["calib"].describe(),
            "nsamples": p.nsamples,
            "seqlen": p.seqlen,
            "dtype": p.calib_dtype,
        },
        "eval": eval_record(prep.corpora["eval"], p.eval_windows, p.seqlen, p.tasks, p.limit),
        "protocol": p.to_dict(),
        "seed": p.seed,
        "versions": versions(),
        **extra,
    }


def prune_and_evaluate(
    model: torch.nn.Module,
    dense: torch.nn.Module | None,
    prep: Prepared,
    recipe: Any,
    protocol: Protocol,
    dense_tasks: dict[str, Any] | None = None,
    *,
    kind: str = "prune",
    dense_checkpoint: Any = None,
) -> Result:
    """Sparsify `model` in place with `recipe`, evaluate it (beside `dense` when given).

    `dense_checkpoint` (a safetensors directory of the model before the recipe) stands in
    for `dense` without a second model in memory: the dense side of the comparison is
    computed block by block from the checkpoint (`compare_to_checkpoint`).

    `dense_tasks` reuses dense task results across a sweep (they do not change). The
    recipe's prefill attention method runs the sparse model's evaluation; the dense
    reference keeps SDPA. The KV method acts only while decoding, so it is only recorded.
    """
    from sparsellm.api import attention, sparsify
    from sparsellm.eval.kl import compare_models
    from sparsellm.eval.perplexity import perplexity

    seed_everything(protocol.seed)
    tok = prep.loaded.tokenizer
    report = sparsify(
        model,
        recipe,
        prep.calib_ids,
        batch_size=protocol.batch_size,
        calib_dtype=DTYPES[protocol.calib_dtype],
    )
    recipe = report.recipe
    before_tasks = None
    if protocol.tasks and dense is not None:
        before_tasks = dense_tasks or run_tasks(dense, tok, protocol)
    sparse_attention: Any = contextlib.nullcontext()
    if recipe.attention.prefill is not None:
        sparse_attention = attention(model, recipe.attention.prefill, tok)
    start = time.perf_counter()
    compared, after_ppl, after_tasks = None, None, None
    with sparse_attention:
        if dense is not None:
            compared = compare_models(dense, model, prep.eval_ids)
        elif dense_checkpoint is not None:
            compared = compare_to_checkpoint(model, dense_checkpoint, prep.eval_ids)
        else:
            after_ppl = perplexity(model, prep.eval_ids, desc="sparse perplexity")["ppl"]
        if protocol.tasks:
            after_tasks = run_tasks(model, tok, protocol)
    weights = recipe.of("weights")
    details: dict[str, Any] = {}
    if any(report.details):
        details["steps"] = report.details
    return Result(
        kind=kind,
        recipe=recipe.to_dict(),
        quality=quality(compared, before_tasks, after_tasks, after_ppl),
        sparsity={
            "target": weights[-1].target_sparsity if weights else None,
            "measured": report.sparsity,
            "layers": report.layers,
        },
        timings={"sparsify_s": report.seconds, "evaluate_s": time.perf_counter() - start},
        provenance=provenance(prep, protocol),
        details=details,
    )


def compare_to_checkpoint(
    model: torch.nn.Module, path: Any, windows: torch.Tensor, batch_size: int = 4
) -> dict[str, float]:
    """`compare_models(dense, model, windows)` with the dense model read block by block
    from the checkpoint at `path`: only its last block outputs are held.

    The dense outputs go through `model`'s own final norm and head, so this is for models
    whose recipe changed only block linears (weight steps), which leave those untouched.
    """
    from sparsellm.calib.streamed import final_hidden
    from sparsellm.eval.kl import compare_logprobs
    from sparsellm.models.replay import last_block_output, slice_logprobs
    from sparsellm.models.shards import Checkpoint, skeleton

    dense = final_hidden(skeleton(path), Checkpoint(path), windows, batch_size)

    def triples() -> Any:
        for b, ids in enumerate(windows.split(batch_size)):
            h_d = dense[b * batch_size : b * batch_size + len(ids)]
            for targets, (lp_d, lp_s) in slice_logprobs(
                model, [h_d, last_block_output(model, ids)], ids
            ):
                yield targets, lp_d, lp_s

    return compare_logprobs(triples())


def flat_view(result: Result) -> dict[str, Any]:
    """The Result's dict plus the flat keys sparsellm printed before Result existed.

    ``--json`` output and ``report.json`` carry these aliases (``dense_ppl``,
    ``sparse_ppl``, ``kl``, ``measured_sparsity``, ... and every ``details`` key at the
    top) so scripts written against the old per-command shapes keep working; new code
    should read the Result's own keys (``quality``, ``sparsity``, ``details``).
    """
    q = result.quality
    before, after = q.get("before") or {}, q.get("after") or {}
    steps = result.recipe.get("steps") or []
    provenance_ = result.provenance
    if result.kind == "eval":
        zeroshot = after.get("tasks")
    else:
        zeroshot = {k: v for k, v in (("dense", before), ("sparse", after)) if v.get("tasks")}
        zeroshot = {k: v["tasks"] for k, v in zeroshot.items()}
    flat = {
        "method": result.method,
        "pattern": "+".join(s["pattern"] for s in steps if "pattern" in s) or None,
        "target_sparsity": result.sparsity.get("target"),
        "measured_sparsity": result.sparsity.get("measured"),
        "layers": result.sparsity.get("layers"),
        "prune_seconds": result.timings.get("sparsify_s"),
        "dense_ppl": before.get("ppl"),
        "sparse_ppl": after.get("ppl"),
        "ppl": after.get("ppl"),
        "kl": result.metric("comparison", "kl"),
        "top1_agreement": result.metric("comparison", "top1_agreement"),
        "zeroshot": zeroshot or None,
        "before": before,
        "after": after,
        "attention": {k: _spec(v) for k, v in (result.recipe.get("attention") or {}).items()},
        **{k: provenance_[k] for k in ("model", "calib", "eval", "seed") if k in provenance_},
    }
    return {**flat, **result.details, **result.to_dict()}


def _spec(step: dict[str, Any] | None) -> str:
    """A recipe step's spec string ("" for none), as the flat ``attention`` key held it."""
    from sparsellm.config import from_dict

    return from_dict(step).to_spec() if step else ""
