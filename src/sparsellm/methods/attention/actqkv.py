"""ActQKV (Xiao, Wang, Li, et al., 2025): activation-aware probe-query KV retrieval.

Retrieval-style decoding, as in the InfLLM line of work ActQKV builds on: nothing is
evicted. The middle of the context is cut into blocks of `block` tokens, each represented
by its mean key, and every decode step reads the `sink` first tokens, the `recent` last
ones and the blocks its *probe* scores highest. Two rules are ActQKV's own:

* **Activation-aware probe-query.** Right after prefill, each query head's last `window`
  prompt queries are scored by their *activation bias*: the squared deviation of a token's
  query from the window's channel means, standardised per channel by the window's variance
  and averaged over channels. Tokens that stand out from their window (the anchor tokens of
  a question) dominate the probe, a bias-weighted mean of those queries, where a plain mean
  would average them away. A decode step scores blocks by ``(q + weight·probe)·k̄``.
* **Dynamic KV cut-off.** How many blocks a layer reads follows the information density of
  its block scores: with ``H`` the mean entropy of the per-head softmax over the ``n``
  blocks and ``H_max = log n``, ``k = k_min + (k_max − k_min)·exp(10·(2σ(10(H − H_max)) −
  1))``. A flat distribution (nothing stands out) reads the whole budget, a peaked one only
  ``min_blocks`` more than what stands out. One ``k`` per layer and step, shared by heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.methods.attention.cache import CompressedCache
from sparsellm.methods.attention.protocols import KVConfig, attention_method


def activation_bias(q: torch.Tensor) -> torch.Tensor:
    """Activation bias ``(…, T)`` of each of the `T` queries in ``q (…, T, D)``: the mean over
    channels of ``(q − μ)² / (σ² + ε)`` with the window's channel mean μ and variance σ²; ε
    is 1% of the mean variance, so a near-constant channel cannot dominate."""
    mu = q.mean(-2, keepdim=True)
    var = q.var(-2, unbiased=False, keepdim=True)
    eps = var.mean(-1, keepdim=True) / 100 + torch.finfo(q.dtype).tiny
    return ((q - mu).square() / (var + eps)).mean(-1)


def probe_query(q: torch.Tensor) -> torch.Tensor:
    """The activation-aware probe ``(…, D)``: queries ``(…, T, D)`` averaged with weights
    proportional to their activation bias (uniform when no token deviates, e.g. T = 1)."""
    bias = activation_bias(q)
    total = bias.sum(-1, keepdim=True)
    weights = torch.where(total > 0, bias / total.clamp_min(1e-30), 1.0 / q.shape[-2])
    return (weights[..., None] * q).sum(-2)


def cutoff_blocks(scores: torch.Tensor, k_min: int, k_max: int, scale: float) -> int:
    """Blocks to read from block scores ``(…, n)`` (logits, times `scale`): the dynamic
    cut-off on the mean entropy of their softmax, in ``[min(k_min, k_max), k_max]``."""
    n = scores.shape[-1]
    p = torch.softmax(scores.float() * scale, -1)
    h = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    sigma = torch.sigmoid(10 * (h - math.log(n)))
    frac = float(torch.exp(10 * (2 * sigma - 1)))
    k_min = min(k_min, k_max)
    return max(k_min, min(k_max, round(k_min + (k_max - k_min) * frac)))


@attention_method
@dataclass(frozen=True)
class ActQKV(KVConfig):
    """Block retrieval by an activation-aware probe with a dynamic cut-off."""

    name: ClassVar[str] = "actqkv"

    budget: int = 2048
    block: int = 32
    sink: int = 64
    recent: int = 256
    window: int = 64
    weight: float = 1.0
    min_blocks: int = 8

    def after_prefill(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor, scale: float
    ) -> None:
        b, hq, length, d = query.shape
        hkv = cache.layers[layer_idx].keys.shape[1]
        probe = probe_query(query[:, :, -min(self.window, length) :].float())
        cache.shared[(self.name, layer_idx)] = {
            "probe": probe.reshape(b, hkv, hq // hkv, d),
            "means": query.new_zeros(b, hkv, 0, d),
            "scale": scale,
        }

    def select(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor
    ) -> torch.Tensor | None:
        keys = cache.layers[layer_idx].keys
        b, hkv, length, d = keys.shape
        state = cache.shared.get((self.name, layer_idx))
        n = max(0, (length - self.recent - self.sink) // self.block)
        tail_from = self.sink + n * self.block
        k_max = (self.budget - self.sink - (length - tail_from)) // self.block
        if length <= self.budget or state is None or n == 0:
            return None
        done = state["means"].shape[2]
        if done < n:
            new = keys[:, :, self.sink + done * self.block : tail_from]
            state["means"] = torch.cat(
                [state["means"], new.unflatten(2, (n - done, self.block)).mean(3)], 2
            )
        probe = (query.reshape(b, hkv, -1, d) + self.weight * state["probe"]) / (1 + self.weight)
        scores = torch.einsum("bhgd,bhnd->bhgn", probe, state["means"]).mean(2)  # (B, Hkv, n)
        k = cutoff_blocks(scores, self.min_blocks, max(k_max, 0), state["scale"])
        chosen = scores.topk(k, -1).indices.sort(-1).values
        blocks = (chosen[..., None] * self.block + self.sink + torch.arange(self.block)).flatten(2)
        fixed = (torch.arange(self.sink), torch.arange(tail_from, length))
        return torch.cat([fixed[0].expand(b, hkv, -1), blocks, fixed[1].expand(b, hkv, -1)], -1)
