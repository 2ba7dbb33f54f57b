"""TidalDecode: position-persistent sparse attention for decoding.

Token positions that matter to one layer mostly matter to the next ones too, so only a
few *selection layers* pay for full attention and choose the `budget` positions with the
highest attention weight (summed over every head, one set shared by all heads); each
following layer attends only those positions, until the next selection layer (the
"re-selection" layer, mid-network) refreshes the set. The first `dense` layers keep full
attention, as in the paper, and layer `dense` is the first selection layer. Nothing is
evicted: the cache keeps every token; each decode step reads ``budget`` of them in most
layers. Prefill is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SELECTION = "tidal_selection"  # key in CompressedCache.shared: (B, budget) positions


@dataclass(frozen=True)
class TidalDecode:
    """Full attention in layers ``< dense`` and in the selection layers ``dense`` and
    `reselect`; the other layers attend the latest selection's `budget` positions."""

    budget: int = 2048
    dense: int = 2
    reselect: int = 13

    def full_layer(self, layer_idx: int) -> bool:
        return layer_idx <= self.dense or layer_idx == self.reselect

    def decode_tokens(self, cache: Any, layer_idx: int, query: torch.Tensor) -> torch.Tensor | None:
        """The shared selection expanded to every KV head, or None (full attention)."""
        chosen = cache.shared.get(SELECTION)
        if self.full_layer(layer_idx) or chosen is None:
            return None
        hkv = cache.layers[layer_idx].keys.shape[1]
        return chosen[:, None, :].expand(-1, hkv, -1)

    def observe(self, cache: Any, layer_idx: int, probs: torch.Tensor) -> None:
        """In a selection layer, replace the shared selection with this step's top tokens."""
        if layer_idx < self.dense or not self.full_layer(layer_idx):
            return
        if probs.shape[-1] <= self.budget:
            cache.shared.pop(SELECTION, None)  # everything fits: full attention everywhere
            return
        cache.shared[SELECTION] = select_positions(probs, self.budget)


def select_positions(probs: torch.Tensor, budget: int) -> torch.Tensor:
    """Sorted ``(B, budget)`` positions with the most attention summed over heads;
    `probs` is ``(B, H, T)``."""
    return probs.sum(1).topk(budget, -1).indices.sort(-1).values
