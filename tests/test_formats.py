"""Pack / unpack round trips of every weight format, as properties over shapes,
sparsities, N:M patterns and kinds, plus hand-checked bytes and error cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsellm.errors import SparseLLMError
from sparsellm.formats import (
    KINDS,
    Packed,
    choose_kind,
    concat,
    embed_rows,
    pack,
    quantize_int4,
    quantize_int8,
    unpack,
)

SPARSE = [k for k in KINDS if k.startswith("sparse-")]


def _weight(seed: int, out: int, inp: int, sparsity: float, nm: tuple[int, int] | None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    if nm is not None:  # keep the n largest of every m consecutive inputs
        n, m = nm
        groups = w.abs().view(out, inp // m, m)
        drop = groups.argsort(dim=2)[:, :, : m - n]
        w = w.view(out, inp // m, m).scatter(2, drop, 0.0).view(out, inp)
    else:
        w[torch.rand(out, inp, generator=g) < sparsity] = 0
    return w


def _tolerance(kind: str, w: torch.Tensor) -> torch.Tensor:
    """Worst-case rounding error per weight: half a quantization step (int4: a whole one
    where a weight clamps at q = 7)."""
    base = kind.removeprefix("sparse-")
    if base == "fp32":
        return torch.zeros_like(w)
    if base == "bf16":
        return w.abs() * 2**-8
    if base == "int8":
        return (w.abs().amax(1, keepdim=True) / 127 / 2).expand_as(w) * 1.0001
    _, scale = quantize_int4(w, 32)
    d = scale.t().repeat_interleave(32, dim=1)[:, : w.shape[1]]
    # a weight past 7.5 steps (the largest one's opposite) clamps to 7: up to one step off
    return torch.where(w / d > 7.5, d.abs(), d.abs() / 2) * 1.0001


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    out16=st.integers(1, 6),
    inp=st.integers(1, 70),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.95, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_within_half_a_step_and_zeros_stay_zero(
    kind: str, out16: int, inp: int, sparsity: float, seed: int
) -> None:
    w = _weight(seed, 16 * out16, inp, sparsity, None)
    p = pack(w, kind, group=32)
    back = unpack(p)
    assert back.shape == w.shape
    assert bool((back[w == 0] == 0).all()), "a pruned weight came back nonzero"
    assert bool(((back - w).abs() <= _tolerance(kind, w)).all())
    again = Packed.from_parts(p.meta(), p.tensors())  # what a checkpoint stores suffices
    assert torch.equal(unpack(again), back)


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(SPARSE),
    nm=st.sampled_from([(2, 4), (4, 8), (1, 4)]),
    out16=st.integers(1, 4),
    groups=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_nm_patterns_pack_as_bitmasks(
    kind: str, nm: tuple[int, int], out16: int, groups: int, seed: int
) -> None:
    w = _weight(seed, 16 * out16, groups * nm[1], 0.0, nm)
    p = pack(w, kind, group=32)
    assert torch.equal(unpack(p) != 0, w != 0) or kind == "sparse-int4"  # int4 may round to 0
    assert bool((unpack(p)[w == 0] == 0).all())


def test_sparse_bytes_hand_checked() -> None:
    """A 32x64 weight at exactly 50%: 1024 int8 values + 32 pad, a 64x4-byte mask, 64x1
    offsets, 32 scales."""
    w = torch.ones(32, 64)
    w[:, ::2] = 0
    p = pack(w, "sparse-int8")
    assert p.values.numel() == 32 * 64 // 2 + 32
    assert p.mask.shape == (64, 4) and p.offsets.shape == (64, 1)
    assert p.nbytes == (1024 + 32) + 64 * 4 + 64 * 8 + 32 * 4
    # row i of Wᵀ is input i: even inputs are all zero, odd ones all kept
    assert p.mask[0].tolist() == [0, 0, 0, 0] and p.mask[1].tolist() == [255] * 4
    assert p.offsets[:4, 0].tolist() == [0, 0, 32, 32]


def test_quantizers_hand_checked() -> None:
    q, s = quantize_int8(torch.tensor([[1.27, -0.635, 0.0]]))
    assert q.tolist() == [[127, -64, 0]] and s.tolist() == pytest.approx([0.01])
    # per group of 2: the largest |w| (the first of a tie) is q = -8, scale = w / -8;
    # -0.3125 / -0.125 = 2.5 rounds to even (2); 1.0 / 0.125 = 8 clamps to 7
    q4, s4 = quantize_int4(torch.tensor([[1.0, -0.3125, -1.0, 1.0, 0.0, 0.0]]), group=2)
    assert q4.tolist() == [[-8, 2, -8, 7, 0, 0]]
    assert s4.flatten().tolist() == [-0.125, 0.125, 1.0]


def test_concat_keeps_stored_values() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 40, generator=g), torch.randn(16, 40, generator=g)
    a[a.abs() < 0.5] = 0
    for kind in KINDS:
        pa, pb = pack(a, kind, group=16), pack(b, kind, group=16)
        both = concat([pa, pb])
        assert torch.equal(unpack(both), torch.cat([unpack(pa), unpack(pb)]))


def test_embed_rows_equal_unpacked_rows() -> None:
    w = torch.randn(64, 24)
    ids = torch.tensor([[3, 0, 63], [5, 5, 1]])
    for kind in ("fp32", "bf16", "int8", "int4", "sparse-int8"):
        p = pack(w, kind, group=8)
        assert torch.equal(embed_rows(p, ids), unpack(p)[ids])


def test_choose_kind_uses_the_bitmask_only_where_smaller() -> None:
    dense, half = torch.randn(32, 32), torch.randn(32, 32)
    half[:, ::2] = 0
    assert choose_kind("sparse-int8", dense) == "int8"
    assert choose_kind("sparse-int8", half) == "sparse-int8"
    assert choose_kind("sparse-int8", half, head=True) == "int8"
    assert choose_kind("int4", dense, head=True) == "int8"  # the head keeps 8 bits


def test_corrupt_parts_fail_in_one_line() -> None:
    w = torch.randn(32, 16)
    w[w.abs() < 0.7] = 0
    p = pack(w, "sparse-int8")
    parts = p.tensors()
    bad_mask = parts["mask"].clone()
    bad_mask[0, 0] ^= 1  # one flipped bit: the offsets no longer agree
    with pytest.raises(SparseLLMError, match=r"offsets disagree|values"):
        Packed.from_parts(p.meta(), {**parts, "mask": bad_mask})
    with pytest.raises(SparseLLMError, match="values"):
        Packed.from_parts(p.meta(), {**parts, "values": parts["values"][:-5]})
    with pytest.raises(SparseLLMError, match="unknown weight kind"):
        Packed.from_parts({**p.meta(), "kind": "sparse-fp8"}, parts)
    with pytest.raises(SparseLLMError, match="scale"):
        Packed.from_parts({**p.meta(), "shape": [16, 32]}, parts)
    with pytest.raises(SparseLLMError, match="out % 16"):
        pack(torch.randn(20, 8), "sparse-int8")
