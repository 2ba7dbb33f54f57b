"""Width pruning: remove whole GQA groups (a KV head + its query heads) and MLP channels.

Three scorers, each giving per block one score per GQA group and one per MLP channel:

* ``taylor`` (LLM-Pruner, Ma et al. 2023): first-order loss change of zeroing a coupled
  structure, |Σ w·∂L/∂w| over every weight the structure owns (q/k/v rows + o columns;
  gate/up rows + down column); gradients of the LM loss on the calibration set.
* ``activation`` (CFSP, Wang et al. 2024, simplified): coarse step gives each block a
  budget from its angular distance (`common.block_budgets`); fine step scores a
  structure by Σ|W_consumer|·‖x‖ over its input columns of o_proj / down_proj.
* ``obs`` (ZipLM, Kurtić et al. 2023, one-shot variant): structured OBS saliency
  tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ) with H = XᵀX of the consumer's inputs, then the consumer's
  remaining columns are re-fit by least squares (the OBS update for a whole set).
  ZipLM removes one structure at a time with H⁻¹ updates; we select once, then update.

``spectral`` (see `spectral.py`) reads no data.
``activation`` and ``obs`` calibrate sequentially (block i+1 sees pruned block i).

The four share one handler and the keys of `WidthConfig`; `per_layer` gives each block
its own budget from its angular distance (CFSP's coarse step; reads calibration data,
even for ``spectral``) instead of one uniform ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sparsellm.calib.hooks import input_hooks
from sparsellm.calib.sequential import run_sequential
from sparsellm.methods.structured.base import StructuredConfig
from sparsellm.methods.structured.common import (
    BlockShape,
    block_budgets,
    block_distances,
    block_shape,
    expand,
    head_dim,
    keep_top,
    per_structure,
    plan_counts,
    prune_heads,
    prune_mlp,
)
from sparsellm.methods.structured.io import write_shapes
from sparsellm.methods.structured.spectral import spectral_scores
from sparsellm.models.adapters import BlockLayout, block_layout, get_blocks
from sparsellm.registry import register

Scores = tuple[torch.Tensor, torch.Tensor]  # (per GQA group, per MLP channel)


@dataclass(frozen=True)
class WidthConfig(StructuredConfig):
    """Keys of every width method: `per_layer` budgets, and `prune_heads` (False removes
    MLP channels only). The method name is the scorer."""

    per_layer: bool = False
    prune_heads: bool = True


@dataclass(frozen=True)
class TaylorConfig(WidthConfig):
    name: ClassVar[str] = "taylor"


@dataclass(frozen=True)
class ActivationConfig(WidthConfig):
    name: ClassVar[str] = "activation"


@dataclass(frozen=True)
class ObsConfig(WidthConfig):
    name: ClassVar[str] = "obs"


@dataclass(frozen=True)
class SpectralConfig(WidthConfig):
    name: ClassVar[str] = "spectral"

    @property
    def needs_data(self) -> bool:
        return self.per_layer  # the scores read weights only; per-layer budgets read data


# ---- pure math -------------------------------------------------------------------------


def taylor_scores(
    wg: dict[str, torch.Tensor], layout: BlockLayout, n_groups: int, n_channels: int
) -> Scores:
    """|Σ w·g| per coupled structure, from `wg` = {module name: weight ⊙ grad (out, in)}."""
    groups = (
        per_structure(wg[layout.q], n_groups, 0)
        + per_structure(wg[layout.k], n_groups, 0)
        + per_structure(wg[layout.v], n_groups, 0)
        + per_structure(wg[layout.o], n_groups, 1)
    )
    channels = wg[layout.gate].sum(1) + wg[layout.up].sum(1) + wg[layout.down].sum(0)
    return groups.abs(), channels.abs()


def activation_scores(w: torch.Tensor, col_sq: torch.Tensor, n: int) -> torch.Tensor:
    """Σ_structure |W_ij|·‖x_j‖ over the consumer's input columns, one score per structure."""
    return per_structure(w.abs() * col_sq.sqrt(), n, 1)


