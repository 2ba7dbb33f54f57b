"""Double Sparsity: decode-time token selection from a few offline-calibrated channels.

Attention logits ``q·k`` are dominated by a few channels per head, and which ones is a
stable property of the model, so they can be found once offline. On calibration text we
score channel ``c`` of each KV head by ``‖q_c‖₁ · ‖k_c‖₁`` (the summed magnitude of its
contributions ``|q_ic k_jc|`` over every query/key pair; queries summed over the GQA
group) and keep the top `channels`. While decoding, a *label cache* holds only those key
channels; the approximate logits ``q_C · k_C`` rank every cached token, the `budget` best
per KV head are chosen, and exact attention runs over them. Nothing is evicted; prefill
is exact. The offline channel search is the method's `Calibration` (`ChannelSearch`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.attention.cache import CompressedCache
from sparsellm.methods.attention.protocols import KVConfig, attention_method
from sparsellm.models.adapters import full_attention_layers, get_blocks


@attention_method
@dataclass(frozen=True)
class DoubleSparsity(KVConfig):
    """Top-`budget` tokens per KV head by logits over `channels` calibrated channels
    (`label[layer][kv_head]`, filled by calibration: `ChannelSearch`)."""

    name: ClassVar[str] = "double_sparsity"

    budget: int = 2048
    channels: int = 16
    label: tuple[tuple[tuple[int, ...], ...], ...] = ()

    def select(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor
    ) -> torch.Tensor | None:
        keys = cache.layers[layer_idx].keys
        b, hkv, length, d = keys.shape
        if length <= self.budget:
            return None
        chan = torch.tensor(self.label[layer_idx])  # (Hkv, c)
        labels = _label_cache(cache, layer_idx, keys, chan)
        g = query.shape[1] // hkv
        q = query.reshape(b, hkv, g, d).gather(-1, chan[None, :, None, :].expand(b, -1, g, -1))
        return approx_top_tokens(q, labels, self.budget, d**-0.5)

    def needs_calibration(self) -> bool:
        return not self.label

    def calibration(self, tokens: int) -> ChannelSearch:
        return ChannelSearch(self)


def approx_top_tokens(
    q: torch.Tensor, labels: torch.Tensor, budget: int, scale: float
) -> torch.Tensor:
    """Sorted ``(B, Hkv, budget)`` token ids with the highest approximate attention:
    softmax of the partial logits per query head, summed over the GQA group. `q` is
    ``(B, Hkv, g, c)``, `labels` ``(B, Hkv, T, c)``."""
    approx = torch.softmax(torch.matmul(q, labels.transpose(-1, -2)) * scale, -1).sum(2)
    return approx.topk(budget, -1).indices.sort(-1).values


def _label_cache(
    cache: CompressedCache, layer_idx: int, keys: torch.Tensor, chan: torch.Tensor
) -> torch.Tensor:
    """The layer's label cache ``(B, Hkv, T, c)``: kept key channels, extended in place
    with the tokens added since the last step (the full keys are read once)."""
    have = cache.shared.get(("ds_label", layer_idx))
    done = 0 if have is None else have.shape[2]
    new = keys[:, :, done:]
    new = new.gather(-1, chan[None, :, None, :].expand(*new.shape[:3], -1))
    labels = new if have is None else torch.cat([have, new], 2)
    cache.shared[("ds_label", layer_idx)] = labels
    return labels


def channel_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, D)`` channel importance ``‖q_c‖₁ · ‖k_c‖₁`` over tokens, queries summed
    over each GQA group."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    qn = query.abs().sum(2).reshape(b, hkv, hq // hkv, d).sum(2)
    return qn * key.abs().sum(2)


class ChannelSearch:
    """Double Sparsity's `Calibration`: channel scores summed over the calibration text,
    per layer; each KV head keeps its top ``channels``."""

    def __init__(self, base: DoubleSparsity) -> None:
        self.base = base
        self.scores: dict[int, torch.Tensor] = {}  # layer -> (Hkv, D)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        self.scores[layer] = channel_scores(query, key).sum(0)

    def result(self, model: torch.nn.Module) -> DoubleSparsity:
        """The base config with `label` filled (sliding-window layers, which keep their own
        window cache, need none)."""
        if sorted(self.scores) != full_attention_layers(model):
            raise SparseLLMError("calibration did not reach every full-attention layer")
        label = tuple(
            tuple(
                tuple(sorted(h.tolist()))
                for h in self.scores[i].topk(self.base.channels, -1).indices
            )
            if i in self.scores
            else ()
            for i in range(len(get_blocks(model)))
        )
        return dataclasses.replace(self.base, label=label)
