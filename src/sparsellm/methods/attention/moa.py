"""MoA (Mixture of Sparse Attention): a different sliding-window span for every head,
found by a search on calibration data under an average-span budget.

Heads differ a lot in how far back they look, so one window for all wastes budget on
local heads and starves long-range ones. Each (layer, KV head) gets an *elastic* span
``s × L`` (a fraction of the input length, so the plan transfers across lengths; plus the
`sink` first tokens) chosen from `CANDIDATES`. The search (`SpanSearch`, MoA's
`Calibration`) measures, for
every head and candidate, the attention recall — the exact attention mass the pattern
covers on sampled query rows of calibration text — and then solves the budgeted choice
greedily: all heads start at the smallest span and the upgrade with the best recall gain
per unit of span is taken until the mean span reaches `density`. (MoA proper profiles the
loss gradient; recall is the same signal without a backward pass.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.attention import patterns as P
from sparsellm.methods.attention.prefill import probe_rows, rows_attention
from sparsellm.methods.attention.protocols import PrefillConfig, attention_method
from sparsellm.models.adapters import full_attention_layers, get_blocks

CANDIDATES = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # span as a fraction of the length


@attention_method
@dataclass(frozen=True)
class MoA(PrefillConfig):
    """Sink plus a per-(layer, KV head) window of ``spans[layer][head] × L`` tokens."""

    name: ClassVar[str] = "moa"

    density: float = 0.25
    sink: int = 64
    block: int = 64
    min_length: int = 2048
    tail: int = 0
    spans: tuple[tuple[float, ...], ...] = ()

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        return head_windows(query.shape[2], self.block, self.sink, self.spans[layer])

    def needs_calibration(self) -> bool:
        return not self.spans

    def calibration(self, tokens: int) -> SpanSearch:
        if tokens < 4 * self.block:
            raise SparseLLMError(f"MoA calibration needs >= {4 * self.block} tokens")
        return SpanSearch(self)


def head_windows(length: int, block: int, sink: int, spans: tuple[float, ...]) -> torch.Tensor:
    """``(1, H, nb, nb)`` sink + window block masks, one window ``span × length`` per head."""
    nb = P.n_blocks(length, block)
    sink_b = math.ceil(sink / block)
    masks = [P.sink_window(nb, sink_b, math.ceil(s * length / block)) for s in spans]
    return torch.stack(masks)[None]


def allocate(recall: torch.Tensor, costs: tuple[float, ...], density: float) -> torch.Tensor:
    """Candidate index per head maximising total recall with mean cost <= `density`.

    `recall` is ``(heads, candidates)`` for candidates of increasing `costs`. Greedy on
    marginal gain per unit cost from the cheapest choice; the cheapest choice is always
    affordable. Returns ``(heads,)`` indices."""
    heads = recall.shape[0]
    cost = torch.tensor(costs)
    pick = torch.zeros(heads, dtype=torch.long)
    budget = density * heads - float(cost[0]) * heads
    while True:
        nxt = (pick + 1).clamp(max=len(costs) - 1)
        extra = cost[nxt] - cost[pick]
        gain = recall.gather(1, nxt[:, None])[:, 0] - recall.gather(1, pick[:, None])[:, 0]
        ratio = torch.where((nxt > pick) & (extra <= budget + 1e-9), gain / extra, -1.0)
        best = int(ratio.argmax())
        if ratio[best] < 0:
            return pick
        budget -= float(extra[best])
        pick[best] = nxt[best]


class SpanSearch:
    """MoA's `Calibration`: each candidate span's recall per (layer, KV head), then the
    budgeted allocation; `recall` is ``(layers, Hkv, candidates)`` once `result` ran (one
    row per full-attention layer)."""

    def __init__(self, base: MoA) -> None:
        self.base = base
        self.by_layer: dict[int, torch.Tensor] = {}  # layer -> (Hkv, candidates)
        self.recall: torch.Tensor | None = None

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        length, bs = query.shape[2], self.base.block
        rows = probe_rows(length)
        attn = rows_attention(query, key, rows)  # (B, Hkv, R, L)
        got = []
        for s in CANDIDATES:
            mask = head_windows(length, bs, self.base.sink, (s,))[0, 0]
            tok = mask[rows // bs].repeat_interleave(bs, -1)[..., :length]
            got.append((attn * tok).sum(-1).mean((0, 2)))
        self.by_layer[layer] = torch.stack(got, -1)

    def result(self, model: torch.nn.Module) -> MoA:
        """The base config with `spans` chosen under its average-span budget. Sliding-window
        layers (Gemma-3) compute their own window under any method: the budget is shared
        by the full-attention layers alone."""
        layers = full_attention_layers(model)
        if sorted(self.by_layer) != layers:
            raise SparseLLMError("calibration did not reach every full-attention layer")
        recall = torch.stack([self.by_layer[i] for i in layers])
        pick = allocate(recall.flatten(0, 1), CANDIDATES, self.base.density)
        chosen = dict(zip(layers, pick.reshape(recall.shape[:2]).tolist(), strict=True))
        spans = tuple(
            tuple(CANDIDATES[j] for j in chosen[i]) if i in chosen else ()
            for i in range(len(get_blocks(model)))
        )
        self.recall = recall
        return dataclasses.replace(self.base, spans=spans)
