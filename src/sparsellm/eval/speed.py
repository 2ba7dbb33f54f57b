"""Measured speed and memory, dense beside sparse in one process, reported as ratios.

Absolute timings on a shared 2-core machine are noisy, so every measurement runs the
two models alternately (dense, sparse, dense, …) and keeps the median of each, and the
summary is the sparse/dense ratio. Prefill is one forward of a `length`-token sequence
(batch 1); decode is greedy generation of `new_tokens` tokens after a short prompt
(batch 1, KV cache on), timed end to end.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def prefill_seconds(
    model: torch.nn.Module, length: int, seed: int = 0, logits_to_keep: int = 0
) -> float:
    """Seconds for one forward over `length` random tokens (batch 1, no cache).

    ``logits_to_keep=1`` computes the LM head for the last position only, as `generate`'s
    prefill does (0 = every position, as perplexity needs)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g)
    return _timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=logits_to_keep))


@torch.no_grad()
def decode_seconds(
    model: torch.nn.Module, new_tokens: int = 128, prompt: int = 16, seed: int = 0
) -> float:
    """Seconds to greedily generate exactly `new_tokens` tokens after a `prompt`-token input."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=g)
    return _timed(
        lambda: model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    )


def parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held by parameters, and how many parameter elements are exactly zero."""
    params = list({id(p): p for p in model.parameters()}.values())  # tied weights once
    return {
        "bytes": sum(p.numel() * p.element_size() for p in params),
        "zeros": sum(int((p == 0).sum()) for p in params),
        "numel": sum(p.numel() for p in params),
    }


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def alternate_medians(
    jobs: dict[str, Callable[[], float]], repeats: int = 3, warmup: bool = True
) -> dict[str, float]:
    """Median seconds of each job, the jobs run in turn `repeats` times (a, b, a, b, ...).

    Every timed comparison goes through here, so a drift of the machine (another
    process, frequency scaling) hits all jobs alike rather than whichever ran last.
    Each job runs once untimed first (allocator, thread pool, lazy builds).
    """
    if warmup:
        for job in jobs.values():
            job()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for k, job in jobs.items():
            times[k].append(job())
    return {k: statistics.median(v) for k, v in times.items()}


def compare_speed(
    dense: torch.nn.Module,
    sparse: torch.nn.Module,
    lengths: tuple[int, ...] = (512, 2048, 8192),
    new_tokens: int = 128,
    repeats: int = 3,
) -> dict[str, Any]:
    """Median prefill tokens/s per length and decode tokens/s, for both models, plus ratios."""
    out: dict[str, Any] = {"prefill": {}, "repeats": repeats, "threads": torch.get_num_threads()}
    jobs = [(f"prefill_{n}", lambda m, n=n: prefill_seconds(m, n), n) for n in lengths]
    jobs.append(("decode", lambda m: decode_seconds(m, new_tokens), new_tokens))
    for name, job, tokens in tqdm(jobs, desc="speed", unit="case", leave=False):
        med = alternate_medians(
            {"dense": lambda j=job: j(dense), "sparse": lambda j=job: j(sparse)}, repeats
        )
        entry = {
            "dense_tok_s": tokens / med["dense"],
            "sparse_tok_s": tokens / med["sparse"],
            "speedup": med["dense"] / med["sparse"],
            "tokens": tokens,
        }
        if name == "decode":
            out["decode"] = entry
        else:
            out["prefill"][str(tokens)] = entry
    out["dense_params"] = parameter_bytes(dense)
    out["sparse_params"] = parameter_bytes(sparse)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out
