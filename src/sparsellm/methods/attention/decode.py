"""Scoring through a cache, one token per step: how KV-cache methods are evaluated.

A single forward never decodes from a cache, so cache compression cannot change its
logits. These helpers prefill the prompt into a session's cache (compressed right after
prefill) and then feed the continuation one token at a time, the way generation sees it.
With a plain DynamicCache they agree with the one-forward scorers.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from sparsellm.eval.longctx import Sample


@torch.no_grad()
def _stepwise_logits(
    model: torch.nn.Module, prompt: list[int], cont: list[int], cache: Any
) -> torch.Tensor:
    """(len(cont), vocab) logits predicting each continuation token, decoding from `cache`."""
    out = model(
        input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1
    )
    rows = [out.logits[0, -1]]
    for tok in cont[:-1]:
        rows.append(
            model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[
                0, -1
            ]
        )
    return torch.stack(rows).float()


def cached_answer_correct(model: torch.nn.Module, sample: Sample, cache: Any) -> bool:
    """Whether greedy decoding from `cache` after the prompt yields exactly the answer."""
    logits = _stepwise_logits(model, sample.prompt, sample.answer, cache)
    return bool((logits.argmax(-1) == torch.tensor(sample.answer)).all())


def cached_tail_nll(model: torch.nn.Module, window: torch.Tensor, tail: int, cache: Any) -> float:
    """Summed NLL of the last `tail` tokens of a 1-D `window`, decoded from `cache`."""
    ids = window.tolist()
    logits = _stepwise_logits(model, ids[:-tail], ids[-tail:], cache)
    return F.cross_entropy(logits, torch.tensor(ids[-tail:]), reduction="sum").item()


@torch.no_grad()
def decode_tokens_per_s(
    model: torch.nn.Module, context: int, steps: int, cache: Any, seed: int = 0
) -> float:
    """Greedy decode speed (tokens/s) after a `context`-token random prompt; prefill untimed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=g)
    nxt = (
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        .logits[:, -1:]
        .argmax(-1)
    )
    start = time.perf_counter()
    for _ in range(steps):
        nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - start)


def cache_nbytes(cache: Any) -> int:
    """Bytes of stored keys and values in any layered HF cache."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        if getattr(layer, "is_initialized", False)
        for t in (layer.keys, layer.values)
    )
