"""Run token windows through a checkpoint one block at a time (models larger than RAM).

The model is a skeleton with meta parameters (`sparsellm.models.shards.skeleton`); only
what the current step needs is read from the shards: the tensors before the blocks while
capturing block 0's inputs, one block while it runs, the final norm and head while the
logits are formed. `capture` is shared with streamed pruning; `final_hidden` and
`logprobs` give a streamed evaluation the same numbers an in-RAM forward gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsellm.calib.sequential import BlockCall, capture_block_inputs, run_block
from sparsellm.models.adapters import blocks_prefix, get_blocks
from sparsellm.models.replay import replaying, slice_logprobs
from sparsellm.models.shards import Checkpoint, materialize, release, return_freed_memory


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


@contextmanager
def _reading(model: nn.Module, ckpt: Checkpoint, names: set[str]) -> Iterator[None]:
    """The parameters `names` of `model` read from `ckpt` for the block, released after."""
    materialize(model, ckpt, names=names)
    try:
        yield
    finally:
        release(model, names)


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
    calls: list[list[BlockCall]] = [[] for _ in get_blocks(model)]
    with _reading(model, ckpt, outer_names(model, head=False)):
        start = 0
        for ids in windows.split(batch_size):
            hidden, batch_calls = capture_block_inputs(model, [ids])
            for per_block, new in zip(calls, batch_calls, strict=True):
                per_block.extend(new)
            if into is not None:
                into[start : start + len(ids)] = hidden[0]
            start += len(ids)
    return calls


def _through_blocks(
    model: nn.Module, ckpt: Checkpoint, batches: list[torch.Tensor], calls: list[list[BlockCall]]
) -> None:
    """Advance every batch of block-0 inputs in `batches` to the last block's outputs, in
    place, one block in memory at a time."""
    prefix, blocks = blocks_prefix(model), get_blocks(model)

    def sink(b: int, y: torch.Tensor) -> None:
        batches[b].copy_(y)

    for i, block in enumerate(tqdm(blocks, desc="streamed forward", unit="block", leave=False)):
        materialize(block, ckpt, f"{prefix}.{i}.")
        run_block(block, batches, calls[i], None, sink)
        release(block)
        return_freed_memory()  # or the freed block's buffers pile up in the allocator


@torch.no_grad()
def final_hidden(
    model: nn.Module, ckpt: Checkpoint, windows: torch.Tensor, batch_size: int = 4
) -> torch.Tensor:
    """The last block's outputs for `windows` (n, seq, d), one block in memory at a time."""
    hidden = torch.empty((*windows.shape, model.config.hidden_size))
    calls = capture(model, ckpt, windows, batch_size, hidden)
    _through_blocks(model, ckpt, list(hidden.split(batch_size)), calls)
    return hidden


def _head_names(model: nn.Module) -> set[str]:
    """The parameters after the blocks (and the embeddings only when the head is them)."""
    names = outer_names(model, head=True)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return names - {n for n, p in model.named_parameters() if p is embed and p is not head}


def streamed_logits(
    model: nn.Module, ckpt: Checkpoint, tokens_per_pass: int = 1 << 15
) -> Callable[[Sequence[tuple[torch.Tensor, torch.Tensor]]], Iterator[torch.Tensor]]:
    """A task evaluator's logits function (`sparsellm.eval.logits.LogitsFn`) for the
    checkpoint `ckpt` read block by block: requests (ids, positions to keep) are taken
    `tokens_per_pass` tokens at a time, their hidden states advanced through the blocks
    together (one read of the model per pass), then the final norm and head applied at
    the kept positions by the model's own forward with its blocks replayed. Requests may
    differ in shape (zero-shot batches, long-context samples)."""

    @torch.no_grad()
    def run(requests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[torch.Tensor]:
        start = 0
        while start < len(requests):
            end, tokens = start, 0
            while end < len(requests) and (end == start or tokens < tokens_per_pass):
                tokens += requests[end][0].numel()
                end += 1
            group = requests[start:end]
            with _reading(model, ckpt, outer_names(model, head=False)):
                hidden, calls = capture_block_inputs(model, [ids for ids, _ in group])
            _through_blocks(model, ckpt, hidden, calls)
            del calls
            output: list[torch.Tensor | None] = [None]
            with _reading(model, ckpt, _head_names(model)), replaying(model, output):
                for h, (_, keep) in zip(hidden, group, strict=True):
                    output[0] = h
                    zeros = torch.zeros_like(h)  # never read: the blocks replay
                    out = model(inputs_embeds=zeros, use_cache=False, logits_to_keep=keep)
                    yield out.logits
            start = end

    return run


@torch.no_grad()
def logprobs(
    model: nn.Module,
    ckpt: Checkpoint,
    windows: torch.Tensor,
    hidden: list[torch.Tensor],
    batch_size: int = 4,
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(targets, [log-probabilities per entry of `hidden`]) slice by slice (see
    `slice_logprobs`), from `final_hidden` outputs of models that share this checkpoint's
    final norm and head (a streamed prune copies them unchanged). Only the tensors after
    the blocks are read (and the embeddings when the head is tied to them)."""
    with _reading(model, ckpt, _head_names(model)):
        for b, ids in enumerate(windows.split(batch_size)):
            h = [x[b * batch_size : b * batch_size + len(ids)] for x in hidden]
            yield from slice_logprobs(model, h, ids)