def damped_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """(H + damp·mean(diag H)·I)⁻¹ in fp64, the usual OBS damping."""
    h = h.double()
    lam = damp * h.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.inv(h + lam * torch.eye(h.shape[0], dtype=h.dtype))


def obs_scores(w: torch.Tensor, h_inv: torch.Tensor, n: int) -> torch.Tensor:
    """Structured OBS loss of removing each of `n` equal column blocks of `w` alone.

    ε_S = Σ_rows w_S (H⁻¹_SS)⁻¹ w_Sᵀ: the output error left after the optimal update of
    the other columns (ZipLM eq. 2), batched over structures with one batched inverse.
    """
    width = w.shape[1] // n
    blocks = h_inv.reshape(n, width, n, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    ws = w.double().reshape(w.shape[0], n, width).transpose(0, 1)  # (n, out, width)
    return torch.einsum("nok,nkl,nol->n", ws, torch.linalg.inv(blocks), ws).float()


def ls_update(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """Columns `keep` re-fit so W'X_K best matches WX: W' = W H[:, K] (H_KK + λI)⁻¹.

    This is the OBS weight update for removing all other columns at once.
    """
    h = h.double()
    lam = damp * h.diagonal().mean().clamp_min(1e-12)
    hk = h[keep][:, keep] + lam * torch.eye(keep.numel(), dtype=h.dtype)
    rhs = w.double() @ h[:, keep]
    return torch.linalg.solve(hk, rhs.T).T.to(w.dtype)


# ---- model walking ---------------------------------------------------------------------


def _costs(block: nn.Module, layout: BlockLayout, shape: BlockShape) -> tuple[int, int, int]:
    """(params per GQA group, params per MLP channel, params in the block)."""

    def n(name: str) -> int:
        m = block.get_submodule(name)
        return m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)

    attn = n(layout.q) + n(layout.k) + n(layout.v) + block.get_submodule(layout.o).weight.numel()
    mlp = n(layout.gate) + n(layout.up) + block.get_submodule(layout.down).weight.numel()
    total = sum(p.numel() for p in block.parameters())
    return attn // shape.num_key_value_heads, mlp // shape.intermediate_size, total


def _prune_block(
    block: nn.Module,
    layout: BlockLayout,
    hd: int,
    ratio: float,
    scores: Scores,
    prune_heads_too: bool,
    refit: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    shape = block_shape(block, layout, hd)
    group_cost, channel_cost, total = _costs(block, layout, shape)
    n_g, n_c = plan_counts(
        ratio,
        shape.num_key_value_heads,
        shape.intermediate_size,
        group_cost,
        channel_cost,
        total,
        prune_heads_too,
    )
    keep_g = keep_top(scores[0], shape.num_key_value_heads - n_g)
    keep_c = keep_top(scores[1], shape.intermediate_size - n_c)
    o = refit("o", expand(keep_g, shape.group_size * hd)) if refit and n_g else None
    down = refit("down", keep_c) if refit and n_c else None
    if n_g:
        prune_heads(block, layout, keep_g, shape, hd, o)
    if n_c:
        prune_mlp(block, layout, keep_c, down)


def _gradients(model: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> None:
    """Accumulate ∂(mean LM loss)/∂w into `.grad` of every parameter."""
    model.zero_grad(set_to_none=True)
    batches = calib_ids.split(batch_size)
    with torch.enable_grad():
        for ids in batches:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss / len(batches)
            loss.backward()


def shrink_block(
    block: nn.Module,
    forward: Callable[[], None] | None,
    scorer: str,
    ratio: float,
    layout: BlockLayout,
    hd: int,
    prune_heads_too: bool = True,
    damp: float = 0.01,
) -> None:
    """Remove about `ratio` of one block's parameters with a block-local `scorer`
    (``activation``, ``obs``: statistics of the o/down inputs over `forward()`, which
    runs the block on the calibration batches; ``spectral``: data-free). Streamed runs
    call this block by block (`sparsellm.methods.structured.stream`)."""
    if scorer == "spectral":
        scores = spectral_scores(block, layout, block_shape(block, layout, hd), hd)
        _prune_block(block, layout, hd, ratio, scores, prune_heads_too)
        return
    if scorer not in ("activation", "obs") or forward is None:
        raise ValueError(f"width scorer {scorer!r} is not block-local with data")
    shape = block_shape(block, layout, hd)
    consumers = {"o": block.get_submodule(layout.o), "down": block.get_submodule(layout.down)}
    stats: dict[str, torch.Tensor] = {}

    def collect(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        s = x.T @ x if scorer == "obs" else x.square().sum(0)
        stats[name] = stats[name] + s if name in stats else s

    with input_hooks(consumers, collect):
        forward()
    w_o, w_down = consumers["o"].weight.data, consumers["down"].weight.data
    if scorer == "activation":
        scores = (
            activation_scores(w_o, stats["o"], shape.num_key_value_heads),
            activation_scores(w_down, stats["down"], shape.intermediate_size),
        )
        _prune_block(block, layout, hd, ratio, scores, prune_heads_too)
        return
    scores = (
        obs_scores(w_o, damped_inverse(stats["o"], damp), shape.num_key_value_heads),
        obs_scores(w_down, damped_inverse(stats["down"], damp), shape.intermediate_size),
    )
    # A high OBS error means the structure matters: keep the highest, like the others.
    weights = {"o": w_o, "down": w_down}

    def refit(name: str, keep: torch.Tensor) -> torch.Tensor:
        return ls_update(weights[name], stats[name], keep, damp)

    _prune_block(block, layout, hd, ratio, scores, prune_heads_too, refit)


def prune_width(
    model: nn.Module,
    scorer: str,
    ratios: list[float],
    calib_ids: torch.Tensor | None,
    batch_size: int = 4,
    prune_heads_too: bool = True,
    damp: float = 0.01,
) -> None:
    """Prune every block in place to remove about `ratios[i]` of block i's parameters."""
    layout = block_layout(model)
    hd = head_dim(model.config)
    blocks = get_blocks(model)
    if scorer == "taylor":
        _gradients(model, calib_ids, batch_size)
        for i, block in enumerate(blocks):
            shape = block_shape(block, layout, hd)
            names = (layout.q, layout.k, layout.v, layout.o, layout.gate, layout.up, layout.down)
            wg = {}
            for name in names:
                p = block.get_submodule(name).weight
                wg[name] = (p.data * p.grad).double()
            scores = taylor_scores(wg, layout, shape.num_key_value_heads, shape.intermediate_size)
            _prune_block(block, layout, hd, ratios[i], scores, prune_heads_too)
        model.zero_grad(set_to_none=True)
        return
    if scorer == "spectral":
        for i, block in enumerate(blocks):
            shrink_block(block, None, scorer, ratios[i], layout, hd, prune_heads_too, damp)
        return
    if scorer not in ("activation", "obs"):
        raise ValueError(f"unknown width scorer {scorer!r}")

    def process(i: int, block: nn.Module, forward: Callable[[], None]) -> None:
        shrink_block(block, forward, scorer, ratios[i], layout, hd, prune_heads_too, damp)

    run_sequential(model, list(calib_ids.split(batch_size)), process, desc=f"width/{scorer}")


@register(TaylorConfig)
@register(ActivationConfig)
@register(ObsConfig)
@register(SpectralConfig)
def shrink_width(
    model: nn.Module, config: WidthConfig, calib_ids: torch.Tensor | None, batch_size: int
) -> dict[str, Any]:
    """Width handler: per-block ratios, prune, then make the config describe the widths."""
    n = len(get_blocks(model))
    if config.per_layer:
        distances = block_distances(model, calib_ids, batch_size)
        ratios = block_budgets(distances, config.ratio).tolist()
    else:
        ratios = [config.ratio] * n
    hd = head_dim(model.config)
    prune_width(model, config.name, ratios, calib_ids, batch_size, config.prune_heads)
    return {"uniform": write_shapes(model, hd), "block_ratios": ratios}
