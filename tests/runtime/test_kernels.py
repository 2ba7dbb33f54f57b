"""The gather-GEMV kernel equals the masked dense product it replaces."""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sparsellm.formats import KINDS, pack, unpack
from sparsellm.runtime.kernels import (
    ColumnMajor,
    dense_matvec,
    gather_matvec,
    masked_linear_reference,
    native_weight,
    pick_chunks,
    quantized_activations,
    select_channels,
)
from tests.runtime.helpers import native_isa


@pytest.mark.parametrize(("b", "n_in", "n_out", "bias"), [(1, 64, 96, False), (3, 40, 30, True)])
def test_dense_path_equals_linear(b: int, n_in: int, n_out: int, bias: bool) -> None:
    w = torch.randn(n_out, n_in)
    bvec = torch.randn(n_out) if bias else None
    x = torch.randn(b, n_in)
    cm = ColumnMajor.from_weight(w, bvec)
    torch.testing.assert_close(dense_matvec(x, cm), F.linear(x, w, bvec), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_sparse_path_equals_masked_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b = 1 + seed % 3
    n_in, n_out = 16 + 8 * seed, 12 * (1 + seed)
    w = torch.randn(n_out, n_in, generator=g)
    bias = torch.randn(n_out, generator=g)
    x = torch.randn(b, n_in, generator=g)
    keep = torch.rand(b, n_in, generator=g) > 0.3 + 0.1 * seed  # rows keep different counts
    cm = ColumnMajor.from_weight(w, bias, chunks=[1, 2, 3, 4][seed])
    idx, xz = select_channels(x, keep)
    got = gather_matvec(xz.gather(1, idx), cm, idx)
    torch.testing.assert_close(got, masked_linear_reference(x, w, keep, bias), rtol=1e-5, atol=1e-5)


def test_nothing_kept_gives_bias() -> None:
    w, bias = torch.randn(8, 6), torch.randn(8)
    x = torch.randn(1, 6)
    idx, xz = select_channels(x, torch.zeros(1, 6, dtype=torch.bool))
    got = gather_matvec(xz.gather(1, idx), ColumnMajor.from_weight(w, bias), idx)
    torch.testing.assert_close(got, bias[None])


def test_layout_is_a_view_of_the_transposed_weight() -> None:
    w = torch.arange(12.0).view(3, 4)  # out=3, in=4
    cm = ColumnMajor.from_weight(w, chunks=3)
    # row i*3 + c holds piece c of column i of W; each piece has one element here
    assert cm.table.shape == (12, 1)
    assert cm.table[1 * 3 + 2, 0] == w[2, 1]


def test_pick_chunks_divides() -> None:
    assert pick_chunks(96, threads=2) == 4
    assert pick_chunks(7, threads=2) == 1
    assert 3072 % pick_chunks(3072) == 0


@pytest.fixture(params=["avx512vnni", "avx512", "avx2", "portable"])
def ext(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The native extension with one ISA's kernels (skipped on CPUs without it)."""
    with native_isa(request.param) as mod:
        yield mod


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("seed", "b", "n_in", "n_out"),
    # narrow outputs (threads split the kept rows, some ranges > one 32-row task) and
    # wide ones (threads split the output columns: out >= 2048 per thread), with and
    # without a tail past the last multiple of 8 / 16
    [
        (0, 1, 24, 48),
        (1, 2, 300, 340),
        (2, 3, 517, 96),
        (3, 1, 70, 9000),
        (4, 3, 33, 4999),
        (5, 2, 40, 4864),  # qwen0.5b's MLP width: 2.4 stored offset chunks
    ],
)
def test_native_kernel_equals_masked_reference(
    ext: Any, kind: str, seed: int, b: int, n_in: int, n_out: int
) -> None:
    """Every format on every ISA path computes the masked product of the weight it stores."""
    if (kind.startswith("sparse-") or kind == "int4") and n_out % 16:
        pytest.skip("bitmask and int4 kinds need out % 16 == 0")
    g = torch.Generator().manual_seed(seed)
    w, bias = torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g)
    w[torch.rand(n_out, n_in, generator=g) < 0.5] = 0  # pruned weights
    x, scale = torch.randn(b, n_in, generator=g), torch.rand(n_in, generator=g)
    p = pack(w, kind, group=32)
    nw = native_weight(ext, p, tiles=True)  # int8 / int4 on VNNI: tiles; thresholded: rows
    ref_w = unpack(p)
    # fp32 sums of n_in unit-variance products, added in a different order than BLAS:
    # rounding grows like sqrt(n_in) (2e-5 seen at n_in=517 on an EPYC); a wrong or
    # missed weight would be off by O(1)
    tol = {"rtol": 1e-5, "atol": 5e-6 * n_in**0.5}
    # int8 kinds on VNNI multiply int8 activations, and so do int4's tiles (dense calls):
    # the reference takes the same ones
    a8 = ext.isa() == "avx512vnni" and kind in ("int8", "sparse-int8")
    y, kept = ext.gemv(x, nw, scale, 0.4, bias)
    keep = x.abs() * scale > 0.4
    xk = quantized_activations(x, keep) if a8 else x
    torch.testing.assert_close(y, masked_linear_reference(xk, ref_w, keep, bias), **tol)
    assert kept == int(keep.sum())
    y, kept = ext.gemv(x, nw, torch.empty(0), -1.0, torch.empty(0))  # dense
    a8 |= ext.isa() == "avx512vnni" and kind == "int4"
    assert (nw.extra_bytes > 0) == a8  # the kinds with tiles
    xd = quantized_activations(x, torch.ones_like(keep)) if a8 else x
    torch.testing.assert_close(y, F.linear(xd, ref_w), **tol)
    assert kept == b * n_in
    torch.testing.assert_close(ext.dequantize(nw), ref_w.t(), rtol=0, atol=0)


