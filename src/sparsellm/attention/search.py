"""Offline per-head pattern search for MInference.

MInference assigns each head the pattern (A-shape, vertical-slash, block top-k) that best
covers its attention on calibration text at a fixed budget. We run the model once on
calibration tokens with a probe as its attention method: in every layer the probe computes
the exact attention of a few query blocks (the last 64 queries, which the dynamic
estimates see, plus blocks at 1/4, 1/2 and 3/4 depth, which they do not) and measures each
candidate's recall — the attention mass inside its mask — per KV head, then attends
densely so later layers see unchanged inputs. Each head keeps its best-recall pattern.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from sparsellm.attention import patterns as P
from sparsellm.attention.hf import sparse_attention
from sparsellm.attention.prefill import MInference, _group_sum
from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import full_attention_layers, get_blocks


def probe_rows(length: int) -> torch.Tensor:
    """The query rows a recall probe reads: 64 at the end and 64 at 1/4, 1/2 and 3/4 of
    the sequence, so a candidate is judged on near and far keys alike, at O(rows·L) cost."""
    starts = sorted({length - 64, length // 4, length // 2, 3 * length // 4})
    return torch.cat([torch.arange(s, min(s + 64, length)) for s in starts])


def _rows_attention(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Exact causal attention of query positions `rows` to all keys, averaged per KV head."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, 1)
    s = (query[:, :, rows] @ k.transpose(-1, -2)) * query.shape[-1] ** -0.5
    s = s.masked_fill(torch.arange(key.shape[2])[None, :] > rows[:, None], float("-inf"))
    return _group_sum(torch.softmax(s, -1), key.shape[1]) / groups


@dataclass(frozen=True)
class _Probe:
    """Attention method that records candidate recalls and computes dense attention."""

    base: MInference
    recall: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (3, Hkv)
    block: int = 64
    min_length: int = 0

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        length, bs = query.shape[2], self.base.block
        rows = probe_rows(length)
        attn = _rows_attention(query, key, rows)  # (B, Hkv, R, L)
        got = []
        for cand in self.base.candidates():
            mask = cand.block_mask(query, key, layer)
            mask = mask.expand(attn.shape[0], attn.shape[1], *mask.shape[-2:])
            tok = mask[..., rows // bs, :].repeat_interleave(bs, -1)[..., :length]
            got.append((attn * tok).sum(-1).mean((0, 2)))
        self.recall[layer] = torch.stack(got)
        return P.causal_blocks(P.n_blocks(length, self.block))


@torch.no_grad()
def calibrate_minference(
    model: torch.nn.Module, ids: torch.Tensor, method: MInference | None = None
) -> tuple[MInference, dict[int, torch.Tensor]]:
    """`method` with `choice` filled from one forward over calibration `ids` (1, L), and the
    per-layer recalls (3 candidates × KV heads) that decided it."""
    base = method or MInference()
    if ids.shape[1] < 4 * base.block:
        raise SparseLLMError(f"MInference calibration needs >= {4 * base.block} tokens")
    probe = _Probe(base)
    with sparse_attention(model, probe):
        model(input_ids=ids, use_cache=False)
    # sliding-window layers (Gemma-3) compute their own window under any method: no choice
    if sorted(probe.recall) != full_attention_layers(model):
        raise SparseLLMError("calibration did not reach every full-attention layer")
    choice = tuple(
        tuple(probe.recall[i].argmax(0).tolist()) if i in probe.recall else ()
        for i in range(len(get_blocks(model)))
    )
    return dataclasses.replace(base, choice=choice), probe.recall
