"""Dense-vs-sparse comparison on the same windows in one pass: perplexities, KL, top-1.

KL(dense ‖ sparse) per predicted token, averaged over all positions of all windows, is
the most sensitive measure of what pruning changed: it sees every probability, not
only the one of the observed token. Top-1 agreement is the fraction of positions where
both models put the same token first. Running both models batch by batch, and forming
log-probabilities a slice of positions at a time, means we never hold a batch's
vocabulary-wide logits (4×512×152k floats would be 1.2 GB per tensor).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsellm.eval.perplexity import next_token_logits
from sparsellm.models.replay import last_block_output, replayable, slice_logprobs


@torch.no_grad()
def compare_models(
    dense: torch.nn.Module, sparse: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4
) -> dict[str, float]:
    """Perplexity of both models, mean token KL(dense‖sparse) and top-1 agreement.

    Each model runs its blocks once per batch; the log-probabilities then come a slice
    of positions at a time (`slice_logprobs`), never a whole batch's vocabulary-wide logits.
    """

    def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = windows.split(batch_size)
        for ids in tqdm(batches, desc="dense vs sparse", unit="batch", leave=False):
            if not (replayable(dense) and replayable(sparse)):  # e.g. a soft-prompted model
                yield ids[:, 1:].reshape(-1), _logprobs(dense, ids), _logprobs(sparse, ids)
                continue
            h_d, h_s = last_block_output(dense, ids), last_block_output(sparse, ids)
            d, s = slice_logprobs(dense, [h_d], ids), slice_logprobs(sparse, [h_s], ids)
            for (targets, (lp_d,)), (_, (lp_s,)) in zip(d, s, strict=True):
                yield targets, lp_d, lp_s

    return compare_logprobs(pairs())


def compare_logprobs(
    triples: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    """`compare_models` from (targets, dense, sparse log-probabilities (tokens, vocab))
    triples, however they were computed (a streamed run computes them block by block)."""
    nll_dense = nll_sparse = kl = agree = 0.0
    tokens = 0
    for targets, lp_d, lp_s in triples:
        nll_dense -= lp_d.gather(1, targets[:, None]).double().sum().item()
        nll_sparse -= lp_s.gather(1, targets[:, None]).double().sum().item()
        kl += F.kl_div(lp_s, lp_d, log_target=True, reduction="sum").double().item()
        agree += (lp_d.argmax(-1) == lp_s.argmax(-1)).sum().item()
        tokens += targets.numel()
    return {
        "dense_ppl": math.exp(nll_dense / tokens),
        "sparse_ppl": math.exp(nll_sparse / tokens),
        "kl": kl / tokens,
        "top1_agreement": agree / tokens,
        "tokens": tokens,
    }


def _logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(tokens, vocab) fp32 log-probabilities of the positions that predict a next token."""
    return F.log_softmax(next_token_logits(model, ids), dim=-1)
