"""Frozen sparsity masks during fine-tuning: pruned weights stay exactly zero.

Two mechanisms, both needed for a guarantee: a gradient hook zeroes the gradient of
every pruned weight (so Adam's moments for them stay zero and weight decay has
nothing to decay), and `reapply` writes the zeros back after each optimiser step
(defence against any optimiser that moves a weight without a gradient).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsellm.models.adapters import block_linears, blocks_prefix, get_blocks


def pruned_weights(model: nn.Module) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """{block linear's name: (its weight, keep mask)} for every block linear holding zeros.

    Only block linears: embeddings and the head may hold exact zeros of their own, which
    are not pruning and which recovery is free to train.
    """
    prefix = blocks_prefix(model)
    out = {}
    for i, block in enumerate(get_blocks(model)):
        for rel, module in block_linears(block).items():
            w = module.weight
            if (w == 0).any():
                out[f"{prefix}.{i}.{rel}"] = (w, w.detach() != 0)
    return out


class FrozenMasks:
    """Masks (True = keep) of every block linear that has zeros, enforced while held."""

    def __init__(self, model: nn.Module) -> None:
        self.params = pruned_weights(model)
        self._handles = [
            w.register_hook(lambda g, keep=keep: g * keep)
            for w, keep in self.params.values()
            if w.requires_grad  # frozen (e.g. under LoRA): nothing to guard
        ]

    @torch.no_grad()
    def reapply(self) -> None:
        for w, keep in self.params.values():
            w.mul_(keep)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FrozenMasks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
