"""Compressed weight formats: pack a linear's weight, unpack it, count its bytes.

Why this layout: batch-1 decode reads every weight once per token, so its speed is set by
bytes per weight. Every format stores the weight transposed, Wᵀ (in, out), because the
runtime accumulates y += x_i · Wᵀ[i] over input channels: a channel that activation
sparsity skips (TEAL, WINA) is then one row never read, and a row's outputs are
contiguous for SIMD. Per-output scales (int8) are applied once at the end.

Kinds (one per tensor; a checkpoint format picks one per tensor, see `choose_kind`):

- ``fp32`` / ``bf16``: values (in, out).
- ``int8``: symmetric per output channel, values int8 (in, out), scale fp32 (out,).
  W[o, i] = values[i, o] · scale[o]; zeros stay exactly zero.
- ``int4``: group-wise along the input (FineQuant-style), q in [-8, 7] stored q + 8 as
  nibbles, scale fp32 (ceil(in / group), out), signed: the group's largest-magnitude
  weight is q = -8 exactly (llama.cpp's Q4_0 rule), so all 16 levels are used. Within
  each row, 16 outputs share 8 bytes: byte k of a block holds output k (low nibble) and
  output k + 8 (high), so one 8-byte load widens to two 8-lane vectors.
- ``sparse-*``: a bitmask per row of Wᵀ, mask uint8 (in, out / 8), bit k of byte j marks
  output 8j + k; the kept values packed row-major in a 1-D tensor (bf16, int8, or int4
  nibbles), scales as the dense kind, and offsets int64 (in, ceil(out / CHUNK)): where
  row i's values for output chunk c start, so threads can split the outputs. Values are
  padded by `PAD` zeros because the kernels load 16 bytes at a time.

N:M sparsity (2:4, 4:8) is stored as a bitmask too: for 2:4 a 2-bit in-group index per
kept value costs 1 bit per weight, exactly what the bitmask costs, and one kernel serves
both. All functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sparsellm.errors import SparseLLMError

KINDS = ("fp32", "bf16", "int8", "int4", "sparse-bf16", "sparse-int8", "sparse-int4")
CHUNK = 2048  # outputs per sparse offset chunk (a multiple of 16)
PAD = 32  # zero padding after packed values, in bytes
DEFAULT_GROUP = 128

_VALUE_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def _pad(base: str) -> int:
    """Zero values appended after packed sparse values: PAD bytes' worth."""
    return PAD // 2 if base == "bf16" else PAD


def base_kind(kind: str) -> str:
    """The value type of a kind: 'sparse-int8' -> 'int8'."""
    return kind.removeprefix("sparse-")


