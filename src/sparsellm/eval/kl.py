"""Dense-vs-sparse comparison on the same windows in one pass: perplexities, KL, top-1.

KL(dense ‖ sparse) per predicted token, averaged over all positions of all windows, is
the most sensitive measure of what pruning changed: it sees every probability, not
only the one of the observed token. Top-1 agreement is the fraction of positions where
both models put the same token first. Running both models batch by batch means we
never hold the dense logits of the whole set (32×512×49k floats would be 3 GB).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsellm.eval.perplexity import next_token_logits


@torch.no_grad()
def compare_models(
    dense: torch.nn.Module, sparse: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4
) -> dict[str, float]:
    """Perplexity of both models, mean token KL(dense‖sparse) and top-1 agreement."""
    batches = tqdm(windows.split(batch_size), desc="dense vs sparse", unit="batch", leave=False)
    return compare_logprobs((ids, _logprobs(dense, ids), _logprobs(sparse, ids)) for ids in batches)


def compare_logprobs(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    """`compare_models` from (window ids, dense, sparse) (tokens, vocab) log-probabilities
    per batch, however they were computed (a streamed run computes them block by block)."""
    nll_dense = nll_sparse = kl = agree = 0.0
    tokens = 0
    for ids, lp_d, lp_s in pairs:
        targets = ids[:, 1:].reshape(-1)
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
