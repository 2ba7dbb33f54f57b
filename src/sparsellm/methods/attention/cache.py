"""The compressible KV cache every KV-cache method works on, and their shared selection math.

`CompressedCache` is a `transformers` Cache of `CompressedLayer`s whose stored tokens (and
key channels) a method prunes in place; ``shared`` holds cross-layer state (TidalDecode's
selection, SpecKV's draft scores, Double Sparsity's label caches). The cache knows no
method: the integration calls the method's hooks (`sparsellm.methods.attention.protocols.KVConfig`)
around each attention call.

The layer keeps positions right: ``get_seq_length`` is the number of tokens *seen* (RoPE
positions of new tokens), while masks are sized by what is actually stored.

Models with sliding-window layers (Gemma-3: 5 of every 6 layers see only the last 512
tokens) keep transformers' own window-bounded layer there, exactly as the model's default
cache does; only the full-attention layers, whose cache grows with the context, compress.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from sparsellm.models.adapters import sliding_layers


class CompressedLayer(DynamicLayer):
    """A DynamicLayer whose stored tokens (and key channels) can be pruned in place."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.heavy: torch.Tensor | None = None  # H2O accumulated attention (B, Hkv, T)
        self.channels: torch.Tensor | None = None  # ThinK kept key channels (B, Hkv, c)
        self.page_min: torch.Tensor | None = None  # Quest per-page key bounds (B, Hkv, P, D)
        self.page_max: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels is not None:
            key_states = key_states.gather(-1, self._chan_index(key_states.shape[2]))
        self.seen += key_states.shape[2]
        return super().update(key_states, value_states)

    def _chan_index(self, tokens: int) -> torch.Tensor:
        b, h, c = self.channels.shape
        return self.channels[:, :, None, :].expand(b, h, tokens, c)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[2]
        return stored + query_length, 0

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only tokens `idx` (B, Hkv, n) per head (sorted, so order is preserved)."""
        self.keys = self.keys.gather(2, idx[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(
            2, idx[..., None].expand(-1, -1, -1, self.values.shape[-1])
        )
        if self.heavy is not None:
            self.heavy = self.heavy.gather(2, idx)

    def prune_channels(self, channels: torch.Tensor) -> None:
        """Keep key channels `channels` (B, Hkv, c); later keys are pruned on arrival."""
        self.channels = channels.sort(-1).values
        self.keys = self.keys.gather(-1, self._chan_index(self.keys.shape[2]))


class CompressedCache(Cache):
    """Cache of `CompressedLayer`s (transformers' window layers where the model's `config`
    declares sliding-window layers); `shared` holds the methods' cross-layer state."""

    def __init__(self, config: Any = None) -> None:
        kinds = sliding_layers(config)
        if any(kinds):
            window = config.sliding_window
            layers = [
                DynamicSlidingWindowLayer(sliding_window=window) if k else CompressedLayer()
                for k in kinds
            ]
            super().__init__(layers=layers)
        else:
            super().__init__(layer_class_to_replicate=CompressedLayer)
        self.sliding = kinds  # per layer: keeps transformers' window (empty: none does)
        self.shared: dict[Any, Any] = {}


def softmax_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal_from: int
) -> torch.Tensor:
    """Attention probabilities (B, Hkv, rows, T) of queries at positions ``causal_from …``,
    summed over each GQA group (queries ``(B, Hq, rows, D)``, keys ``(B, Hkv, T, D)``)."""
    b, hq, rows, _ = q.shape
    hkv = k.shape[1]
    s = torch.matmul(q.reshape(b, hkv, hq // hkv * rows, -1), k.transpose(-1, -2)) * scale
    s = s.reshape(b, hkv, hq // hkv, rows, -1)
    q_pos = torch.arange(causal_from, causal_from + rows)[:, None]
    s = s.masked_fill(torch.arange(k.shape[2])[None, :] > q_pos, float("-inf"))
    return torch.softmax(s, -1).sum(2)


def keep_tokens(
    scores: torch.Tensor, length: int, n_top: int, sink: int, tail: int
) -> torch.Tensor:
    """Sorted indices (B, Hkv, n) to keep: `sink` first, `tail` last, `n_top` best between."""
    mid = scores[..., sink : length - tail]
    n_top = max(0, min(n_top, mid.shape[-1]))
    top = mid.topk(n_top, -1).indices + sink
    fixed = torch.cat([torch.arange(sink), torch.arange(length - tail, length)])
    idx = torch.cat([fixed.expand(*scores.shape[:-1], -1), top], -1)
    return idx.sort(-1).values
