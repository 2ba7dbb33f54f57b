"""Streamed, resumable weight pruning: one block in RAM, one output shard per block.

`apply_step` holds the whole model; this prunes block by block through the engine in
`sparsellm.calib.blockwise` (resuming, activation files, shards). Per block it does what
`apply_step` does: statistics of the chosen linears from one forward (`block_stats`),
then `prune_layer` on each, so the weights are bit-identical to an in-RAM run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsellm.calib.blockwise import fingerprint, stream_blocks
from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.apply import block_stats, prune_layer, select_targets
from sparsellm.methods.weights.base import Hessian, LayerContext, Stats, WeightPruneConfig
from sparsellm.methods.weights.masks import check_nm_shape
from sparsellm.models.adapters import weight_matrix
from sparsellm.models.shards import Checkpoint, skeleton
from sparsellm.registry import handler


def check_streamable(cfg: WeightPruneConfig) -> None:
    """Refuse the steps that need more than one block at a time."""
    pruner = handler(cfg)
    if cfg.allocation != "uniform":
        raise SparseLLMError(
            f"allocation {cfg.allocation} ranks layers across the whole model: it cannot stream"
        )
    if pruner.needs_gradients:
        raise SparseLLMError(
            f"{cfg.name} needs gradients through the whole model: it cannot stream"
        )


def _new_stats(cls: type[Stats], work: Path, max_memory: int | None, d: int) -> Stats:
    """`cls(d)`; a Hessian whose fp64 sum alone exceeds `max_memory` lives in a file in
    `work`. Only then: a spilled sum is rewritten by every calibration window, and under
    a cgroup v1 memory limit its dirty pages are not written back in time to be
    reclaimed (a 2 GiB-capped 1.5B run was killed holding 666 MB of them), so a file
    buys nothing that anonymous memory would not, unless the budget truly forbids it."""
    if issubclass(cls, Hessian) and max_memory is not None and 8 * d * d > max_memory:
        return cls(d, spill=work)
    return cls(d)


def stream_prune(
    src: str | os.PathLike,
    work: str | os.PathLike,
    cfg: WeightPruneConfig,
    calib: torch.Tensor | None,
    *,
    batch_size: int = 8,
    calib_dtype: torch.dtype | None = None,
    max_memory: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Prune the safetensors checkpoint at `src` into `work`, one block at a time.

    Returns per-layer target/measured sparsity as `apply_step` does. When it returns,
    `work` holds the block shards, the untouched tensors (embeddings, final norm, head)
    in a last shard and the safetensors index; config and tokenizer are the caller's.
    Called again with the same arguments after a kill, it continues where it stopped.
    """
    src, work = Path(src), Path(work)
    check_streamable(cfg)
    pruner = handler(cfg)(cfg)
    if pruner.stats is not None and calib is None:
        raise SparseLLMError(f"method {cfg.name!r} needs calibration data")
    ckpt = Checkpoint(src)
    model = skeleton(src)
    selected = select_targets(model, cfg)
    for chosen in selected:
        for fqn, module in chosen.items():
            check_nm_shape(cfg.parsed_pattern, weight_matrix(module).shape[1], fqn)
    fp = fingerprint(ckpt, cfg.to_dict(), calib, batch_size, calib_dtype)
    new_stats = partial(_new_stats, pruner.stats, work, max_memory)

    def process(
        i: int, block: nn.Module, forward: Callable[[], None] | None
    ) -> dict[str, dict[str, Any]]:
        chosen = selected[i]
        stats: dict[str, Any] = dict.fromkeys(chosen)
        if forward is not None and chosen:
            stats = block_stats(chosen, new_stats, forward)
        layers = {}
        for fqn, module in chosen.items():
            ctx = LayerContext(sparsity=cfg.target_sparsity)
            # popped: statistics (a down_proj's Hessian is 321 MB on a 1.5B model) are
            # freed once their last layer is pruned, not held into the next block
            entry = prune_layer(pruner, module, stats.pop(fqn), ctx)
            entry.update(numel=weight_matrix(module).numel(), method=cfg.name)
            layers[fqn] = entry
        return layers

    return stream_blocks(
        model,
        ckpt,
        work,
        fp,
        process,
        calib=calib if pruner.stats is not None else None,
        batch_size=batch_size,
        calib_dtype=calib_dtype,
        max_memory=max_memory,
        desc=f"{cfg.name} (streamed)",
    )
