"""y = W[:, idx] x[idx] on CPU without reading the skipped columns of W.

Decode at batch 1 is bound by reading weights from memory (the torch profiler on the
default model: 84% of decode time in `aten::mm`, one call per projection per token),
so skipping an input channel pays only if its whole column of W is never loaded. We
therefore keep Wᵀ, shape (in, out), contiguous: the column for input channel i is one
contiguous row of Wᵀ, and y = Σ_{i in idx} x_i Wᵀ[i] is exactly what
`torch.nn.functional.embedding_bag(mode="sum", per_sample_weights=...)` computes, in a
vectorised C++ loop that touches only the selected rows.

`embedding_bag` parallelises over bags, not within one, so a single token would run on
one core. We split every row of Wᵀ into `chunks` contiguous pieces (a free view of the
same memory: (in, out) -> (in * chunks, out / chunks)) and give each piece its own bag,
so `chunks` threads share one token. Measured here (2 cores, weights streamed from DRAM,
30 distinct matrices of 576x3072): `F.linear` 616 us/matrix, this path with every column
kept 355 us (so it is also our dense decode path), 184 us at 50% skipped.
That path still costs ~9 ATen ops per projection (abs, gt, nonzero, gather, index
arithmetic, embedding_bag), and at ~4 us of dispatch each the overhead ate most of the
saving on the default model. `native_kernel()` therefore compiles a small C++ extension
(`csrc/runtime.cpp`: threshold, select and row-skipping GEMV over any packed weight
format in one call) the first time it is needed, with the machine's compiler, into the
sparsellm cache. It is compiled for plain x86-64 and picks its AVX2+FMA kernels (and
AVX-512 for dense weights, VBMI2 expand-loads for bitmask weights) at run time when the
CPU has them. Where it has AVX-512 VNNI, int8 weights multiply int8 activations
(`quantized_activations`: per 32 kept channels, as llama.cpp's Q8_0 does);
`SPARSELLM_ISA=avx512` keeps fp32 activations, `avx2` or `portable` forces the narrower
kernels. Without a
compiler it warns once and the pure-torch path is used; `SPARSELLM_NATIVE=0` forces that
path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sparsellm.formats import KINDS, Packed

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "runtime.cpp"


def masked_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The definition: the dense product with skipped inputs zeroed. Used by tests and
    as the fallback when the fast path does not apply."""
    return F.linear(x * mask, weight, bias)


def quantized_activations(x: torch.Tensor, keep: torch.Tensor, group: int = 32) -> torch.Tensor:
    """The activations the native int8 kernels multiply on CPUs with AVX-512 VNNI: each
    row's kept values, in channel order, quantized per `group` of them to int8
    (symmetric, q = round-half-even(v * 127 / max |v|)) and scaled back (q * max |v| /
    127); skipped channels are zero. The fp32 arithmetic is the extension's, so the
    kernels' results equal the masked product of these up to summation order."""
    out = torch.zeros_like(x)
    for r in range(x.shape[0]):
        idx = keep[r].nonzero().view(-1)
        for g in range(0, len(idx), group):
            sel = idx[g : g + group]
            v = x[r, sel]
            amax = v.abs().max()
            if amax > 0:
                out[r, sel] = torch.round(v * (127.0 / amax)) * (amax / 127.0)
    return out


def pick_chunks(out_features: int, threads: int | None = None) -> int:
    """Largest chunk count <= 2 x threads (and <= 8) that divides `out_features`.

    More bags than threads balances uneven rows; beyond ~8 the per-bag overhead wins.
    """
    limit = min(8, 2 * (threads or torch.get_num_threads()))
    return max(c for c in range(1, limit + 1) if out_features % c == 0)


