"""Next-token log-probabilities from a model's last block outputs, a few positions at a time.

Full-vocabulary logits are what made evaluation the memory peak: a batch of 4 windows of
512 tokens is 1.2 GB of fp32 logits for a 152k vocabulary, and a comparison holds
several such tensors for two models. Here the blocks' work is done once (their outputs
are given), and the model's own forward is re-run with every block *replayed* — the last
one returns the stored outputs — and `logits_to_keep` selecting a slice of positions.
The model's own code thus applies its final norm, head and any logit transform (e.g.
soft-capping), whatever the architecture, and only a slice's logits exist at a time.
The re-runs cost a final norm over the batch each: small beside the blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import get_blocks

# elements of one slice's logits (16 MiB in fp32): a comparison holds about five such
# buffers (both models' log-probabilities, the logits, KL temporaries), which at 64 MiB
# were a quarter of the default model's in-RAM peak and at 2 GiB left a streamed 1.5B
# model 80 MB to spare; smaller slices only mean more (cheap) replayed forwards
SLICE_ELEMENTS = 1 << 22


class _Replay(nn.Module):
    """Stands in for a block: returns `output[0]` if set, else its input unchanged."""

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
def replaying(model: nn.Module, output: list[torch.Tensor | None]) -> Iterator[None]:
    """Every block replaced by a `_Replay`; the last one returns `output[0]`."""
    blocks = get_blocks(model)
    originals = list(blocks)
    try:
        for i, block in enumerate(originals):
            blocks[i] = _Replay(block, output if i == len(originals) - 1 else [None])
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def replayable(model: nn.Module) -> bool:
    """A plain transformers causal LM of a supported family (not a wrapper such as a
    soft-prompted model, whose forward adds positions of its own)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    try:
        get_blocks(model)
    except SparseLLMError:
        return False
    return True


@torch.no_grad()
def last_block_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The last block's output for `ids` from a normal forward (the head sees 1 position)."""
    seen: list[torch.Tensor] = []

    def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
        seen.append(out[0] if isinstance(out, tuple) else out)

    handle = get_blocks(model)[-1].register_forward_hook(hook)
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def slice_logprobs(
    model: nn.Module,
    hidden: list[torch.Tensor],
    ids: torch.Tensor,
    elements: int = SLICE_ELEMENTS,
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(targets, [log-probabilities per entry of `hidden`]) per slice of positions.

    `hidden` holds last block outputs (batch, seq, d) for the windows `ids` — one per
    model sharing this model's final norm and head (a pruned model and its dense parent).
    Each log-probability tensor is (batch · slice, vocab) fp32, rows ordered like the
    flattened `targets` (the next token of each position). A slice holds about
    `elements` logits.
    """
    batch, seq = ids.shape
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, elements // (batch * vocab))
    output: list[torch.Tensor | None] = [None]
    zeros = torch.zeros_like(hidden[0])  # the embeddings are never read: blocks replay
    with replaying(model, output):
        for start in range(0, seq - 1, step):
            keep = torch.arange(start, min(start + step, seq - 1))
            out = []
            for h in hidden:
                output[0] = h
                logits = model(inputs_embeds=zeros, use_cache=False, logits_to_keep=keep).logits
                out.append(F.log_softmax(logits.float().reshape(-1, vocab), dim=-1))
            yield ids[:, keep + 1].reshape(-1), out
