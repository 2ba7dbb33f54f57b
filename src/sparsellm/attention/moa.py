"""MoA (Mixture of Sparse Attention): a different sliding-window span for every head,
found by a search on calibration data under an average-span budget.

Heads differ a lot in how far back they look, so one window for all wastes budget on
local heads and starves long-range ones. Each (layer, KV head) gets an *elastic* span
``s × L`` (a fraction of the input length, so the plan transfers across lengths; plus the
`sink` first tokens) chosen from `CANDIDATES`. The search (`calibrate_moa`) measures, for
every head and candidate, the attention recall — the exact attention mass the pattern
covers on sampled query rows of calibration text — and then solves the budgeted choice
greedily: all heads start at the smallest span and the upgrade with the best recall gain
per unit of span is taken until the mean span reaches `density`. (MoA proper profiles the
loss gradient; recall is the same signal without a backward pass.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from sparsellm.attention import patterns as P
from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import full_attention_layers, get_blocks

CANDIDATES = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # span as a fraction of the length


@dataclass(frozen=True)
class MoA:
    """Sink plus a per-(layer, KV head) window of ``spans[layer][head] × L`` tokens."""

    density: float = 0.25
    sink: int = 64
    block: int = 64
    min_length: int = 2048
    tail: int = 0
    spans: tuple[tuple[float, ...], ...] = ()

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        return head_windows(query.shape[2], self.block, self.sink, self.spans[layer])


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


@dataclass(frozen=True)
class _Probe:
    """Prefill 'method' that measures each candidate span's recall, then attends densely."""

    base: MoA
    recall: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (Hkv, cands)
    block: int = 64
    min_length: int = 0

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        from sparsellm.attention.search import _rows_attention, probe_rows

        length, bs = query.shape[2], self.base.block
        rows = probe_rows(length)
        attn = _rows_attention(query, key, rows)  # (B, Hkv, R, L)
        got = []
        for s in CANDIDATES:
            mask = head_windows(length, bs, self.base.sink, (s,))[0, 0]
            tok = mask[rows // bs].repeat_interleave(bs, -1)[..., :length]
            got.append((attn * tok).sum(-1).mean((0, 2)))
        self.recall[layer] = torch.stack(got, -1)
        return P.causal_blocks(P.n_blocks(length, self.block))


@torch.no_grad()
def calibrate_moa(
    model: torch.nn.Module, ids: torch.Tensor, method: MoA | None = None
) -> tuple[MoA, torch.Tensor]:
    """`method` with `spans` chosen from one forward over calibration `ids` (1, L) under
    its average-span budget, and the ``(layers, Hkv, candidates)`` recalls behind it (one
    row per full-attention layer)."""
    from sparsellm.attention.hf import sparse_attention

    base = method or MoA()
    if ids.shape[1] < 4 * base.block:
        raise SparseLLMError(f"MoA calibration needs >= {4 * base.block} tokens")
    probe = _Probe(base)
    with sparse_attention(model, probe):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    # sliding-window layers (Gemma-3) compute their own window under any method: the
    # average-span budget is shared by the full-attention layers alone
    layers = full_attention_layers(model)
    if sorted(probe.recall) != layers:
        raise SparseLLMError("calibration did not reach every full-attention layer")
    recall = torch.stack([probe.recall[i] for i in layers])
    pick = allocate(recall.flatten(0, 1), CANDIDATES, base.density).reshape(recall.shape[:2])
    chosen = dict(zip(layers, pick.tolist(), strict=True))
    spans = tuple(
        tuple(CANDIDATES[j] for j in chosen[i]) if i in chosen else ()
        for i in range(len(get_blocks(model)))
    )
    return dataclasses.replace(base, spans=spans), recall
