"""TidalDecode: position-persistent sparse attention for decoding.

Token positions that matter to one layer mostly matter to the next ones too, so only a
few *selection layers* pay for full attention and choose the `budget` positions with the
highest attention weight (summed over every head, one set shared by all heads); each
following layer attends only those positions, until the next selection layer (the
"re-selection" layer, mid-network) refreshes the set. The first `dense` layers keep full
attention, as in the paper, and layer `dense` is the first selection layer. Nothing is
evicted: the cache keeps every token; each decode step reads ``budget`` of them in most
layers. Prefill is exact.

On a model with sliding-window layers (Gemma-3) only the full-attention layers take part:
a selection layer is the first full-attention layer at or after `dense` (resp.
`reselect`), and the sliding layers keep their own window untouched.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.methods.attention.cache import CompressedCache
from sparsellm.methods.attention.protocols import KVConfig, attention_method

SELECTION = "tidal_selection"  # key in CompressedCache.shared: (B, budget) positions


@attention_method
@dataclass(frozen=True)
class TidalDecode(KVConfig):
    """Full attention in layers ``< dense`` and in the selection layers ``dense`` and
    `reselect`; the other layers attend the latest selection's `budget` positions."""

    name: ClassVar[str] = "tidal"

    budget: int = 2048
    dense: int = 2
    reselect: int = 13

    def selection_layers(self, sliding: Sequence[bool]) -> tuple[int, int]:
        """The two selection layers: the first full-attention layers (``sliding[i]`` False,
        or past the list) at or after `dense` and `reselect`."""

        def first(at: int) -> int:
            return next(i for i in itertools.count(at) if i >= len(sliding) or not sliding[i])

        return first(self.dense), first(self.reselect)

    def full_layer(self, layer_idx: int, sliding: Sequence[bool] = ()) -> bool:
        return layer_idx < self.dense or layer_idx in self.selection_layers(sliding)

    def select(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor
    ) -> torch.Tensor | None:
        """The shared selection expanded to every KV head, or None (full attention)."""
        chosen = cache.shared.get(SELECTION)
        if chosen is None or self.full_layer(layer_idx, cache.sliding):
            return None
        hkv = cache.layers[layer_idx].keys.shape[1]
        return chosen[:, None, :].expand(-1, hkv, -1)

    def after_step(self, cache: CompressedCache, layer_idx: int, probs: torch.Tensor) -> None:
        """In a selection layer, replace the shared selection with this step's top tokens."""
        if layer_idx not in self.selection_layers(cache.sliding):
            return
        if probs.shape[-1] <= self.budget:
            cache.shared.pop(SELECTION, None)  # everything fits: full attention everywhere
            return
        cache.shared[SELECTION] = select_positions(probs, self.budget)


def select_positions(probs: torch.Tensor, budget: int) -> torch.Tensor:
    """Sorted ``(B, budget)`` positions with the most attention summed over heads;
    `probs` is ``(B, H, T)``."""
    return probs.sum(1).topk(budget, -1).indices.sort(-1).values
