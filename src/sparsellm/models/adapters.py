"""The one table of architecture knowledge.

Everything that walks a model asks this module where the transformer blocks are and
which leaf modules are "linear projections"; no other file knows `model.model.layers`.
Adding an architecture is one row in `ADAPTERS` plus a tiny builder in `tiny.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsellm.errors import SparseLLMError


@dataclass(frozen=True)
class BlockLayout:
    """Submodule names inside one pre-norm block, for structured pruning (relative to a block).

    Structured methods remove whole heads, channels or blocks, so they must know which
    projections are coupled: q/k/v produce what o consumes, gate/up produce what down
    consumes, and which norm feeds which branch (SliceGPT folds it into the next linears).
    """

    attn: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    mlp: str = "mlp"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    final_norm: str = "model.norm"  # from the top model
    embed: str = "model.embed_tokens"  # from the top model
    gate_act: str = "mlp.act_fn"  # the SwiGLU gate activation (CATS, CoreInfer)
    rotary: str = "model.rotary_emb"  # from the top model (the decode runtime's RoPE)
    qk_norm: bool = False  # Qwen3-style norms on q/k: the decode runtime does not model them

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Projections that read the same input: activation sparsity skips the same input
        channels in all of them (one threshold), and the decode runtime fuses them."""
        return ((self.q, self.k, self.v), (self.o,), (self.gate, self.up), (self.down,))


@dataclass(frozen=True)
class Adapter:
    """Where things live in one family of HF causal LMs."""

    blocks: str  # dotted path from the top model to the nn.ModuleList of blocks
    layout: BlockLayout | None = None  # None: structured pruning does not support the family


_LLAMA_LIKE = BlockLayout()

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(blocks="model.layers", layout=_LLAMA_LIKE),
    "mistral": Adapter(blocks="model.layers", layout=_LLAMA_LIKE),
    "qwen2": Adapter(blocks="model.layers", layout=_LLAMA_LIKE),
    "qwen3": Adapter(blocks="model.layers", layout=BlockLayout(qk_norm=True)),
    "gemma3_text": Adapter(blocks="model.layers"),
    "gpt2": Adapter(blocks="transformer.h"),  # projections are Conv1D, see weight_matrix
}


def _row(table: dict[str, Any], model: nn.Module, what: str) -> Any:
    """The row of `table` for the model's `config.model_type`, or an error naming the rows."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in table:
        raise SparseLLMError(f"{what} {model_type!r}; supported: {', '.join(sorted(table))}")
    return table[model_type]


def get_adapter(model: nn.Module) -> Adapter:
    """Adapter for `model`, or a clear error listing what is supported."""
    return _row(ADAPTERS, model, "unsupported architecture")


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks."""
    return model.get_submodule(get_adapter(model).blocks)


def block_layout(model: nn.Module) -> BlockLayout:
    """Coupled submodule names of a block, or a clear error for families without one."""
    adapter = get_adapter(model)
    if adapter.layout is None:
        supported = sorted(k for k, a in ADAPTERS.items() if a.layout is not None)
        raise SparseLLMError(
            f"structured pruning does not support {model.config.model_type!r} yet; "
            f"supported: {', '.join(supported)}"
        )
    return adapter.layout


def blocks_prefix(model: nn.Module) -> str:
    """Dotted prefix of block names, e.g. ``model.layers``."""
    return get_adapter(model).blocks


def is_linear(module: nn.Module) -> bool:
    """True for the leaf projections we know how to sparsify."""
    return isinstance(module, (nn.Linear, Conv1D))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear projections inside one block, by name relative to the block."""
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), a view into the parameter.

    GPT-2's Conv1D stores (in, out); we hide that here so that every score, mask and
    update is written once for the (out, in) convention of nn.Linear.
    """
    w = module.weight.data
    return w.t() if isinstance(module, Conv1D) else w


def context_window(model: nn.Module) -> int | None:
    """The model's maximum sequence length from its config (None when it names none)."""
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def sliding_layers(config: Any) -> list[bool]:
    """Per layer, True where `config` declares a sliding-window layer in `layer_types`
    (Gemma-3's local layers); empty when it declares no layer types."""
    types = getattr(config, "layer_types", None) or []
    return [t == "sliding_attention" for t in types]


def full_attention_layers(model: nn.Module) -> list[int]:
    """Indices of the blocks whose attention sees the whole context: every block but the
    sliding-window ones (which keep their own window under any attention method)."""
    sliding = sliding_layers(model.config)
    n = len(get_blocks(model))
    return [i for i in range(n) if i >= len(sliding) or not sliding[i]]


def grad_matrix(module: nn.Module) -> torch.Tensor | None:
    """The weight's gradient in the same (out_features, in_features) layout."""
    g = module.weight.grad
    if g is None:
        return None
    return g.t() if isinstance(module, Conv1D) else g


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write an (out, in) matrix back into the module's parameter, keeping its dtype."""
    weight_matrix(module).copy_(w.to(module.weight.dtype))


def get_layout(model: nn.Module) -> BlockLayout:
    """Block layout for activation sparsity and its decode runtime (plain llama-style
    blocks: no q/k norms), or a clear error for other families."""
    layout = get_adapter(model).layout
    if layout is None or layout.qk_norm:
        supported = sorted(
            k for k, a in ADAPTERS.items() if a.layout is not None and not a.layout.qk_norm
        )
        raise SparseLLMError(
            f"activation sparsity does not support {model.config.model_type!r}; "
            f"supported: {', '.join(supported)}"
        )
    return layout
