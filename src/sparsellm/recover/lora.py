"""LoRA whose merge keeps a sparse layer sparse.

A plain LoRA delta B·A is dense, so merging it would fill the pruned positions. Here
the adapter's effective weight is W + s·(B·A) ⊙ M with M the layer's keep-mask, both
while training and when merged, so the merged layer equals the trained one exactly and
every pruned weight stays zero. Wrapping is PEFT-style and reversible: the wrapper
keeps `base_layer`; `merge_lora` writes the masked delta into it and puts it back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.models.adapters import block_linears, get_blocks


class MaskedLoRALinear(nn.Module):
    """nn.Linear + masked low-rank delta; the base weight is frozen."""

    def __init__(self, base_layer: nn.Linear, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        out_f, in_f = base_layer.weight.shape
        self.lora_a = nn.Parameter(torch.empty(rank, in_f))
        self.lora_b = nn.Parameter(torch.zeros(out_f, rank))  # zero: starts as the base layer
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.register_buffer("keep", base_layer.weight.detach() != 0, persistent=False)
        base_layer.weight.requires_grad_(False)

    def delta(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scale * self.keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight
        return F.linear(x, w + self.delta().to(w.dtype), self.base_layer.bias)


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    adapter: Callable[[nn.Linear], MaskedLoRALinear] | None = None,
) -> list[MaskedLoRALinear]:
    """Wrap every nn.Linear inside the blocks; freeze everything else. `adapter` builds
    the wrapper from a linear (SoRA's and DSEE's subclasses); by default a plain masked
    LoRA of `rank` and `alpha`."""
    if adapter is None:
        adapter = partial(MaskedLoRALinear, rank=rank, alpha=alpha)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for block in get_blocks(model):
        for rel, module in block_linears(block).items():
            if not isinstance(module, nn.Linear):
                continue  # GPT-2's Conv1D: not supported by this adapter
            parent_name, _, child = rel.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            lora = adapter(module)
            setattr(parent, child, lora)
            wrapped.append(lora)
    return wrapped


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every masked delta into its base layer and unwrap; returns how many."""
    merged = 0
    for block in get_blocks(model):
        for name, module in list(block.named_modules()):
            if isinstance(module, MaskedLoRALinear):
                module.base_layer.weight += module.delta().to(module.base_layer.weight.dtype)
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, module.base_layer)
                merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged
