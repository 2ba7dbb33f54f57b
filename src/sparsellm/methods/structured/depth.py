"""Depth pruning: drop whole blocks (Minitron best practices; Gromov et al. / ShortGPT scores).

Score each block by the angular distance between its input and output on calibration
data (a block that barely turns the residual stream is cheap to drop), or by the rise in
calibration loss when that block alone is skipped (``ppl``, Minitron's perplexity
criterion; one forward per block). The `n` lowest-scoring blocks are removed, the rest
renumbered (`layer_idx` is the KV-cache slot) and the config shrunk, so the result is a
plain HF model with fewer layers.

``depth`` scores by angular distance, ``depth-ppl`` by loss rise: two configs with the
one key `ratio` (of the blocks, which are equal in size), one handler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sparsellm.methods.structured.base import StructuredConfig
from sparsellm.methods.structured.common import block_distances
from sparsellm.models.adapters import block_layout, get_adapter, get_blocks
from sparsellm.registry import register


@dataclass(frozen=True)
class DepthConfig(StructuredConfig):
    """Drop round(ratio·blocks) blocks, the ones whose output turns their input least."""

    name: ClassVar[str] = "depth"
    score: ClassVar[str] = "angular"


@dataclass(frozen=True)
class DepthPPLConfig(DepthConfig):
    """Drop the blocks whose removal alone raises the calibration loss least."""

    name: ClassVar[str] = "depth-ppl"
    score: ClassVar[str] = "ppl"


class _Skip(nn.Module):
    """Stands in for a block while measuring the loss without it: returns its input."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.attention_type = getattr(block, "attention_type", None)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def _loss(model: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> float:
    batches = calib_ids.split(batch_size)
    return sum(model(input_ids=b, labels=b, use_cache=False).loss.item() for b in batches) / len(
        batches
    )


@torch.no_grad()
def loss_deltas(model: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Calibration loss with block i skipped minus the full model's loss, per block."""
    blocks = get_blocks(model)
    base = _loss(model, calib_ids, batch_size)
    deltas = []
    for i, block in enumerate(list(blocks)):
        blocks[i] = _Skip(block)
        try:
            deltas.append(_loss(model, calib_ids, batch_size) - base)
        finally:
            blocks[i] = block
    return torch.tensor(deltas)


def blocks_to_drop(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the round(ratio·n) least important blocks (at least one block is kept)."""
    n = min(round(ratio * scores.numel()), scores.numel() - 1)
    return scores.topk(n, largest=False).indices.sort().values


def drop_blocks(model: nn.Module, drop: torch.Tensor) -> None:
    """Remove blocks `drop` in place, renumber `layer_idx`, shrink the config."""
    layout = block_layout(model)
    blocks = get_blocks(model)
    gone = set(drop.tolist())
    kept = [b for i, b in enumerate(blocks) if i not in gone]
    cfg = model.config
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in gone]
    shapes = getattr(cfg, "sparsellm_layer_shapes", None)
    if shapes is not None:
        cfg.sparsellm_layer_shapes = [s for i, s in enumerate(shapes) if i not in gone]
    parent, _, leaf = get_adapter(model).blocks.rpartition(".")
    setattr(model.get_submodule(parent), leaf, nn.ModuleList(kept))
    for i, block in enumerate(kept):
        block.get_submodule(layout.attn).layer_idx = i
        if hasattr(block, "layer_idx"):
            block.layer_idx = i
    cfg.num_hidden_layers = len(kept)


@torch.no_grad()
def choose_blocks(
    model: nn.Module, ratio: float, calib_ids: torch.Tensor, score: str, batch_size: int = 4
) -> torch.Tensor:
    """The about `ratio` of the blocks that `score` ("angular" or "ppl") ranks least
    important, sorted; the model is left as it is (a layer-skipping draft uses this too)."""
    block_layout(model)  # fail early on unsupported families
    if score == "angular":
        scores = block_distances(model, calib_ids, batch_size)
    elif score == "ppl":
        scores = loss_deltas(model, calib_ids, batch_size)
    else:
        raise ValueError(f"unknown depth score {score!r}")
    return blocks_to_drop(scores, ratio)


def prune_depth(
    model: nn.Module, ratio: float, calib_ids: torch.Tensor, score: str, batch_size: int = 4
) -> list[int]:
    """Drop about `ratio` of the blocks by `score` ("angular" or "ppl"); returns their indices."""
    drop = choose_blocks(model, ratio, calib_ids, score, batch_size)
    drop_blocks(model, drop)
    return drop.tolist()


@register(DepthConfig)
@register(DepthPPLConfig)
def shrink_depth(
    model: nn.Module, config: DepthConfig, calib_ids: torch.Tensor | None, batch_size: int
) -> dict[str, Any]:
    """Depth handler: the indices of the dropped blocks (in the dense numbering)."""
    return {"dropped_blocks": prune_depth(model, config.ratio, calib_ids, config.score, batch_size)}