def test_vnni_int8_kernels_quantize_activations_per_group_of_32_kept_channels() -> None:
    """Hand-checked: weights of scale 1 (each output's largest |w| is 127), activations
    127, -63.5, 1, 0 in the first group (max 127: q = x, -63.5 rounds half to even, to
    -64) and 0.3 alone in the second (q = 127, s = 0.3 / 127). Dense and bitmask int8
    give sum q * w * s, where fp32 activations would give sum x * w."""
    with native_isa("avx512vnni") as mod:
        out = torch.arange(16)
        w = torch.zeros(16, 33)
        w[:, 0] = 127.0
        w[:, 1] = (out % 5 - 2).float()  # -2..2
        w[:, 2] = -(out.float())
        w[:, 5] = 3.0  # times x = 0: nothing
        w[:, 32] = (out % 3 + 1).float()  # 1..3
        x = torch.zeros(1, 33)
        x[0, :3] = torch.tensor([127.0, -63.5, 1.0])
        x[0, 32] = 0.3
        want = 127.0 * 127 - 64 * w[:, 1] + w[:, 2] + 127 * w[:, 32] * (0.3 / 127)
        for kind, tiles in product(("int8", "sparse-int8"), (False, True)):
            p = pack(w, kind)
            assert torch.equal(unpack(p), w)  # integers of scale 1: exact
            nw = native_weight(mod, p, tiles=tiles)
            # 2 groups of 32 rows; bitmask: their masks, the 76 nonzero weights (16 in
            # each of 5 columns but for 3 zeros in column 1 and 1 in column 2), 64 bytes
            # of padding, 2 starts
            tile_bytes = 2 * 16 * 32 if kind == "int8" else 2 * 64 + 76 + 64 + 2 * 8
            assert nw.extra_bytes == (tile_bytes if tiles else 0)
            y, kept = mod.gemv(x, nw, torch.empty(0), -1.0, torch.empty(0))
            assert kept == 33
            torch.testing.assert_close(y[0], want, rtol=1e-6, atol=1e-4)
            assert not torch.allclose(y[0], F.linear(x, w)[0])  # -63.5 became -64


