"""Streamed, resumable width pruning: the block-local structured methods, one block in
RAM, through the engine of `sparsellm.calib.blockwise`.

Width methods whose scores need only the block itself — ``activation`` and ``obs``
(statistics of the o_proj / down_proj inputs over the calibration batches) and
``spectral`` (data-free) — remove heads and channels block by block exactly as the
in-RAM run does (`shrink_block`), so the shrunk weights are bit-identical to it. What
needs the whole model cannot stream: ``taylor`` (gradients through the model),
``--per-layer`` budgets (distances measured over every block first), SliceGPT (one
rotation of the residual stream through every block), depth (blocks ranked against each
other) and low-rank (ranks allocated across the model).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from sparsellm.calib.blockwise import fingerprint, stream_blocks
from sparsellm.errors import SparseLLMError
from sparsellm.methods.structured.base import StructuredConfig
from sparsellm.methods.structured.common import BlockShape, block_shape, head_dim
from sparsellm.methods.structured.io import describe_shapes
from sparsellm.methods.structured.width import WidthConfig, shrink_block
from sparsellm.models.adapters import block_layout, blocks_prefix
from sparsellm.models.shards import Checkpoint, skeleton

STREAMABLE = ("activation", "obs", "spectral")


def check_streamable(cfg: StructuredConfig) -> None:
    """Refuse the structured steps that need more than one block at a time."""
    if not isinstance(cfg, WidthConfig) or cfg.name not in STREAMABLE:
        raise SparseLLMError(
            f"{cfg.name} looks at the whole model at once: it cannot stream (block-local "
            f"structured methods: {', '.join(STREAMABLE)})"
        )
    if cfg.per_layer:
        raise SparseLLMError(
            "per_layer budgets compare every block's distances first: they cannot stream"
        )


def stream_shrink(
    src: str | os.PathLike,
    work: str | os.PathLike,
    cfg: StructuredConfig,
    calib: torch.Tensor | None,
    *,
    batch_size: int = 4,
    calib_dtype: torch.dtype | None = None,
    max_memory: int | None = None,
) -> dict[str, Any]:
    """Shrink the checkpoint at `src` into `work` one block at a time; `work` also gets
    the config describing the new widths. Returns `apply_structured`'s report keys.
    Called again with the same arguments after a kill, it continues where it stopped."""
    src, work = Path(src), Path(work)
    check_streamable(cfg)
    if cfg.needs_data and (calib is None or calib.numel() == 0):
        raise SparseLLMError(f"{cfg.to_spec()!r} needs calibration ids")
    ckpt = Checkpoint(src)
    model = skeleton(src)
    layout, hd = block_layout(model), head_dim(model.config)
    prefix = blocks_prefix(model)
    calib = calib if cfg.needs_data else None
    fp = fingerprint(ckpt, cfg.to_dict(), calib, batch_size, calib_dtype)

    def process(
        i: int, block: nn.Module, forward: Callable[[], None] | None
    ) -> dict[str, dict[str, int]]:
        before = sum(p.numel() for p in block.parameters())
        shrink_block(block, forward, cfg.name, cfg.ratio, layout, hd, cfg.prune_heads)
        after = sum(p.numel() for p in block.parameters())
        shape = asdict(block_shape(block, layout, hd))
        return {f"{prefix}.{i}": {**shape, "params_before": before, "params_after": after}}

    start = time.perf_counter()
    blocks = stream_blocks(
        model,
        ckpt,
        work,
        fp,
        process,
        calib=calib,
        batch_size=batch_size,
        calib_dtype=calib_dtype,
        max_memory=max_memory,
        desc=f"{cfg.name} (streamed)",
    )
    records = [blocks[f"{prefix}.{i}"] for i in range(len(blocks))]
    names = [f.name for f in fields(BlockShape)]
    shapes = [BlockShape(**{k: r[k] for k in names}) for r in records]
    config = AutoConfig.from_pretrained(src)
    uniform = describe_shapes(config, shapes, hd)
    config.save_pretrained(work)
    before = sum(r["params_before"] for r in records)
    after = sum(r["params_after"] for r in records)
    return {
        **cfg.to_dict(),
        "uniform": uniform,
        "block_ratios": [cfg.ratio] * len(records),
        "seconds": time.perf_counter() - start,
        "block_params_before": before,
        "block_params_after": after,
        "measured_ratio": 1 - after / before,
        "layer_shapes": [asdict(s) for s in shapes],
    }
