"""Configs that describe pruned widths, and loading models whose blocks differ in width.

Uniform widths are written into the ordinary config fields (`num_attention_heads`,
`num_key_value_heads`, `intermediate_size`, explicit `head_dim`), so vanilla
`AutoModelForCausalLM.from_pretrained` loads the result. Per-layer widths cannot be
expressed in an HF llama/qwen config: we store them as `config.sparsellm_layer_shapes`
(one dict per block) with the widest values in the ordinary fields. **Vanilla
transformers cannot load such a directory** (it builds every block at the ordinary
widths and refuses the smaller tensors); `sparsellm.load` / `structured.load` rebuild
each block at its own widths and then read the safetensors (never a pickle).
SliceGPT models (`config.sparsellm_slicing`) are plain at width d' except for two
shortcut matrices per block (and, unless the head was sliced, a final norm and head at
the dense width): vanilla transformers would drop the shortcuts (and warn), so they too
load only with `sparsellm.load`; so do low-rank models (`config.sparsellm_low_rank`:
rank per factorised projection).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from sparsellm.errors import SparseLLMError
from sparsellm.methods.structured.common import (
    BlockShape,
    head_dim,
    layer_shapes,
    resize_block,
    set_module,
)
from sparsellm.methods.structured.lowrank import RANKS_KEY, rebuild
from sparsellm.methods.structured.slicing import SlicedBlock, resize_norm
from sparsellm.models.adapters import BlockLayout, block_layout, blocks_prefix, get_blocks
from sparsellm.models.load import LoadedModel
from sparsellm.models.shards import skeleton

SHAPES_KEY = "sparsellm_layer_shapes"
SLICING_KEY = "sparsellm_slicing"


def write_shapes(model: nn.Module, hd: int) -> bool:
    """Make the config describe the weights; returns True when widths are uniform."""
    return describe_shapes(model.config, layer_shapes(model), hd)


def describe_shapes(cfg: PretrainedConfig, shapes: list[BlockShape], hd: int) -> bool:
    """Make `cfg` describe blocks of widths `shapes`; returns True when they are uniform."""
    cfg.head_dim = hd  # HF would derive hidden/heads, wrong once heads are removed
    for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        setattr(cfg, field, max(getattr(s, field) for s in shapes))
    uniform = all(s == shapes[0] for s in shapes)
    if uniform:
        if hasattr(cfg, SHAPES_KEY):
            delattr(cfg, SHAPES_KEY)
    else:
        setattr(cfg, SHAPES_KEY, [asdict(s) for s in shapes])
    return uniform


def has_layer_shapes(path: str | os.PathLike) -> bool:
    """True for a directory that only `load` can rebuild (per-layer widths or SliceGPT)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    config = json.loads(file.read_text(encoding="utf-8"))
    return SHAPES_KEY in config or SLICING_KEY in config or RANKS_KEY in config


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SparseLLMError(f"{path} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def _empty_sliced_block(
    block: nn.Module, layout: BlockLayout, state: dict[str, torch.Tensor], prefix: str
) -> SlicedBlock:
    """A `SlicedBlock` with the saved shortcut shapes; the last block's shortcut and
    down_proj may write the dense width d (head not sliced)."""
    names = ("attn_shortcut", "mlp_shortcut")
    missing = [f"{prefix}.{n}" for n in names if f"{prefix}.{n}" not in state]
    if missing:
        raise SparseLLMError(f"weights missing for {missing}")
    attn, mlp = (torch.empty_like(state[f"{prefix}.{n}"]) for n in names)
    down = block.get_submodule(layout.down)
    if down.out_features != mlp.shape[1]:
        set_module(block, layout.down, nn.Linear(down.in_features, mlp.shape[1], bias=False))
    return SlicedBlock(block, layout, attn, mlp)


def _resize_head(model: nn.Module, layout: BlockLayout, slicing: dict, dtype: torch.dtype) -> None:
    """Final norm and head at the width the last block writes (dense d unless sliced)."""
    width = slicing.get("head_width", slicing["hidden_size"])
    resize_norm(model.get_submodule(layout.final_norm), width, slicing["dense_hidden_size"])
    head = model.get_output_embeddings()
    model.set_output_embeddings(
        nn.Linear(width, head.out_features, bias=head.bias is not None, dtype=dtype)
    )


def width_skeleton(path: str | os.PathLike) -> nn.Module:
    """`shards.skeleton` of a directory whose blocks may differ in width (per-layer
    shapes): every block at its own widths, parameters on `meta`, for streamed reads."""
    config = AutoConfig.from_pretrained(path)
    if getattr(config, SLICING_KEY, None) is not None or getattr(config, RANKS_KEY, None):
        raise SparseLLMError(f"{path}: sliced and low-rank models are not read block by block")
    model = skeleton(path)
    shapes = getattr(config, SHAPES_KEY, None)
    if shapes is not None:
        layout, hd = block_layout(model), head_dim(config)
        for block, shape in zip(get_blocks(model), shapes, strict=True):
            resize_block(block, layout, BlockShape(**shape), hd)
    return model


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a directory with per-layer widths (plain HF directories load as usual)."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    shapes = getattr(config, SHAPES_KEY, None)
    slicing = getattr(config, SLICING_KEY, None)
    ranks = getattr(config, RANKS_KEY, None)
    if shapes is None and slicing is None and ranks is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        layout, hd = block_layout(model), head_dim(config)
        blocks = get_blocks(model)
        if shapes is not None and len(shapes) != len(blocks):
            raise SparseLLMError(f"{path}: {len(shapes)} layer shapes for {len(blocks)} blocks")
        state = _state_dict(path)
        for i, block in enumerate(list(blocks)):
            if shapes is not None:
                resize_block(block, layout, BlockShape(**shapes[i]), hd)
            if slicing is not None:
                blocks[i] = _empty_sliced_block(block, layout, state, f"{blocks_prefix(model)}.{i}")
        if slicing is not None:
            _resize_head(model, layout, slicing, dtype)
        if ranks is not None:
            rebuild(model, ranks)
        tied = {n for n, p in model.state_dict().items() if n not in state}
        loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in state}
        untied = [
            n
            for n, p in model.named_parameters(remove_duplicate=False)
            if n in tied and id(p) not in loaded
        ]
        if untied:
            raise SparseLLMError(f"{path}: weights missing for {untied[:3]}")
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise SparseLLMError(f"{path}: weights do not match the layer shapes: {exc}") from None
        unexpected = set(state) - set(model.state_dict())
        if unexpected:
            raise SparseLLMError(f"{path}: unexpected weights {sorted(unexpected)[:3]}")
    tok_files = ("tokenizer.json", "tokenizer_config.json")
    tokenizer = (
        AutoTokenizer.from_pretrained(path)
        if any((path / f).is_file() for f in tok_files)
        else None
    )
    info = {"source": str(path), "kind": "dir", "path": str(path), "layer_shapes": shapes}
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, info=info)
