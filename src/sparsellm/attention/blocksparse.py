"""Block-sparse causal attention on CPU that computes only the selected key blocks.

For a chunk of query blocks we gather just their selected K/V blocks (padded to the
chunk's largest selection), run one batched matmul for the scores, mask the padding and
the causal triangle of the diagonal block, take one numerically stable softmax over the
gathered keys and one batched matmul with V. Work and memory scale with the number of
selected blocks; no ``L × L`` matrix exists at any point. Because a query block sees all
its selected keys in one gather, a single max-subtracted softmax is exact (the online
rescaling of flash attention is only needed when keys arrive in several passes).

GQA is handled by indexing the shared K/V head of each query head, never by repeating K/V.
`masked_dense_attention` is the reference the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsellm.attention.patterns import expand_blocks, n_blocks

KEYS_PER_CHUNK = 1 << 16  # gathered keys per (batch, head) and chunk: bounds temporary memory


def _selection(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a block mask: selected key-block indices first (ascending), and counts."""
    counts = mask.sum(-1)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    return order, counts


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: torch.Tensor,
    block: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention restricted to `block_mask`; returns ``(B, Hq, L, D)``.

    `query` is ``(B, Hq, L, D)``, `key`/`value` ``(B, Hkv, L, D)`` with ``Hq % Hkv == 0``;
    `block_mask` is ``(nb, nb)`` or ``(B | 1, H, nb, nb)`` with H in {1, Hkv, Hq} and must
    keep each diagonal block. A mask shared by a KV group (H <= Hkv) gathers each K/V block
    once for the whole group and stacks the group's queries into one matmul.
    """
    b, hq, length, d = query.shape
    hkv = key.shape[1]
    nb = n_blocks(length, block)
    scale = d**-0.5 if scale is None else scale
    mask = block_mask if block_mask.dim() == 4 else block_mask[None, None]
    mh = hq if mask.shape[1] == hq else hkv  # heads that own a selection
    rep = hq // mh  # query heads stacked per selection
    mask = mask.expand(b, mh, nb, nb)
    pad = nb * block - length
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    kb = key.reshape(b, hkv * nb, block, d)
    vb = value.reshape(b, hkv * nb, block, d)
    # (B, mh, nb, rep*block, D): a selection's query heads side by side in the row dim
    qb = query.reshape(b, mh, rep, nb, block, d).transpose(2, 3).reshape(b, mh, nb, rep * block, d)
    order, counts = _selection(mask)
    kv_head = (torch.arange(mh) // (mh // hkv))[None, :, None, None]
    tok = torch.arange(block)
    out = torch.empty_like(qb)
    batch = torch.arange(b)[:, None]
    start = 0
    while start < nb:
        # grow the chunk while its padded gather stays under the key budget
        stop, widest = start + 1, int(counts[..., start].max())
        while stop < nb:
            w = max(widest, int(counts[..., stop].max()))
            if (stop + 1 - start) * w * block > KEYS_PER_CHUNK:
                break
            widest, stop = w, stop + 1
        g, rows = stop - start, slice(start, stop)
        sel = order[:, :, rows, :widest]  # (B, mh, g, w) key-block ids
        flat = (kv_head * nb + sel).reshape(b, -1)
        k = kb[batch, flat].reshape(b, mh, g, widest * block, d)
        v = vb[batch, flat].reshape(b, mh, g, widest * block, d)
        scores = torch.matmul(qb[:, :, rows], k.transpose(-1, -2)).mul_(scale)
        q_pos = (torch.arange(start, stop)[:, None] * block + tok).repeat(1, rep)[..., None]
        k_pos = (sel[..., None] * block + tok).reshape(b, mh, g, 1, widest * block)
        valid = torch.arange(widest) < counts[:, :, rows, None]
        allowed = (k_pos <= q_pos) & valid.repeat_interleave(block, -1)[..., None, :]
        scores.masked_fill_(~allowed, float("-inf"))
        out[:, :, rows] = torch.matmul(torch.softmax(scores, dim=-1), v)
        start = stop
    out = out.reshape(b, mh, nb, rep, block, d).transpose(2, 3).reshape(b, hq, nb * block, d)
    return out[:, :, :length]


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