@pytest.mark.parametrize(
    ("seed", "n_in", "n_out"),
    # rows split over threads (with a short last group), outputs split (wide), a tail
    # past the last multiple of 16, and -127 / 127 weights (the +128 offset's edges)
    [(0, 64, 48), (1, 517, 340), (2, 45, 4999), (3, 33, 9000), (4, 70, 4864)],
)
@pytest.mark.parametrize("kind", ["int8", "sparse-int8"])
def test_vnni_int8_tiles_give_the_row_kernels_bits(
    kind: str, seed: int, n_in: int, n_out: int
) -> None:
    """The tiled layout changes how int8 kinds are read, not what is computed: for 1 to
    8 rows (a decode step, a batch, a verification pass) its outputs are bit-identical
    to the row-layout VNNI kernels', and each row's to what it gets alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # outputs >= 2048 per thread split by column (4999, 9000)
    try:
        with native_isa("avx512vnni") as mod:
            g = torch.Generator().manual_seed(seed)
            w = torch.randn(n_out, n_in, generator=g)
            if kind == "sparse-int8":
                if n_out % 16:
                    pytest.skip("bitmask kinds need out % 16 == 0")
                w[torch.rand(n_out, n_in, generator=g) < 0.6] = 0
            w[:, 0] = 127.0 * torch.sign(torch.randn(n_out, generator=g))
            p = pack(w, kind)
            assert {-127, 127} <= set(p.values.unique().tolist())
            rows, tiles = native_weight(mod, p), native_weight(mod, p, tiles=True)
            groups, chunks = -(-n_in // 32), -(-n_out // 16)
            nnz = int((w != 0).sum())
            want_bytes = groups * chunks * (32 * 16 if kind == "int8" else 64 + 8) + (
                0 if kind == "int8" else nnz + 64  # + 64 bytes of padding
            )
            assert tiles.extra_bytes == want_bytes
            bias = torch.randn(n_out, generator=g)
            x = torch.randn(8, n_in, generator=g)
            for b in (1, 3, 8):
                want = mod.gemv(x[:b], rows, torch.empty(0), -1.0, bias)[0]
                got = mod.gemv(x[:b], tiles, torch.empty(0), -1.0, bias)[0]
                assert torch.equal(got, want)
                alone = mod.gemv(x[b - 1 : b], tiles, torch.empty(0), -1.0, bias)[0]
                assert torch.equal(got[b - 1 : b], alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("seed", "n_in", "n_out", "group"),
    # weight groups of 1, 2 and 4 tiles, a short last activation group (517), a short
    # last weight group (300 = 2 x 128 + 44), outputs split over threads (4864)
    [(0, 64, 48, 32), (1, 517, 352, 64), (2, 300, 96, 128), (3, 70, 4864, 128)],
)
def test_vnni_int4_tiles_multiply_int8_activations(
    seed: int, n_in: int, n_out: int, group: int
) -> None:
    """Int4 tiles (group a multiple of 32) on VNNI: each activation group's int32 sum of
    q_x * q_w times the activation scale and the weight group's scale, i.e. the product of
    the quantized activations with the dequantized weight; every row gets the bits it gets
    alone, and the rows' own kernels (a call that skips channels) are unchanged."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with native_isa("avx512vnni") as mod:
            g = torch.Generator().manual_seed(seed)
            w = torch.randn(n_out, n_in, generator=g)
            w[:, 0] = 8.0  # q = 7 and -7 at each group's largest weight
            p = pack(w, "int4", group=group)
            rows, tiles = native_weight(mod, p), native_weight(mod, p, tiles=True)
            assert rows.extra_bytes == 0
            assert tiles.extra_bytes == -(-n_in // 32) * (n_out // 16) * 256
            x = torch.randn(8, n_in, generator=g)
            bias = torch.randn(n_out, generator=g)
            got = mod.gemv(x, tiles, torch.empty(0), -1.0, bias)[0]
            xq = quantized_activations(x, torch.ones_like(x, dtype=torch.bool))
            torch.testing.assert_close(got, F.linear(xq, unpack(p), bias), rtol=1e-5, atol=1e-4)
            fp32 = mod.gemv(x, rows, torch.empty(0), -1.0, bias)[0]
            assert not torch.equal(got, fp32)  # the row kernels multiply fp32 activations
            for b in (1, 3):
                alone = mod.gemv(x[b - 1 : b], tiles, torch.empty(0), -1.0, bias)[0]
                assert torch.equal(got[b - 1 : b], alone)
            scale = torch.rand(n_in, generator=g)
            assert torch.equal(
                mod.gemv(x, tiles, scale, 0.3, bias)[0], mod.gemv(x, rows, scale, 0.3, bias)[0]
            )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["int8", "sparse-int8", "int4"])
