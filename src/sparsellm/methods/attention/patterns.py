"""Attention sparsity patterns as pure functions: block masks (compute) and token masks (tests).

A block mask is a bool tensor ``(..., n_q_blocks, n_k_blocks)``: True where query block
``i`` attends key block ``j``. Every mask here is causal (``j <= i``) and keeps the
diagonal block, so each query always sees at least itself and the softmax is defined.
Token masks ``(..., L, L)`` exist for the hand-built references in the tests and for
the masked-dense reference of the compute path; nothing at runtime builds them at 8k.

Queries and keys share positions (prefill, no cache offset): query block ``i`` covers
tokens ``[i*B, (i+1)*B)`` as do key blocks.
"""

from __future__ import annotations

import math

import torch


def n_blocks(length: int, block: int) -> int:
    """Blocks needed to cover `length` tokens."""
    return math.ceil(length / block)


def causal_blocks(nb: int, device: torch.device | None = None) -> torch.Tensor:
    """(nb, nb) lower-triangular block mask: the dense causal pattern at block level."""
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def _offsets(nb: int) -> torch.Tensor:
    """(nb, nb) query block minus key block index."""
    i = torch.arange(nb)
    return i[:, None] - i[None, :]


def sink_window(nb: int, sink_blocks: int, window_blocks: int) -> torch.Tensor:
    """StreamingLLM / LM-Infinite Λ-shape (= MInference's A-shape): the first
    `sink_blocks` key blocks plus the `window_blocks` most recent ones (diagonal included).
    """
    d = _offsets(nb)
    cols = torch.arange(nb)[None, :]
    return (d >= 0) & ((d < max(window_blocks, 1)) | (cols < sink_blocks))


def sink_window_tokens(nb: int, sink: int, window: int, block: int) -> torch.Tensor:
    """`sink_window` with the sink and the window given in tokens, each rounded up to
    whole blocks: the always-kept part shared by the block-selecting methods."""
    return sink_window(nb, math.ceil(sink / block), math.ceil(window / block))


def power_dilated(nb: int, sink_blocks: int = 1, window_blocks: int = 1) -> torch.Tensor:
    """PowerAttention: besides sinks and a local window, key blocks at power-of-two
    distances ``1, 2, 4, …`` from the query block, so information reaches any earlier
    block in log2(distance) layers with O(log n) blocks per row.
    """
    d = _offsets(nb)
    pow2 = (d > 0) & ((d & (d - 1)) == 0)
    return sink_window(nb, sink_blocks, window_blocks) | pow2


