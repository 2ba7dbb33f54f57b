"""Where the task evaluators get their logits: a model in memory, or a streamed one.

Zero-shot scoring and long-context retrieval both ask the same question of a model —
the logits at some positions (`logits_to_keep`) of a batch of token ids — and need
nothing else. Asking it through a `LogitsFn` over the whole list of requests lets a
model that does not fit in RAM answer block by block
(`sparsellm.calib.streamed.streamed_logits`: every request's hidden states advanced one
block at a time), while a model in memory answers request by request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

# [(ids (batch, length), positions to keep (1-D long))] -> logits per request, in order
Request = tuple[torch.Tensor, torch.Tensor]
LogitsFn = Callable[[Sequence[Request]], Iterator[torch.Tensor]]


def model_logits(model: nn.Module) -> LogitsFn:
    """The `LogitsFn` of a model in memory: one forward per request."""

    @torch.no_grad()
    def run(requests: Sequence[Request]) -> Iterator[torch.Tensor]:
        for ids, keep in requests:
            yield model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits

    return run