def test_released_rows_leave_tiles_that_serve_dense_vnni_calls_only(kind: str) -> None:
    """After `release_rows` a weight keeps its tiles: dense calls and `dequantize` give
    what they gave before, and `tile_rows` the rows of W; a call that skips channels,
    or one on other kernels, is a clear error rather than a read of freed rows."""
    with native_isa("avx512vnni") as mod:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(96, 70, generator=g)
        w[torch.rand(96, 70, generator=g) < 0.5] = 0
        p = pack(w, kind)
        x = torch.randn(3, 70, generator=g)
        with pytest.raises(RuntimeError, match="no tiles"):
            native_weight(mod, p).release_rows()
        nw = native_weight(mod, p, tiles=True)
        dense, deq = mod.gemv(x, nw, torch.empty(0), -1.0, torch.empty(0))[0], mod.dequantize(nw)
        nw.release_rows()
        assert torch.equal(mod.gemv(x, nw, torch.empty(0), -1.0, torch.empty(0))[0], dense)
        assert torch.equal(mod.dequantize(nw), deq)
        assert torch.equal(deq, unpack(p).t())
        ids = torch.tensor([0, 17, 95, 17])  # rows of W (a tied head's embedding)
        assert torch.equal(mod.tile_rows(nw, ids), unpack(p)[ids])
        with pytest.raises(RuntimeError, match="out of range"):
            mod.tile_rows(nw, torch.tensor([96]))
        with pytest.raises(RuntimeError, match="only its VNNI tiles"):
            mod.gemv(x, nw, torch.empty(0), 0.5, torch.empty(0))
        mod.set_isa("avx512")
        with pytest.raises(RuntimeError, match="only its VNNI tiles"):
            mod.gemv(x, nw, torch.empty(0), -1.0, torch.empty(0))


def test_native_weight_rejects_int8_minus_128() -> None:
    """The VNNI kernels negate weights, and -128 has no int8 negative."""
    from sparsellm.runtime.kernels import native_kernel

    mod = native_kernel()
    if mod is None:
        pytest.skip("no C++ compiler here")
    p = pack(torch.randn(32, 16), "int8")
    p.values[3, 5] = -128
    with pytest.raises(RuntimeError, match=r"\[-127, 127\]"):
        native_weight(mod, p)


def test_native_weight_rejects_mismatched_parts() -> None:
    from sparsellm.runtime.kernels import native_kernel

    mod = native_kernel()
    if mod is None:
        pytest.skip("no C++ compiler here")
    p = pack(torch.randn(32, 16), "int8")
    p.values = p.values[:8]  # truncated
    with pytest.raises(RuntimeError, match="shape"):
        native_weight(mod, p)
    # int4 of 8 outputs (which formats.pack refuses) would be read 16 outputs at a time
    with pytest.raises(RuntimeError, match="out % 16"):
        mod.PackedWeight(3, 8, 32, 32, torch.zeros(32 * 4, dtype=torch.uint8),
                         torch.ones(1, 8), torch.empty(0), torch.empty(0), True)  # fmt: skip


def test_native_weight_rejects_offsets_that_contradict_the_mask() -> None:
    from sparsellm.runtime.kernels import native_kernel

    mod = native_kernel()
    if mod is None:
        pytest.skip("no C++ compiler here")
    w = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))
    p = pack(w, "sparse-int8")
    native_weight(mod, p)  # consistent
    p.offsets[3, 1] += 1
    with pytest.raises(RuntimeError, match="offsets do not match the mask"):
        native_weight(mod, p)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4", "sparse-bf16", "sparse-int8"])
