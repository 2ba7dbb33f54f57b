"""MInference's per-head patterns and the offline search that assigns them.

MInference gives each (layer, KV head) the pattern — A-shape, vertical-slash or block
top-k — that best covers its attention on calibration text at a fixed budget. The search
is a `Calibration`: during one exact forward it reads, in every full-attention layer, the
exact attention of a few query blocks (the last 64 queries, which the dynamic estimates
see, plus blocks at 1/4, 1/2 and 3/4 depth, which they do not) and measures each
candidate's recall — the attention mass inside its mask — per KV head. Each head keeps
its best-recall pattern.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.attention import patterns as P
from sparsellm.methods.attention.prefill import (
    BlockTopK,
    SinkWindow,
    VerticalSlash,
    probe_rows,
    rows_attention,
)
from sparsellm.methods.attention.protocols import PrefillConfig, attention_method
from sparsellm.models.adapters import full_attention_layers, get_blocks

MINFERENCE_CANDIDATES = ("a_shape", "vertical_slash", "block_topk")


@attention_method
@dataclass(frozen=True)
class MInference(PrefillConfig):
    """MInference's per-head patterns: each (layer, KV head) uses A-shape, vertical-slash or
    block top-k, as calibrated (`choice[layer][kv_head]` indexes `MINFERENCE_CANDIDATES`)."""

    name: ClassVar[str] = "minference"

    choice: tuple[tuple[int, ...], ...] = ()
    sink: int = 64
    window: int = 1024
    vertical: int = 1024
    slash: int = 1024
    blocks: int = 16
    block: int = 64
    min_length: int = 2048
    tail: int = 0

    def candidates(self) -> tuple[SinkWindow, VerticalSlash, BlockTopK]:
        """The three patterns with this config's budgets (order = `MINFERENCE_CANDIDATES`)."""
        common = {"block": self.block, "min_length": self.min_length, "sink": self.sink}
        return (
            SinkWindow(window=self.window, **common),
            VerticalSlash(vertical=self.vertical, slash=self.slash, **common),
            BlockTopK(blocks=self.blocks, **common),
        )

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        pick = torch.tensor(self.choice[layer])  # (Hkv,)
        nb = P.n_blocks(query.shape[2], self.block)
        shape = (query.shape[0], key.shape[1], nb, nb)
        out = torch.zeros(shape, dtype=torch.bool)
        for i, cand in enumerate(self.candidates()):
            if bool((pick == i).any()):
                m = cand.block_mask(query, key, layer).expand(shape)
                out = torch.where((pick == i)[None, :, None, None], m, out)
        return out

    def needs_calibration(self) -> bool:
        return not self.choice

    def calibration(self, tokens: int) -> PatternSearch:
        if tokens < 4 * self.block:
            raise SparseLLMError(f"MInference calibration needs >= {4 * self.block} tokens")
        return PatternSearch(self)


class PatternSearch:
    """MInference's `Calibration`: per layer the recall of each candidate per KV head."""

    def __init__(self, base: MInference) -> None:
        self.base = base
        self.recall: dict[int, torch.Tensor] = {}  # layer -> (3 candidates, Hkv)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        length, bs = query.shape[2], self.base.block
        rows = probe_rows(length)
        attn = rows_attention(query, key, rows)  # (B, Hkv, R, L)
        got = []
        for cand in self.base.candidates():
            mask = cand.block_mask(query, key, layer)
            mask = mask.expand(attn.shape[0], attn.shape[1], *mask.shape[-2:])
            tok = mask[..., rows // bs, :].repeat_interleave(bs, -1)[..., :length]
            got.append((attn * tok).sum(-1).mean((0, 2)))
        self.recall[layer] = torch.stack(got)

    def result(self, model: torch.nn.Module) -> MInference:
        """The base config with each KV head's best-recall candidate as its `choice`
        (sliding-window layers, which keep their own window under any method: none)."""
        if sorted(self.recall) != full_attention_layers(model):
            raise SparseLLMError("calibration did not reach every full-attention layer")
        choice = tuple(
            tuple(self.recall[i].argmax(0).tolist()) if i in self.recall else ()
            for i in range(len(get_blocks(model)))
        )
        return dataclasses.replace(self.base, choice=choice)
