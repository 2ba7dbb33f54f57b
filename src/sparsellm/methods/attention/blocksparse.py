"""Block-sparse causal attention on CPU that computes only the selected key blocks.

Work is organised in *rows*: one row per (batch, selection head, query block) holding the
queries of every query head that shares the selection (a GQA group stacks its heads, so
their shared K/V blocks are read once). A row's selected key blocks split into three
parts, each attended with the fused CPU flash-attention kernel, which also returns every
query's log-sum-exp so the partial softmaxes merge exactly
(``out = Σ_p exp(lse_p - lse) · out_p``):

* the diagonal block, the only one needing a causal mask: one batched call for all rows;
* the *band*, the run of selected blocks just before the diagonal (a sliding window):
  consecutive rows with the same band length read overlapping slabs of the contiguous
  K/V through one strided view, so nothing is copied;
* the rest (sinks, dilated or dynamically chosen blocks): rows with the same count
  gather exactly their blocks (``index_select`` of whole blocks, no padding, no mask).

No mask tensor, score matrix or ``L × L`` object exists; work and memory scale with the
number of selected blocks. `masked_dense_attention` is the reference of the tests.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from sparsellm.methods.attention.patterns import expand_blocks, n_blocks

KEYS_PER_CHUNK = 1 << 18  # gathered keys per call of the gathered part: bounds memory


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and per-query log-sum-exp for ``(N, H, Lq, D)`` inputs: the fused
    CPU flash kernel where it exists (it returns the lse), explicit softmax elsewhere."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        upper = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(upper, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v), s.logsumexp(-1)


def band_lengths(earlier: torch.Tensor) -> torch.Tensor:
    """Per row of a strictly-lower block mask ``(rows, nb)`` whose row ``r`` is query block
    ``r % nb``: how many consecutive blocks right before the diagonal are selected."""
    rows, nb = earlier.shape
    i = (torch.arange(rows, device=earlier.device) % nb)[:, None]
    back = i - 1 - torch.arange(nb, device=earlier.device)  # blocks i-1, i-2, ...
    run = earlier.gather(1, back.clamp(min=0)) & (back >= 0)
    return run.cumprod(1).sum(1)


def _runs(band: torch.Tensor, nb: int) -> list[tuple[int, int, int]]:
    """Maximal ``(start, stop, band)`` runs of consecutive rows of one (batch, head) with
    the same non-zero band length."""
    change = torch.ones_like(band, dtype=torch.bool)
    change[1:] = (band[1:] != band[:-1]) | (torch.arange(1, len(band)) % nb == 0)
    starts = [*change.nonzero()[:, 0].tolist(), len(band)]
    return [(a, z, int(band[a])) for a, z in itertools.pairwise(starts) if band[a] > 0]


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: torch.Tensor,
    block: int,
    scale: float | None = None,
    edge: int = 0,
) -> torch.Tensor:
    """Causal attention restricted to `block_mask`; returns ``(B, Hq, L, D)``.

    `query` is ``(B, Hq, L, D)``, `key`/`value` ``(B, Hkv, L, D)`` with ``Hq % Hkv == 0``;
    `block_mask` is ``(nb, nb)`` or ``(B | 1, H, nb, nb)`` with H in {1, Hkv, Hq}. The
    diagonal block is always attended (whatever the mask says), so every softmax is defined.
    `edge` > 0 also attends, in the block `edge` blocks before the diagonal, the keys past
    the query's own offset (key c of query a where c > a): with a band of ``edge − 1``
    blocks that is exactly a token-level sliding window of ``edge · block`` keys.
    """
    b, hq, length, d = query.shape
    hkv = key.shape[1]
    nb = n_blocks(length, block)
    scale = d**-0.5 if scale is None else scale
    mask = block_mask if block_mask.dim() == 4 else block_mask[None, None]
    mh = hq if mask.shape[1] == hq else hkv  # heads that own a selection
    rep = hq // mh  # query heads stacked per row
    earlier = mask.expand(b, mh, nb, nb).tril(-1).reshape(-1, nb)  # (rows, nb)
    n_rows = earlier.shape[0]
    pad = nb * block - length
    query, key, value = (F.pad(t, (0, 0, 0, pad)).contiguous() for t in (query, key, value))
    qrows = query.reshape(b, mh, rep, nb, block, d).transpose(2, 3).reshape(n_rows, rep, block, d)
    kflat, vflat = key.reshape(-1, d), value.reshape(-1, d)
    row = torch.arange(n_rows)
    qblock = row % nb
    # flat key-block id of block 0 of each row's KV head: (batch * Hkv + kv head) * nb
    base = ((row // (mh * nb)) * hkv + (row // nb % mh) // (mh // hkv)) * nb

    def blocks(flat: torch.Tensor, ids: torch.Tensor, per_row: int) -> torch.Tensor:
        got = flat.view(-1, block, d).index_select(0, ids)
        return got.reshape(-1, 1, per_row * block, d)

    diag = base + qblock
    kd, vd = (blocks(t, diag, 1).expand(n_rows, rep, block, d) for t in (kflat, vflat))
    out, lse = _attend(qrows, kd, vd, True, scale)
    # the running result, merged with each further part in place (no per-part buffers)
    out, lse = out.reshape(n_rows, rep * block, d), lse.reshape(n_rows, rep * block)
    qrows = qrows.reshape(n_rows, 1, rep * block, d)

    band = band_lengths(earlier)
    for start, stop, r in _runs(band, nb):
        offset = int(base[start] + qblock[start] - r) * block * d
        size, strides = (stop - start, 1, r * block, d), (block * d, 0, d, 1)
        k = kflat.as_strided(size, strides, kflat.storage_offset() + offset)
        v = vflat.as_strided(size, strides, vflat.storage_offset() + offset)
        o, s = _attend(qrows[start:stop], k, v, False, scale)
        _merge(out[start:stop], lse[start:stop], o[:, 0], s[:, 0])

    if edge:
        _edge_block(out, lse, qrows, kflat, vflat, base, nb, edge, block, scale)

    rest = earlier & (torch.arange(nb) < (qblock - band)[:, None])
    counts = rest.sum(-1)
    order = torch.argsort((~rest).to(torch.int8), dim=-1, stable=True)  # selected first
    for c in counts.unique().tolist():
        if c == 0:
            continue
        for rows in row[counts == c].split(max(1, KEYS_PER_CHUNK // (c * block))):
            ids = (base[rows, None] + order[rows, :c]).flatten()
            o, s = _attend(
                qrows.index_select(0, rows),
                blocks(kflat, ids, c),
                blocks(vflat, ids, c),
                False,
                scale,
            )
            got_o, got_s = out.index_select(0, rows), lse.index_select(0, rows)
            _merge(got_o, got_s, o[:, 0], s[:, 0])
            out.index_copy_(0, rows, got_o)
            lse.index_copy_(0, rows, got_s)

    # one copy into (B, L, Hq, D), the layout the model consumes next: the returned
    # (B, Hq, L, D) view is its transpose, so the caller's `.transpose(1, 2)` is free
    out = out.reshape(b, mh, nb, rep, block, d).permute(0, 2, 4, 1, 3, 5)
    out = out.reshape(b, nb * block, hq, d)[:, :length]
    return out.transpose(1, 2)


def _edge_block(
    out: torch.Tensor,
    lse: torch.Tensor,
    qrows: torch.Tensor,
    kflat: torch.Tensor,
    vflat: torch.Tensor,
    base: torch.Tensor,
    nb: int,
    edge: int,
    block: int,
    scale: float,
) -> None:
    """Merge the partially visible block `edge` blocks back (key c > query offset a) into
    every row that has one: rows ``edge … nb-1`` of each (batch, head) group, whose edge
    blocks are key blocks ``0 … nb-1-edge`` of the group's KV head, so queries, keys and
    the running result are all strided views (no gather, no write-back). The fused kernel
    takes the within-block mask; the last query of a block sees none of it (lse −inf,
    weight 0 in the merge)."""
    if nb <= edge:
        return
    groups, m, d = out.shape[0] // nb, out.shape[1], out.shape[2]
    kv_of_group = base[::nb] // nb  # flat KV head of each group's rows
    kv = [t.view(-1, nb, block, d) for t in (kflat, vflat)]
    if not torch.equal(kv_of_group, torch.arange(kv[0].shape[0])):
        kv = [t.index_select(0, kv_of_group) for t in kv]  # query-head selections share
    k, v = (t[:, : nb - edge] for t in kv)  # (groups, nb - edge, block, d)
    q = qrows.view(groups, nb, m, d)[:, edge:]
    offset = torch.arange(m) % block
    hidden = torch.zeros(m, block).masked_fill_(
        torch.arange(block)[None, :] <= offset[:, None], float("-inf")
    )
    if q.device.type == "cpu":
        o, s = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=hidden.to(q.dtype), scale=scale
        )
    else:
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale) + hidden
        o = torch.matmul(torch.softmax(s, -1).nan_to_num_(0.0), v)
        s = s.logsumexp(-1)
    blind = offset == block - 1  # queries that see no key of the edge block
    s[..., blind] = float("-inf")
    o[..., blind, :] = 0.0
    _merge(out.view(groups, nb, m, d)[:, edge:], lse.view(groups, nb, m)[:, edge:], o, s)


def sliding_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int,
    block: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact causal sliding-window attention (key j visible to query i iff
    ``i − window < j ≤ i``, transformers' convention) computing only the band's blocks;
    `window` must be a multiple of `block`. Returns ``(B, Hq, L, D)``."""
    if window % block:
        raise ValueError(f"window {window} is not a multiple of block {block}")
    nb = n_blocks(query.shape[2], block)
    i = torch.arange(nb)
    edge = window // block
    band = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < edge)
    return block_sparse_attention(query, key, value, band, block, scale, edge=edge)


def _merge(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, s: torch.Tensor) -> None:
    """Fold a partial attention result (`o`, log-sum-exp `s`) over further keys into
    (`out`, `lse`) in place: both are softmax averages, reweighted by their shares of the
    combined normaliser ``exp(lse) + exp(s)``."""
    total = torch.logaddexp(lse, s)
    out.mul_((lse - total).exp_()[..., None]).addcmul_(o, (s - total).exp_()[..., None])
    lse.copy_(total)


def masked_dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: torch.Tensor,
    block: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference: dense attention with the block mask expanded to tokens (tests only)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, 1) for t in (key, value))
    length = query.shape[2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if block_mask.dim() == 4 and block_mask.shape[1] not in (1, query.shape[1]):
        block_mask = block_mask.repeat_interleave(groups, 1)  # one mask per KV group
    allowed = expand_blocks(block_mask, length, block)
    scores = (query @ key.transpose(-1, -2)) * scale
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ value
