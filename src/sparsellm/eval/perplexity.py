"""Perplexity over fixed token windows, the pinned protocol.

Each window is scored independently (no carried context): the mean next-token
negative log-likelihood over all predicted positions of all windows, computed from
fp32 logits, exponentiated. With equal-length windows this equals exp of the mean of
`transformers`' own per-window causal-LM loss, which a test checks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def next_token_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(tokens, vocab) fp32 logits of every position that predicts a next token.

    Row-major (tokens, vocab) layout on purpose: cross_entropy over a strided class dim
    (the (B, V, S) form) measured ~1e-4 off transformers' own loss here.
    """
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return logits.reshape(-1, logits.shape[-1])


@torch.no_grad()
def window_nll(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity"
) -> torch.Tensor:
    """Summed next-token NLL per window (fp64), shape (n_windows,)."""
    sums = []
    for ids in tqdm(windows.split(batch_size), desc=desc, unit="batch", leave=False):
        logits = next_token_logits(model, ids)
        nll = F.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="none")
        sums.append(nll.view(ids.shape[0], -1).double().sum(1))
    return torch.cat(sums)


def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity"
) -> dict[str, float]:
    """``{"ppl", "nll", "tokens", "windows"}`` for the (n, seqlen) token `windows`."""
    sums = window_nll(model, windows, batch_size, desc)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = sums.sum().item() / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "windows": windows.shape[0]}
