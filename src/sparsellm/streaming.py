"""Streamed runs: `prune --stream` prepared without loading the model, pruned block by
block, and evaluated block by block (see docs/scale.md).

The in-RAM counterparts are `sparsellm.pipeline.prepare` and `prune_and_evaluate`; this
module fills the same `Prepared` and `Result`, so streamed runs line up with the others
in `sparsellm report`.
"""

from __future__ import annotations

import time
from typing import Any

from sparsellm.pipeline import (
    DTYPES,
    Prepared,
    Protocol,
    provenance,
    quality,
    run_tasks,
    seed_everything,
)
from sparsellm.result import Result


def prepare_streamed(source: str, protocol: Protocol) -> Prepared:
    """`prepare` without loading the model: the checkpoint directory, its tokenizer and
    the protocol's windows (`Prepared.loaded.model` is None; streaming reads the shards)."""
    from transformers import AutoConfig, AutoTokenizer

    from sparsellm.data.corpora import resolve_corpus, token_windows
    from sparsellm.errors import SparseLLMError
    from sparsellm.models.adapters import get_adapter
    from sparsellm.models.compressed import compressed_format
    from sparsellm.models.load import LoadedModel, convert_gguf, file_sha256, resolve_source
    from sparsellm.models.shards import return_freed_memory, skeleton

    kind, where = resolve_source(source)
    info: dict[str, Any] = {"source": str(source), "kind": kind}
    if kind == "hub":
        raise SparseLLMError(
            f"streaming reads a local checkpoint: download {source} first "
            "(e.g. `hf download ORG/NAME --local-dir DIR`) and pass the directory"
        )
    if kind == "gguf":  # de-quantised once into the cache, then streamed from there
        info["gguf_sha256"] = file_sha256(where)
        where = convert_gguf(where)
    if compressed_format(where) is not None:
        raise SparseLLMError(f"{where} is a compressed export: prune its source checkpoint")
    info["path"] = str(where)
    info["model_type"] = AutoConfig.from_pretrained(where).model_type
    get_adapter(skeleton(where))  # a supported architecture, before any work
    tok = AutoTokenizer.from_pretrained(where)
    corpora = {"calib": resolve_corpus(protocol.calib), "eval": resolve_corpus(protocol.eval)}
    seed_everything(protocol.seed)
    calib = token_windows(tok, corpora["calib"], protocol.nsamples, protocol.seqlen)
    evals = token_windows(tok, corpora["eval"], protocol.eval_windows, protocol.seqlen)
    return_freed_memory()  # what tokenizing left in the allocator counts against a cap
    return Prepared(LoadedModel(model=None, tokenizer=tok, info=info), calib, evals, corpora)


def stream_prune_and_evaluate(
    prep: Prepared,
    step: Any,
    protocol: Protocol,
    work: Any,
    *,
    max_memory: int | None = None,
    dense_eval: bool = True,
    kind: str = "prune",
) -> Result:
    """`prune_and_evaluate` for a model that need not fit in RAM: prune `step` (a weight
    method, or a block-local structured one) streamed into `work` (resumable), then
    evaluate block by block; never two models in memory.

    `work` ends as a complete HF checkpoint (shards, config, tokenizer); the caller
    writes the Result beside it and moves it into place.
    """
    import shutil
    from pathlib import Path

    from sparsellm.calib.streamed import final_hidden, logprobs, streamed_logits
    from sparsellm.eval.kl import compare_logprobs
    from sparsellm.methods.structured.io import width_skeleton
    from sparsellm.methods.structured.stream import stream_shrink
    from sparsellm.methods.weights.stream import stream_prune
    from sparsellm.models.shards import WEIGHT_FILES, Checkpoint, skeleton
    from sparsellm.recipe import Recipe

    src, work = Path(prep.loaded.info["path"]), Path(work)
    seed_everything(protocol.seed)
    start = time.perf_counter()
    how = {
        "batch_size": protocol.batch_size,
        "calib_dtype": DTYPES[protocol.calib_dtype],
        "max_memory": max_memory,
    }
    structured = step.family == "structured"
    if structured:
        shrunk = stream_shrink(src, work, step, prep.calib_ids, **how)
    else:
        layers = stream_prune(src, work, step, prep.calib_ids, **how)
    for file in src.iterdir():  # generation config, tokenizer, chat template (and config)
        weights, own = file.name.endswith(WEIGHT_FILES), (work / file.name).exists()
        if file.is_file() and not weights and not own:  # a shrunk model's config is its own
            shutil.copy2(file, work / file.name)
    sparsify_s = time.perf_counter() - start

    start = time.perf_counter()
    ids = prep.eval_ids
    sparse = (width_skeleton(work) if structured else skeleton(work), Checkpoint(work))
    dense = (skeleton(src), Checkpoint(src))
    hidden = [final_hidden(*sparse, ids)]
    if dense_eval:  # the dense blocks' outputs; final norm and head are the same tensors
        hidden.insert(0, final_hidden(*dense, ids))
    slices = logprobs(*sparse, ids, hidden)
    if dense_eval:
        compared, after_ppl = compare_logprobs((t, d, s) for t, (d, s) in slices), None
    else:  # the sparse model against itself: its own NLL
        compared = None
        after_ppl = compare_logprobs((t, s, s) for t, (s,) in slices)["sparse_ppl"]
    del hidden, slices
    tasks: list[dict | None] = [None, None]
    if protocol.tasks:  # zero-shot and long-context, block by block too
        tok = prep.loaded.tokenizer
        if dense_eval:
            tasks[0] = run_tasks(dense[0], tok, protocol, streamed_logits(*dense))
        tasks[1] = run_tasks(sparse[0], tok, protocol, streamed_logits(*sparse))
    q = quality(compared, *tasks, after_ppl=after_ppl)
    evaluate_s = time.perf_counter() - start
    stream = provenance(prep, protocol, stream={"max_memory": max_memory})
    if structured:  # lined up with `sparsellm shrink`'s Result
        return Result(
            kind=kind,
            recipe=Recipe((step,)).to_dict(),
            quality=q,
            sparsity={"target": step.ratio, "measured": shrunk["measured_ratio"]},
            timings={"shrink_s": sparsify_s, "evaluate_s": evaluate_s},
            provenance=stream,
            details={"shrink": shrunk},
        )
    total = sum(v["numel"] for v in layers.values())
    measured = sum(v["numel"] * v["sparsity"] for v in layers.values()) / total if total else 0.0
    return Result(
        kind=kind,
        recipe=Recipe((step,)).to_dict(),
        quality=q,
        sparsity={"target": step.target_sparsity, "measured": measured, "layers": layers},
        timings={"sparsify_s": sparsify_s, "evaluate_s": evaluate_s},
        provenance=stream,
    )
