"""Structured pruning: smaller dense models (fewer heads, channels, blocks).

`shrink(model, method, ratio, calib_ids)` removes about `ratio` of the transformer
blocks' parameters in place and leaves a plain HF model whose config matches its
weights (per-layer widths: see `io.py`, loaded with `structured.load`).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import block_layout, get_blocks
from sparsellm.structured.common import block_budgets, block_distances, block_param_count
from sparsellm.structured.common import head_dim as _head_dim
from sparsellm.structured.io import layer_shapes, load, write_shapes
from sparsellm.structured.lowrank import low_rank
from sparsellm.structured.slicing import (
    per_dim_params,
    slice_model,
    width_for_ratio,
    width_multiple,
)

WIDTH = ("taylor", "activation", "obs", "spectral")
SLICING = ("slicegpt",)
LOW_RANK = {"welore": 0.0, "welore-sparse": 0.25}  # share of budget to a sparse residual
DEPTH = {"depth": "angular", "depth-ppl": "ppl"}
METHODS = (*WIDTH, *DEPTH, *SLICING, *LOW_RANK)
NO_DATA = ("spectral", *LOW_RANK)

__all__ = ["METHODS", "load", "shrink"]


def shrink(
    model: nn.Module,
    method: str,
    ratio: float,
    calib_ids: torch.Tensor | None = None,
    per_layer: bool = False,
    batch_size: int = 4,
    prune_heads: bool = True,
) -> dict[str, Any]:
    """Remove about `ratio` of the blocks' parameters with `method`, in place; returns a report.

    `per_layer` gives each block its own budget from its angular distance (CFSP's coarse
    step; needs calibration data) instead of one uniform width.
    """
    from sparsellm.structured.depth import prune_depth
    from sparsellm.structured.width import prune_width

    if method not in METHODS:
        raise SparseLLMError(f"unknown structured method {method!r}; choose from {METHODS}")
    if not 0.0 <= ratio < 1.0:
        raise SparseLLMError(f"ratio must be in [0, 1), got {ratio}")
    block_layout(model)  # unsupported architectures fail here, before any work
    needs_data = method not in NO_DATA or per_layer
    if needs_data and (calib_ids is None or calib_ids.numel() == 0):
        raise SparseLLMError(f"{method!r}{' per-layer' if per_layer else ''} needs calibration ids")
    if per_layer and method not in WIDTH:
        raise SparseLLMError("per-layer widths apply to width methods only")
    before = block_param_count(model)
    start = time.perf_counter()
    report: dict[str, Any] = {"method": method, "ratio": ratio, "per_layer": per_layer}
    with torch.no_grad():
        if method in LOW_RANK:
            report["ranks"] = low_rank(model, ratio, LOW_RANK[method])
        elif method in SLICING:
            d = model.config.hidden_size
            per_dim = per_dim_params(get_blocks(model)[0], block_layout(model))
            # ratio 0 = the rotation alone (exact); otherwise the shortcuts' d'² counts too
            multiple = width_multiple(model.config)
            keep = width_for_ratio(per_dim, d, ratio, multiple) if ratio > 0 else d
            slice_model(model, calib_ids, 1 - keep / d, batch_size)
            report["hidden_size"] = keep
            report["slicing_fraction"] = 1 - keep / d
        elif method in DEPTH:
            report["dropped_blocks"] = prune_depth(
                model, ratio, calib_ids, DEPTH[method], batch_size
            )
        else:
            n = len(get_blocks(model))
            if per_layer:
                ratios = block_budgets(
                    block_distances(model, calib_ids, batch_size), ratio
                ).tolist()
            else:
                ratios = [ratio] * n
            hd = _head_dim(model.config)
            prune_width(model, method, ratios, calib_ids, batch_size, prune_heads)
            report["uniform"] = write_shapes(model, hd)
            report["block_ratios"] = ratios
    after = block_param_count(model)
    report |= {
        "seconds": time.perf_counter() - start,
        "block_params_before": before,
        "block_params_after": after,
        "measured_ratio": 1 - after / before,
        "layer_shapes": [asdict(s) for s in layer_shapes(model)]
        if method in WIDTH or method in DEPTH
        else [],
    }
    return report