def topk_blocks(scores: torch.Tensor, k: int, always: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the `k` highest-scoring causal key blocks per query block (block-sparse top-k).

    `scores` is ``(..., nb, nb)``; non-causal entries are ignored. `always` (a block mask)
    is OR-ed in, and the diagonal is always kept.
    """
    nb = scores.shape[-1]
    s = scores.masked_fill(~causal_blocks(nb, scores.device), float("-inf"))
    return selected_blocks(s.topk(min(k, nb), dim=-1).indices, nb, always)


def selected_blocks(idx: torch.Tensor, nb: int, always: torch.Tensor | None = None) -> torch.Tensor:
    """The ``(..., nb, nb)`` block mask keeping key blocks `idx` ``(..., nb, k)`` of each
    query block, causal entries only, plus the diagonal and `always` (OR-ed in)."""
    causal = causal_blocks(nb, idx.device)
    mask = torch.zeros(*idx.shape[:-1], nb, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, idx, True)
    mask &= causal
    mask |= torch.eye(nb, dtype=torch.bool, device=idx.device)
    if always is not None:
        mask |= always
    return mask


def cumulative_blocks(probs: torch.Tensor, gamma: float, min_blocks: int = 1) -> torch.Tensor:
    """FlexPrefill's index selection: per query block, the smallest set of key blocks whose
    (estimated) attention mass reaches `gamma`; `probs` rows are distributions over causal
    key blocks ``(..., nb, nb)``. Diagonal always kept.
    """
    nb = probs.shape[-1]
    causal = causal_blocks(nb, probs.device)
    p = probs.masked_fill(~causal, 0.0)
    sorted_p, order = p.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each entry
    keep_sorted = (before < gamma * p.sum(-1, keepdim=True)) & (sorted_p > 0)
    keep_sorted[..., :min_blocks] = True
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return (mask & causal) | torch.eye(nb, dtype=torch.bool, device=probs.device)


def vertical_slash_tokens(length: int, vertical: torch.Tensor, slash: torch.Tensor) -> torch.Tensor:
    """Token mask ``(L, L)`` of MInference's vertical-slash pattern for one head: key columns
    in `vertical` and diagonals at offsets (query - key) in `slash`, causal only.
    """
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    col = torch.zeros(length, dtype=torch.bool)
    col[vertical] = True
    diag = torch.zeros(length, dtype=torch.bool)
    diag[slash] = True
    off = (q - k).clamp(min=0)
    return (k <= q) & (col[None, :] | diag[off])


def vertical_slash_blocks(
    length: int, block: int, vertical: torch.Tensor, slash: torch.Tensor
) -> torch.Tensor:
    """Block mask covering `vertical_slash_tokens` (any selected token ⇒ block kept), built
    without the token mask: a vertical column in key block j is needed by every query block
    ``i >= j``; a slash at offset o crosses at most two key blocks per query block.
    `vertical` / `slash` are ``(..., n)`` index tensors (a leading head dim is allowed).
    """
    nb = n_blocks(length, block)
    lead = vertical.shape[:-1]
    out = torch.zeros(*lead, nb, nb, dtype=torch.bool)
    colblk = torch.zeros(*lead, nb, dtype=torch.bool)
    colblk.scatter_(-1, vertical // block, True)
    out |= colblk[..., None, :] & causal_blocks(nb)
    first = torch.arange(nb) * block  # first query token of each block
    last = torch.clamp(first + block - 1, max=length - 1)
    o = slash[..., None, :]  # (..., 1, S)
    hi = last[:, None] - o  # the slash's keys for this query block span [lo, hi]
    lo = (first[:, None] - o).clamp(min=0)
    ext = torch.zeros(*lead, nb, nb + 1, dtype=torch.bool)  # column nb swallows misses
    for key in (lo, hi):
        ext.scatter_(-1, torch.where(hi >= 0, key // block, nb), True)
    out |= ext[..., :nb]
    return (out & causal_blocks(nb)) | torch.eye(nb, dtype=torch.bool)


def tail_blocks(length: int, tail: int, block: int) -> int:
    """Query blocks holding any of the last `tail` of `length` tokens. Counted from the
    end, not as ``ceil(tail / block)``: when `length` is not a block multiple the last
    block is partial, and a question `tail` tokens long may start one block earlier."""
    if tail <= 0:
        return 0
    return n_blocks(length, block) - max(length - tail, 0) // block


def dense_tail(mask: torch.Tensor, tail_blocks: int) -> torch.Tensor:
    """Star Attention's second phase on any pattern: the last `tail_blocks` query blocks (the
    question at the end of a long prompt, and the position whose logits start the answer)
    attend every causal key block; the other rows keep `mask`. Costs ``tail_blocks · nb``
    blocks per head, against the whole prompt's ``nb²/2`` for dense attention."""
    if tail_blocks <= 0:
        return mask
    nb = mask.shape[-1]
    rows = torch.arange(nb, device=mask.device)[:, None] >= nb - tail_blocks
    return mask | (rows & causal_blocks(nb, mask.device))


def expand_blocks(mask: torch.Tensor, length: int, block: int) -> torch.Tensor:
    """Token-level ``(..., L, L)`` causal mask of a block mask (reference path and tests)."""
    tok = mask.repeat_interleave(block, -1).repeat_interleave(block, -2)[..., :length, :length]
    return tok & torch.ones(length, length, dtype=torch.bool).tril()