@dataclass
class Packed:
    """One packed weight of logical shape (out, in)."""

    kind: str
    shape: tuple[int, int]
    values: torch.Tensor
    scale: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    group: int = 0
    parts: tuple[str, ...] = field(default=(), repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (what the runtime reads per token, padding aside)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored parts by name (values, scale, mask, offsets; absent ones left out)."""
        named = {
            "values": self.values,
            "scale": self.scale,
            "mask": self.mask,
            "offsets": self.offsets,
        }
        return {k: v for k, v in named.items() if v is not None}

    def meta(self) -> dict[str, object]:
        """What `from_parts` needs besides the tensors (goes to the checkpoint's index)."""
        return {"kind": self.kind, "shape": list(self.shape), "group": self.group}

    @classmethod
    def from_parts(cls, meta: dict[str, object], parts: dict[str, torch.Tensor]) -> Packed:
        """Rebuild from stored parts, checking every dtype and shape (a corrupt or
        mismatched file fails here with one line, not later inside a kernel)."""
        try:
            kind = str(meta["kind"])
            out, inp = (int(v) for v in meta["shape"])  # type: ignore[union-attr]
            group = int(meta.get("group", 0))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            raise SparseLLMError(f"bad packed-weight metadata: {meta!r}") from None
        if kind not in KINDS:
            raise SparseLLMError(f"unknown weight kind {kind!r} (known: {', '.join(KINDS)})")
        p = cls(kind, (out, inp), parts.get("values", torch.empty(0)), parts.get("scale"),
                parts.get("mask"), parts.get("offsets"), group)  # fmt: skip
        p.validate()
        return p

    def validate(self) -> None:
        """Raise SparseLLMError unless every part has the dtype and shape `kind` implies."""
        out, inp = self.shape
        base = base_kind(self.kind)
        sparse = self.kind.startswith("sparse-")

        def need(name: str, t: torch.Tensor | None, dtype: torch.dtype, shape: tuple) -> None:
            if t is None or t.dtype != dtype or tuple(t.shape) != shape:
                got = None if t is None else (str(t.dtype), tuple(t.shape))
                raise SparseLLMError(
                    f"{self.kind} weight {out}x{inp}: part {name!r} should be "
                    f"{dtype} {shape}, found {got}"
                )

        vdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8,
                  "int4": torch.uint8}[base]  # fmt: skip
        if base == "int8":
            need("scale", self.scale, torch.float32, (out,))
        if base == "int4":
            if self.group <= 0:
                raise SparseLLMError(f"{self.kind} weight needs a positive group, not {self.group}")
            need("scale", self.scale, torch.float32, (-(-inp // self.group), out))
        if not sparse:
            if base == "int4":
                if out % 16:
                    raise SparseLLMError(f"int4 needs out % 16 == 0, not {out}")
                need("values", self.values, vdtype, (inp, out // 2))
            else:
                need("values", self.values, vdtype, (inp, out))
            return
        if out % 16:
            raise SparseLLMError(f"{self.kind} needs out % 16 == 0, not {out}")
        need("mask", self.mask, torch.uint8, (inp, out // 8))
        need("offsets", self.offsets, torch.int64, (inp, -(-out // CHUNK)))
        nnz = int(_popcount(self.mask).sum())
        stored = nnz if base != "int4" else (nnz + 1) // 2
        need("values", self.values, vdtype, (stored + _pad(base),))
        if not torch.equal(self.offsets, _offsets(_unpack_bits(self.mask, out))):
            raise SparseLLMError(f"{self.kind} weight {out}x{inp}: offsets disagree with the mask")


def _popcount(mask: torch.Tensor) -> torch.Tensor:
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
    return table[mask.long()]


def _pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """(in, out) bool -> (in, out / 8) uint8, bit k of byte j = column 8j + k."""
    return torch.from_numpy(np.packbits(keep.numpy(), axis=1, bitorder="little"))


def _unpack_bits(mask: torch.Tensor, out: int) -> torch.Tensor:
    bits = np.unpackbits(mask.numpy(), axis=1, bitorder="little")[:, :out]
    return torch.from_numpy(bits.astype(bool))


def _offsets(keep: torch.Tensor) -> torch.Tensor:
    """Start of each (row, output chunk) in the row-major stream of kept values."""
    inp, out = keep.shape
    n_chunks = -(-out // CHUNK)
    pad = n_chunks * CHUNK - out
    counts = torch.nn.functional.pad(keep.long(), (0, pad)).view(inp, n_chunks, CHUNK).sum(2)
    flat = counts.flatten()
    return (torch.cumsum(flat, 0) - flat).view(inp, n_chunks)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of w (out, in): (q (out, in), scale (out,))."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise int4 (groups of `group` inputs per output): q in [-8, 7] (out, in) int8
    and scale (ceil(in / group), out).

    Why a signed scale: with the group's largest-magnitude weight m at q = -8 (scale
    m / -8) the 16 levels span [-8, 7]·|scale| on m's side, where a symmetric [-7, 7]
    grid leaves one level unused; on the default model this took int4 g128 perplexity
    from +56% to +34% over fp32 (bench/runtime.py). A weight that lands on +8 clamps to 7.
    """
    w = w.detach().float()
    out, inp = w.shape
    n_groups = -(-inp // group)
    padded = torch.nn.functional.pad(w, (0, n_groups * group - inp)).view(out, n_groups, group)
    m = padded.gather(2, padded.abs().argmax(dim=2, keepdim=True)).squeeze(2)
    scale = torch.where(m != 0, m / -8.0, torch.ones_like(m))
    q = torch.round(padded / scale[:, :, None]).clamp_(-8, 7).to(torch.int8)
    return q.view(out, -1)[:, :inp], scale.t().contiguous()


def _int4_scale_full(scale: torch.Tensor, inp: int, group: int) -> torch.Tensor:
    """(groups, out) -> (in, out): each row's scale."""
    return scale.repeat_interleave(group, dim=0)[:inp]


def _nibbles_dense(q: torch.Tensor) -> torch.Tensor:
    """q (in, out) in [-8, 7] -> (in, out / 2) uint8 in the 16-output block order."""
    inp, out = q.shape
    u = (q.to(torch.int16) + 8).view(inp, out // 16, 2, 8)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).to(torch.uint8).view(inp, out // 2)


def _dense_nibbles(b: torch.Tensor) -> torch.Tensor:
    """Inverse of `_nibbles_dense`: (in, out / 2) uint8 -> q (in, out) int16."""
    inp, half = b.shape
    u = b.to(torch.int16).view(inp, half // 8, 1, 8)
    q = torch.cat([u & 15, u >> 4], dim=2)
    return q.view(inp, half * 2) - 8


def _nibble_stream(q: torch.Tensor) -> torch.Tensor:
    """1-D q in [-8, 7] -> two per byte (first value in the low nibble)."""
    u = (q.to(torch.int16) + 8).flatten()
    if u.numel() % 2:
        u = torch.cat([u, u.new_full((1,), 8)])
    u = u.view(-1, 2)
    return (u[:, 0] | (u[:, 1] << 4)).to(torch.uint8)


def _stream_nibbles(b: torch.Tensor, n: int) -> torch.Tensor:
    u = b.to(torch.int16)
    return torch.stack([u & 15, u >> 4], dim=1).flatten()[:n] - 8


def pack(weight: torch.Tensor, kind: str, group: int = DEFAULT_GROUP) -> Packed:
    """Pack an (out, in) weight as `kind`. Sparse kinds keep exactly the nonzeros of
    `weight` (a kept weight that quantizes to 0 stays in the mask with value 0)."""
    if kind not in KINDS:
        raise SparseLLMError(f"unknown weight kind {kind!r} (known: {', '.join(KINDS)})")
    if weight.dim() != 2:
        raise SparseLLMError(f"only 2-D weights pack, not shape {tuple(weight.shape)}")
    w = weight.detach().float().cpu()
    out = w.shape[0]
    base = base_kind(kind)
    scale = None
    g = group if base == "int4" else 0
    if base == "int8":
        q, scale = quantize_int8(w)
        t = q.t().contiguous()
    elif base == "int4":
        q, scale = quantize_int4(w, group)
        t = q.t().contiguous()
    elif base == "bf16":
        t = w.t().contiguous().to(torch.bfloat16)
    else:
        t = w.t().contiguous()
    keep = None
    if kind.startswith("sparse-"):
        if out % 16:
            raise SparseLLMError(f"{kind} needs out % 16 == 0, not {out}")
        keep = w.t() != 0
    return _from_grid(kind, t, keep, scale, g)


def unpack(p: Packed) -> torch.Tensor:
    """The fp32 (out, in) weight that `p` stores (dequantized)."""
    inp = p.shape[1]
    base = base_kind(p.kind)
    if p.kind.startswith("sparse-"):
        t = _grid(p)[0].float()  # zeros where nothing is kept
    elif base == "int4":
        t = _dense_nibbles(p.values).float()
    else:
        t = p.values.float()
    if base == "int8":
        t = t * p.scale[None, :]
    elif base == "int4":
        t = t * _int4_scale_full(p.scale, inp, p.group)
    return t.t().contiguous()


def _grid(p: Packed) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored values on the (in, out) grid, still quantized, and the kept mask (sparse)."""
    out, inp = p.shape
    base = base_kind(p.kind)
    if not p.kind.startswith("sparse-"):
        return (_dense_nibbles(p.values) if base == "int4" else p.values), None
    keep = _unpack_bits(p.mask, out)
    nnz = int(keep.sum())
    vals = _stream_nibbles(p.values, nnz) if base == "int4" else p.values[:nnz]
    grid = torch.zeros(inp, out, dtype=vals.dtype)
    grid[keep] = vals
    return grid, keep


def _from_grid(kind: str, grid: torch.Tensor, keep: torch.Tensor | None,
               scale: torch.Tensor | None, group: int) -> Packed:  # fmt: skip
    inp, out = grid.shape
    base = base_kind(kind)
    if keep is None:
        values = _nibbles_dense(grid) if base == "int4" else grid.contiguous()
        p = Packed(kind, (out, inp), values, scale, group=group)
    else:
        kept = grid[keep]
        if base == "int4":
            values = torch.cat([_nibble_stream(kept), torch.zeros(_pad(base), dtype=torch.uint8)])
        else:
            values = torch.cat([kept, torch.zeros(_pad(base), dtype=kept.dtype)])
        p = Packed(kind, (out, inp), values, scale, _pack_bits(keep), _offsets(keep), group)
    p.validate()
    return p


def concat(packs: list[Packed]) -> Packed:
    """Stack packed weights along the output (q|k|v, gate|up) without re-quantizing:
    the stored values and scales move as they are, so the result dequantizes to the
    concatenation of the parts exactly."""
    if len(packs) == 1:
        return packs[0]
    first = packs[0]
    if any(p.kind != first.kind or p.shape[1] != first.shape[1] or p.group != first.group
           for p in packs):  # fmt: skip
        raise SparseLLMError("only weights of one kind, input width and group concatenate")
    grids = [_grid(p) for p in packs]
    grid = torch.cat([g for g, _ in grids], dim=1)
    keep = None if grids[0][1] is None else torch.cat([k for _, k in grids], dim=1)
    scale = None
    if first.scale is not None:
        scale = torch.cat([p.scale for p in packs], dim=-1).contiguous()
    return _from_grid(first.kind, grid, keep, scale, first.group)


def embed_rows(p: Packed, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the (vocab, hidden) weight `p` holds (a tied LM head doubles as the
    embedding), dequantized, without unpacking the rest."""
    if p.kind.startswith("sparse-") or base_kind(p.kind) == "int4":
        return unpack(p)[ids]
    flat = ids.reshape(-1)
    rows = p.values.index_select(1, flat).t().float()
    if p.scale is not None:
        rows = rows * p.scale[flat, None]
    # row-major, as an embedding table's rows are (a transposed result would reach the
    # norms' reductions in another order: last-bit differences from the same weights)
    return rows.contiguous().view(*ids.shape, -1)


def choose_kind(fmt: str, weight: torch.Tensor, *, head: bool = False) -> str:
    """The kind a checkpoint format uses for one weight.

    Dense formats use their own kind, except int4 keeps the LM head / embedding at int8
    (as llama.cpp's Q4 files keep the output tensor at 6+ bits: the head's error goes
    straight into every logit). Sparse formats use the bitmask only where it is smaller
    than the dense kind of the same values, (1 - s)·b + 1/8 < b, so the head and unpruned
    layers stay dense.
    """
    base = base_kind(fmt)
    if head and base == "int4":
        base = "int8"
    if not fmt.startswith("sparse-") or head or weight.shape[0] % 16:
        return base
    b = _VALUE_BYTES[base]
    density = float((weight != 0).float().mean())
    return f"sparse-{base}" if density * b + 0.125 < b else base