@pytest.mark.parametrize(("n_in", "n_out"), [(70, 208), (300, 5000)])  # narrow, wide
def test_rows_are_batch_and_isa_invariant(kind: str, n_in: int, n_out: int) -> None:
    """A row's product with every channel kept is bit-identical whatever rows share the
    call (a speculative pass verifies 1-16 tokens at once and must reproduce plain decoding
    exactly) and on AVX-512 and on AVX2 (AVX-512 lanes repeat AVX2's operations; bitmask
    kinds there use the VBMI2 expand-load kernel where the CPU has it). The VNNI int8
    kernels are batch-invariant too (exact int32 sums per activation group)."""
    from sparsellm.runtime.kernels import native_kernel

    mod = native_kernel()
    if mod is None:
        pytest.skip("no C++ compiler here")
    g = torch.Generator().manual_seed(0)
    if kind.startswith("sparse-") or kind == "int4":
        n_out -= n_out % 16  # bitmask and int4 kinds need out % 16 == 0
    w = torch.randn(n_out, n_in, generator=g)
    w[torch.rand(n_out, n_in, generator=g) < 0.5] = 0
    nw = native_weight(mod, pack(w, kind), tiles=True)  # VNNI: tiles; the rest: rows
    x = torch.randn(16, n_in, generator=g)
    results = []
    for isa in ["avx512vnni", "avx512", "avx2"]:
        try:
            mod.set_isa(isa)
        except RuntimeError:
            continue
        try:
            alone = torch.cat([mod.gemv(x[r : r + 1], nw, torch.empty(0), -1.0, torch.empty(0))[0]
                               for r in range(16)])  # fmt: skip
            for nb in (2, 3, 5, 9, 16):
                together = mod.gemv(x[:nb], nw, torch.empty(0), -1.0, torch.empty(0))[0]
                assert torch.equal(together, alone[:nb]), (isa, nb)
        finally:
            mod.set_isa("auto")
        # VNNI int8 kinds (and int4 tiles) multiply int8 activations: batch-invariant, not
        # equal to the rest
        if not (isa == "avx512vnni" and kind in ("int8", "sparse-int8", "int4")):
            results.append(alone)
    if not results:
        pytest.skip("no vector ISA on this CPU")
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("n_in", [16, 70, 517])
def test_thresholded_selection_is_the_same_on_every_isa(n_in: int) -> None:
    """AVX-512 selects the kept channels with a compare and a compress, 16 at a time; it
    must keep exactly the channels the portable loop keeps, in the same order (the order
    fixes the fp32 sums and the int8 activation groups). Ties at the threshold (|x| * s
    == thr, not kept), zeros, NaN and a tail past the last 16 are in the input; with the
    same kernels behind it (fp32 rows: AVX-512 lanes repeat AVX2's operations) the
    outputs are then bit-identical."""
    g = torch.Generator().manual_seed(n_in)
    w = torch.randn(96, n_in, generator=g)
    packed = pack(w, "fp32")
    x = torch.randn(3, n_in, generator=g)
    x[0, ::5] = 0.5  # with scale 1 below: exactly at the threshold
    x[1, ::7] = 0.0
    x[2, 3] = float("nan")
    x[2, ::11] = -0.5
    scale = torch.ones(n_in)
    scale[1::2] = 2.0
    outs = {}
    for isa in ["avx512", "avx2", "portable"]:
        with native_isa(isa) as mod:
            nw = native_weight(mod, packed)
            outs[isa] = mod.gemv(x, nw, scale, 0.5, torch.empty(0))
    keep = x.abs() * scale > 0.5
    for isa, (_, kept) in outs.items():
        assert kept == int(keep.sum()), isa
    assert torch.equal(outs["avx512"][0], outs["avx2"][0])
    ref = masked_linear_reference(torch.nan_to_num(x), w, keep)
    torch.testing.assert_close(outs["portable"][0], ref, rtol=1e-5, atol=1e-4)


def test_the_extension_compiles_without_x86_kernels(tmp_path: Path) -> None:
    """Other CPUs (ARM) build only the portable kernels: that build must compile too,
    though no CPU here runs it (a syntax-only compile with the x86 paths switched off)."""
    import shutil
    import subprocess

    from torch.utils.cpp_extension import include_paths

    from sparsellm.runtime.kernels import SOURCE

    cxx = shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler here")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-fopenmp", "-DSPARSELLM_NO_X86",
           "-DTORCH_EXTENSION_NAME=probe", *includes, str(SOURCE)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
