"""Shared pieces of structured pruning: index maths, budgets, module surgery, shapes.

The pure functions (`expand`, `per_structure`, `plan_counts`, `block_budgets`,
`keep_top`) are tested by hand on tiny tensors; the surgery functions replace a block's
projections by smaller `nn.Linear`s (weights edited, never forwards patched), so a pruned
model stays a plain HF model that `save_pretrained` writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sparsellm.models.adapters import BlockLayout, block_layout, get_blocks


@dataclass(frozen=True)
class BlockShape:
    """Width of one llama-like block: query heads, KV heads and MLP channels."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def head_dim(config) -> int:
    """Head width; HF derives it from hidden/heads when absent, which head pruning breaks."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def block_shape(block: nn.Module, layout: BlockLayout, hd: int) -> BlockShape:
    """Read a block's current widths from its weight shapes (the truth, not the config)."""
    q = block.get_submodule(layout.q).weight.shape[0] // hd
    kv = block.get_submodule(layout.k).weight.shape[0] // hd
    return BlockShape(q, kv, block.get_submodule(layout.up).weight.shape[0])


def layer_shapes(model: nn.Module) -> list[BlockShape]:
    """Current widths of every block, read from the weights."""
    layout, hd = block_layout(model), head_dim(model.config)
    return [block_shape(b, layout, hd) for b in get_blocks(model)]


def block_param_count(model: nn.Module) -> int:
    """Parameters inside the transformer blocks (what `ratio` is a fraction of)."""
    return sum(p.numel() for p in get_blocks(model).parameters())


def expand(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of rows/cols of whole structures: structure s covers [s*width, (s+1)*width)."""
    return (keep[:, None] * width + torch.arange(width)).flatten()


def per_structure(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Sum of `t` over each of `n` equal contiguous slices along `dim` -> shape (n,)."""
    t = t.movedim(dim, 0)
    return t.reshape(n, -1).sum(1)


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the `n_keep` highest scores, in ascending index order (keeps layout)."""
    return scores.topk(n_keep).indices.sort().values


def plan_counts(
    ratio: float,
    n_groups: int,
    n_channels: int,
    group_cost: int,
    channel_cost: int,
    total: int,
    prune_heads: bool = True,
) -> tuple[int, int]:
    """(GQA groups, MLP channels) to remove so that about `ratio` of `total` params go.

    Heads are coarse (SmolLM2 has 3 KV groups per block), so we remove round(ratio·groups)
    of them (never the last) and let the fine-grained MLP channels absorb the remainder.
    """
    target = ratio * total
    g = min(round(ratio * n_groups), n_groups - 1) if prune_heads else 0
    while g > 0 and g * group_cost > target:
        g -= 1
    c = round((target - g * group_cost) / channel_cost)
    return g, max(0, min(c, n_channels - 1))


def block_budgets(distance: torch.Tensor, ratio: float, spread: float = 0.5) -> torch.Tensor:
    """Per-block removal ratios from block importance, mean exactly `ratio` (CFSP coarse step).

    Blocks that change the residual stream least (small angular distance) lose more:
    r_i = ratio·(1 − spread·z_i), z_i the centred distance scaled into [−1, 1]. Linear in z,
    so the mean stays `ratio` and every r_i lies in [ratio·(1−spread), ratio·(1+spread)].
    """
    z = distance.double() - distance.double().mean()
    scale = z.abs().max()
    z = z / scale if scale > 0 else z
    return (ratio * (1 - spread * z)).float()


def slice_linear(lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    """A new Linear keeping output `rows` and input `cols` (None keeps all)."""
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    bias = lin.bias is not None
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if bias:
        b = lin.bias.data
        new.bias.data.copy_(b.index_select(0, rows) if rows is not None else b)
    return new


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def prune_mlp(
    block: nn.Module, layout: BlockLayout, keep: torch.Tensor, down: torch.Tensor | None = None
) -> None:
    """Keep MLP channels `keep`; `down` optionally replaces the sliced down weight (OBS)."""
    for name in (layout.gate, layout.up):
        set_module(block, name, slice_linear(block.get_submodule(name), keep, None))
    new_down = slice_linear(block.get_submodule(layout.down), None, keep)
    if down is not None:
        new_down.weight.data.copy_(down)
    set_module(block, layout.down, new_down)
    mlp = block.get_submodule(layout.mlp)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep.numel()


def prune_heads(
    block: nn.Module,
    layout: BlockLayout,
    keep_groups: torch.Tensor,
    shape: BlockShape,
    hd: int,
    o: torch.Tensor | None = None,
) -> None:
    """Keep whole GQA groups: KV head g and the query heads g·G … (g+1)·G−1 it serves.

    HF's `repeat_kv` repeats each KV head for consecutive query heads, so removing a
    group this way leaves `num_key_value_groups` and every remaining pairing unchanged.
    """
    q_idx = expand(keep_groups, shape.group_size * hd)
    kv_idx = expand(keep_groups, hd)
    set_module(block, layout.q, slice_linear(block.get_submodule(layout.q), q_idx, None))
    for name in (layout.k, layout.v):
        set_module(block, name, slice_linear(block.get_submodule(name), kv_idx, None))
    new_o = slice_linear(block.get_submodule(layout.o), None, q_idx)
    if o is not None:
        new_o.weight.data.copy_(o)
    set_module(block, layout.o, new_o)


def resize_block(block: nn.Module, layout: BlockLayout, shape: BlockShape, hd: int) -> None:
    """Give a freshly built block the widths `shape` (uninitialised weights, for loading)."""
    first = torch.arange(shape.num_key_value_heads)
    prune_heads(block, layout, first, block_shape(block, layout, hd), hd)
    prune_mlp(block, layout, torch.arange(shape.intermediate_size))


@contextmanager
def block_io_hooks(model: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Record (input, output) hidden states of every block during forwards in the context.

    Yields a per-block list that receives [input, output] pairs, one per forward.
    """
    blocks = get_blocks(model)
    records: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = []

    def hook(i: int):
        def fn(_m: nn.Module, args: tuple, kwargs: dict, out) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            records[i].append((x.detach(), y.detach()))

        return fn

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_hook(hook(i), with_kwargs=True))
        yield records
    finally:
        for h in handles:
            h.remove()


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of arccos(cos(x, y))/π: 0 = block leaves the stream's direction alone."""
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
    return (cos.clamp(-1, 1).arccos() / torch.pi).mean()


@torch.no_grad()
def block_distances(model: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Angular distance between each block's input and output over the calibration set."""
    n = len(get_blocks(model))
    totals = torch.zeros(n, dtype=torch.float64)
    batches = calib_ids.split(batch_size)
    for ids in batches:
        with block_io_hooks(model) as records:
            model(input_ids=ids, use_cache=False)
        for i, rec in enumerate(records):
            totals[i] += angular_distance(*rec[0])
    return totals / len(batches)