@dataclass
class ColumnMajor:
    """Wᵀ as (in * chunks, out / chunks): row i * chunks + c is piece c of column i of W."""

    table: torch.Tensor
    in_features: int
    out_features: int
    chunks: int
    bias: torch.Tensor | None = None
    dense_bags: torch.Tensor | None = None  # bag indices with every column kept, built once

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, chunks: int | None = None
    ) -> ColumnMajor:
        """Copy an (out, in) weight into the column-major chunked layout."""
        out_f, in_f = weight.shape
        c = chunks or pick_chunks(out_f)
        if out_f % c:
            raise ValueError(f"chunks={c} must divide out_features={out_f}")
        table = weight.detach().t().contiguous().view(in_f * c, out_f // c)
        b = None if bias is None else bias.detach().clone()
        return cls(table, in_f, out_f, c, b)


def _bags(idx: torch.Tensor, weights: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """(b, k) channel indices and input values -> (b * chunks, k) bag indices and weights.

    Batch 1, the decode hot path, takes two cheap ops (one add, one expand view): per-call
    op count matters as much as bandwidth at ~4 us of dispatch per op.
    """
    b, k = idx.shape
    offs = torch.arange(chunks, dtype=idx.dtype).view(chunks, 1)
    if b == 1:
        return torch.add(offs, idx, alpha=chunks), weights.expand(chunks, k)
    bag_idx = (idx[:, None, :] * chunks + offs[None]).reshape(b * chunks, k)
    bag_w = weights[:, None, :].expand(b, chunks, k).reshape(b * chunks, k)
    return bag_idx, bag_w


def gather_matvec(values: torch.Tensor, cm: ColumnMajor, idx: torch.Tensor) -> torch.Tensor:
    """y[r] = Σ_j values[r, j] · W[:, idx[r, j]] (+ bias), reading only those columns of W.

    `idx` is (b, k) int64 channel indices per row and `values` (b, k) the inputs at those
    channels (``x.gather(1, idx)``; padded entries must carry 0, see `select_channels`).
    """
    if idx.shape[1] == 0:  # nothing kept: embedding_bag rejects empty fixed-size bags
        y = values.new_zeros(idx.shape[0], cm.out_features)
        return y if cm.bias is None else y + cm.bias
    bag_idx, bag_w = _bags(idx, values, cm.chunks)
    y = F.embedding_bag(bag_idx, cm.table, per_sample_weights=bag_w, mode="sum")
    y = y.view(idx.shape[0], cm.out_features)
    return y if cm.bias is None else y + cm.bias


def dense_matvec(x: torch.Tensor, cm: ColumnMajor) -> torch.Tensor:
    """Every column kept: our dense decode path, the same kernel so the ratio is fair."""
    b = x.shape[0]
    if cm.dense_bags is None or cm.dense_bags.shape[0] != b * cm.chunks:
        cm.dense_bags = _bags(torch.arange(cm.in_features).expand(b, -1), x, cm.chunks)[0]
    if b == 1:
        w = x.expand(cm.chunks, -1)
    else:
        w = x[:, None, :].expand(-1, cm.chunks, -1).reshape(cm.dense_bags.shape)
    y = F.embedding_bag(cm.dense_bags, cm.table, per_sample_weights=w, mode="sum")
    y = y.view(b, cm.out_features)
    return y if cm.bias is None else y + cm.bias


def select_channels(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of kept channels per row, padded to the longest row, and x with padding zeroed.

    `keep` is a (b, in) bool mask. For batch 1 this is a plain `nonzero`; for larger
    batches the rows are padded with channels whose input is set to zero, so the work
    per token is the maximum kept count in the batch (small batches only gain when
    their tokens keep similar numbers of channels).
    """
    if x.shape[0] == 1:
        return keep[0].nonzero().view(1, -1), x
    k = int(keep.sum(1).max())
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    return idx, x * keep


def _build_tag() -> str:
    """Build-directory tag: the source and the torch it is built against (the binary is
    portable across CPUs; the ISA is chosen at run time)."""
    text = SOURCE.read_text() + torch.__version__
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@functools.cache
def native_kernel() -> Any | None:
    """The compiled runtime extension, or None (one warning) when it cannot build.

    Its kernels follow `SPARSELLM_ISA` (auto, avx512vnni, avx512, avx2, portable; default
    auto: the widest the CPU has)."""
    if os.environ.get("SPARSELLM_NATIVE", "1") == "0":
        return None
    from sparsellm.models.load import cache_root

    try:
        from torch.utils.cpp_extension import load

        build = cache_root() / "kernels" / _build_tag()
        build.mkdir(parents=True, exist_ok=True)
        ext = load(
            name="sparsellm_runtime",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers, ...: fall back, say so once
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("sparsellm: native decode kernel unavailable (%s); using pure torch", first)
        return None
    ext.set_isa(os.environ.get("SPARSELLM_ISA", "auto"))
    return ext


KIND_CODES = {kind: code for code, kind in enumerate(KINDS)}


def native_weight(ext: Any, p: Packed, tiles: bool = False) -> Any:
    """The extension's PackedWeight over `p`'s tensors (shared, not copied).

    `tiles` (for a weight whose decode calls keep every input channel): where the VNNI
    kernels are in use, int8 and bitmask-int8 are also laid out as those kernels read
    them (tiles of 32 input rows times 16 outputs, 4 rows interleaved per 32-bit lane,
    each tile's mask beside its values), `extra_bytes` of them; so is int4 whose group is
    a multiple of 32 (two nibbles a byte: its dense calls then multiply int8 activations,
    as int8's do, where its rows multiply fp32 ones). `release_rows()` then drops the row
    layout, which only calls that skip input channels and the other kernels need (see
    `Proj.bind`)."""
    out, inp = p.shape
    return ext.PackedWeight(
        KIND_CODES[p.kind],
        out,
        inp,
        p.group,
        p.values,
        EMPTY if p.scale is None else p.scale,
        EMPTY if p.mask is None else p.mask,
        EMPTY if p.offsets is None else p.offsets,
        tiles,
    )


EMPTY = torch.empty(0)  # "no tensor" for the native calls
