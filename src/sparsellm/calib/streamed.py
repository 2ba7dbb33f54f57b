"""Run token windows through a checkpoint one block at a time (models larger than RAM).

The model is a skeleton with meta parameters (`sparsellm.models.shards.skeleton`); only
what the current step needs is read from the shards: the tensors before the blocks while
capturing block 0's inputs, one block while it runs, the final norm and head while the
logits are formed. `capture` is shared with streamed pruning; `final_hidden` and
`logprobs` give a streamed evaluation the same numbers an in-RAM forward gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsellm.calib.sequential import BlockCall, capture_block_inputs, run_block
from sparsellm.models.adapters import blocks_prefix, get_blocks
from sparsellm.models.shards import Checkpoint, materialize, release


def outer_names(model: nn.Module, head: bool) -> set[str]:
    """Names of the parameters outside the blocks; the output head only when `head` (or
    when it is tied to the input embeddings, which capture needs anyway)."""
    prefix = blocks_prefix(model)
    out = model.get_output_embeddings()
    untied = out is not None and out.weight is not model.get_input_embeddings().weight
    return {
        name
        for name, p in model.named_parameters()
        if not name.startswith(f"{prefix}.") and (head or not (untied and p is out.weight))
    }


@torch.no_grad()
def capture(
    model: nn.Module,
    ckpt: Checkpoint,
    windows: torch.Tensor,
    batch_size: int,
    into: torch.Tensor | None,
) -> list[list[BlockCall]]:
    """Every block's call arguments per batch, and block 0's inputs written into `into`
    (cast to its dtype) when given; the embeddings are in memory only meanwhile."""
    names = outer_names(model, head=False)
    materialize(model, ckpt, names=names)
    calls: list[list[BlockCall]] = [[] for _ in get_blocks(model)]
    try:
        start = 0
        for ids in windows.split(batch_size):
            hidden, batch_calls = capture_block_inputs(model, [ids])
            for per_block, new in zip(calls, batch_calls, strict=True):
                per_block.extend(new)
            if into is not None:
                into[start : start + len(ids)] = hidden[0]
            start += len(ids)
    finally:
        release(model, names)
    return calls


@torch.no_grad()
def final_hidden(
    model: nn.Module, ckpt: Checkpoint, windows: torch.Tensor, batch_size: int = 4
) -> torch.Tensor:
    """The last block's outputs for `windows` (n, seq, d), one block in memory at a time."""
    prefix, blocks = blocks_prefix(model), get_blocks(model)
    hidden = torch.empty((*windows.shape, model.config.hidden_size))
    calls = capture(model, ckpt, windows, batch_size, hidden)
    batches = list(hidden.split(batch_size))

    def sink(b: int, y: torch.Tensor) -> None:
        batches[b].copy_(y)

    for i, block in enumerate(tqdm(blocks, desc="streamed forward", unit="block", leave=False)):
        materialize(block, ckpt, f"{prefix}.{i}.")
        run_block(block, batches, calls[i], None, sink)
        release(block)
    return hidden


class _Replay(nn.Module):
    """Stands in for a block: the last one returns the stored block output of the batch,
    the others pass their input through (so the model's own code runs the final norm and
    head, whatever the architecture)."""

    def __init__(self, block: nn.Module, output: list[torch.Tensor | None]) -> None:
        super().__init__()
        self.block = block
        self.output = output

    def __getattr__(self, name: str) -> Any:  # models read e.g. `attention_type` off blocks
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.output[0]
        return hidden_states if out is None else out


@contextmanager
def _replaying(blocks: nn.ModuleList, output: list[torch.Tensor | None]) -> Iterator[None]:
    originals = list(blocks)
    try:
        for i, block in enumerate(originals):
            last = i == len(originals) - 1
            blocks[i] = _Replay(block, output if last else [None])
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


@torch.no_grad()
def logprobs(
    model: nn.Module,
    ckpt: Checkpoint,
    windows: torch.Tensor,
    hidden: torch.Tensor,
    batch_size: int = 4,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, (tokens, vocab) fp32 log-probabilities) per batch, from `final_hidden`'s
    output: the model's own forward with every block replayed, so only the tensors
    outside the blocks are read."""
    names = outer_names(model, head=True)
    materialize(model, ckpt, names=names)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    if tied:  # materialize gave the shared tensor one owner; the head reads the same one
        head.weight = embed.weight
    output: list[torch.Tensor | None] = [None]
    try:
        with _replaying(get_blocks(model), output):
            for ids, h in zip(windows.split(batch_size), hidden.split(batch_size), strict=True):
                output[0] = h
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                yield ids, F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    finally:
        release(model, names)
        if tied:
            head.weight = embed.weight
