"""The decode runtime computes the same function as the HF model (dense and sparse)."""

from __future__ import annotations

import pytest
import torch

from sparsellm.methods.activation.apply import sparsify_activations
from sparsellm.methods.activation.teal import TEALConfig
from sparsellm.models.tiny import tiny_model
from sparsellm.runtime.decode import DecodeRuntime
from tests.methods.activation.helpers import act_config
from tests.runtime.helpers import native_isa


def _prompt() -> torch.Tensor:
    return torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))


def _stepwise(
    rt: DecodeRuntime, ids: torch.Tensor, split: int, sparse: bool, native: bool = True
) -> torch.Tensor:
    """Prefill ids[:, :split], then feed the rest one token at a time (the decode path);
    `native=False` forces the Python blocks where the native Decoder would run."""
    rt.reset(ids.shape[0])
    if not native:
        rt._decoder = None
    rt.forward(ids[:, :split], 0, sparse)
    steps = [rt.forward(ids[:, i : i + 1], i, sparse) for i in range(split, ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dense_runtime_matches_hf(family: str) -> None:
    model = tiny_model(family).eval()
    ids = _prompt()
    ref = model(ids).logits
    rt = DecodeRuntime(model, max_len=32)
    rt.reset(1)
    torch.testing.assert_close(rt.forward(ids, 0, sparse=False), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_stepwise(rt, ids, 5, False), ref[:, 5:], rtol=1e-4, atol=1e-5)
    hf = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
    )
    assert torch.equal(rt.generate(ids, 8, sparse=False)["tokens"], hf)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("method", ["teal", "wina", "rsparse", "cats"])
def test_sparse_decode_matches_wrapped_hf(
    method: str, native: bool, calib_ids: torch.Tensor
) -> None:
    model = tiny_model("qwen2").eval()
    sparsify_activations(model, calib_ids, act_config(method, sparsity=0.5, max_tokens=256))
    ids = _prompt()
    ref = model(ids).logits  # the wrappers: masked dense matmuls
    rt = DecodeRuntime(model, max_len=32, native=native)
    # the one-call native Decoder covers thresholds only; the rest runs the Python blocks
    assert rt.fusable() == (native and method in ("teal", "wina"))
    got = _stepwise(rt, ids, 5, sparse=True)  # the kernel, one token at a time
    torch.testing.assert_close(got, ref[:, 5:], rtol=1e-4, atol=1e-5)
    assert rt.skipped_fraction() > 0.2


def test_sparse_head_decode_matches_wrapped_hf(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    cfg = TEALConfig(sparsity=0.5, max_tokens=256, head=True)
    sparsify_activations(model, calib_ids, cfg)
    ids = _prompt()
    ref = model(ids).logits
    rt = DecodeRuntime(model, max_len=32)
    torch.testing.assert_close(_stepwise(rt, ids, 5, True), ref[:, 5:], rtol=1e-4, atol=1e-5)
    assert rt.lm_head.kept < rt.lm_head.seen  # the head skipped columns too


def test_small_batch_decode_matches_single_rows(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    sparsify_activations(model, calib_ids, TEALConfig(sparsity=0.5, max_tokens=256))
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(4))
    rt = DecodeRuntime(model, max_len=32)
    batch = _stepwise(rt, ids, 4, sparse=True)
    rows = torch.cat([_stepwise(rt, ids[i : i + 1], 4, sparse=True) for i in range(3)])
    torch.testing.assert_close(batch, rows, rtol=1e-4, atol=1e-5)


def test_verification_every_token_reproduces_dense_greedy(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama").eval()
    ids = _prompt()
    dense = DecodeRuntime(model, max_len=64).generate(ids, 16, sparse=False)["tokens"]
    sparsify_activations(model, calib_ids, TEALConfig(sparsity=0.7, max_tokens=256))
    rt = DecodeRuntime(model, max_len=64)
    plain = rt.generate(ids, 16, sparse=True)
    checked = rt.generate(ids, 16, sparse=True, verify_every=1)
    assert not torch.equal(plain["tokens"], dense)  # 70% sparsity changes the greedy text
    assert plain["correction_rate"] is None  # nothing verified: no rate, not a rate of 0
    # every sparse token is checked by a dense pass before the next one is drafted
    assert torch.equal(checked["tokens"], dense)
    assert checked["verified_tokens"] >= 14 and 0 < checked["correction_rate"] <= 1


def test_too_long_is_an_error() -> None:
    rt = DecodeRuntime(tiny_model("llama").eval(), max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        rt.generate(_prompt(), 4, sparse=False)


def _fused_and_python(
    rt: DecodeRuntime, ids: torch.Tensor, split: int, sparse: bool
) -> tuple[torch.Tensor, torch.Tensor, float | None, float | None]:
    """Decode ids[:, split:] after a prefill, once through the native Decoder and once
    through the Python blocks: both logits and both skipped fractions."""
    fused = _stepwise(rt, ids, split, sparse)
    assert rt._decoder is not None
    fused_skip = rt.skipped_fraction()
    python = _stepwise(rt, ids, split, sparse, native=False)
    return fused, python, fused_skip, rt.skipped_fraction()


@pytest.mark.parametrize(("family", "method"), [("llama", "teal"), ("qwen2", "wina")])
def test_native_decode_step_equals_python_blocks(
    family: str, method: str, calib_ids: torch.Tensor
) -> None:
    """The one-call Decoder (sparse_gemv.cpp) computes the Python blocks' function and
    counts the same skipped channels, dense and sparse, with GQA and (qwen2) biases."""
    model = tiny_model(family).eval()
    sparsify_activations(model, calib_ids, act_config(method, sparsity=0.5))
    rt = DecodeRuntime(model, max_len=32)
    assert rt.fusable()
    for sparse in (False, True):
        fused, python, fused_skip, python_skip = _fused_and_python(rt, _prompt(), 5, sparse)
        torch.testing.assert_close(fused, python, rtol=1e-5, atol=1e-5)
        assert python_skip == fused_skip
        assert (fused_skip is None) == (not sparse)


@pytest.mark.parametrize("fmt", ["fp32", "int8", "sparse-int8"])
def test_relu_model_decodes_fused_and_skips_its_zeros_exactly(fmt: str) -> None:
    """A ReLU-gated model (ProSparse) runs on the one-call Decoder: sparse steps skip the
    down projection's exact zeros and still compute the dense steps' logits (HF's, in
    fp32). Int8 kinds keep the down projections' rows for that (no tiles); on VNNI
    their int8 activations are grouped over the kept channels, so skipping the zeros
    regroups them: close to the dense steps, not equal (a wrong row would be O(1))."""
    from sparsellm.recover.prosparse import relufy

    model = tiny_model("llama", 2).eval()
    relufy(model)
    ids = _prompt()
    rt = DecodeRuntime(model, max_len=32, fmt=fmt)
    assert rt.fusable()
    assert not any(ly.mlp.down.tiled for ly in rt.layers)
    ref = model(ids).logits[:, 5:] if fmt == "fp32" else _stepwise(rt, ids, 5, sparse=False)
    got = _stepwise(rt, ids, 5, sparse=True)
    tol = {"rtol": 1e-4, "atol": 1e-5} if fmt == "fp32" else {"rtol": 0.0, "atol": 0.1}
    torch.testing.assert_close(got, ref, **tol)
    skipped = rt.skipped_fraction()
    assert skipped is not None and 0.3 < skipped < 1.0, skipped  # about half the ReLU zeros


def test_native_decode_long_context_attention(calib_ids: torch.Tensor) -> None:
    """From 512 cached positions the Decoder's attention splits heads over threads;
    steps on both sides of that switch still equal the Python blocks (SDPA)."""
    model = tiny_model("llama").eval()
    sparsify_activations(model, calib_ids, TEALConfig(sparsity=0.5))
    ids = torch.randint(0, 256, (2, 516), generator=torch.Generator().manual_seed(5))
    rt = DecodeRuntime(model, max_len=520)
    fused, python, _, _ = _fused_and_python(rt, ids, 508, sparse=True)
    torch.testing.assert_close(fused, python, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp32", "int8", "sparse-bf16"])
def test_rows_of_one_pass_get_the_bits_of_lone_steps(fmt: str) -> None:
    """A verification pass (k tokens of one sequence in one `step`) and a batch of
    sequences at different lengths give each token exactly the logits of a lone decode
    step: what makes greedy speculative decoding token-identical to plain decoding."""
    model = tiny_model("qwen2").eval()
    ids = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(5))
    rt = DecodeRuntime(model, max_len=32, fmt=fmt)
    lone = _stepwise(rt, ids, 6, sparse=False)[0]  # logits of tokens 6..13, one at a time
    rt.reset(3)
    rt.forward(ids[:, :6], 0, False, seq=0)
    slots = torch.arange(6, 14)
    chain = rt.step(ids[0, 6:], torch.zeros(8, dtype=torch.int64), slots, slots, False)
    assert torch.equal(chain, lone)
    # two requests at different lengths in cache rows 1 and 2, stepped together
    for row in (1, 2):
        rt.forward(ids[:, :6], 0, False, seq=row)
    for i in range(6, 9):  # row 1 decodes three tokens ahead, one at a time (as `lone`)
        rt.forward(ids[:, i : i + 1], i, False, seq=1)
    at = torch.tensor([9, 6])
    both = rt.step(ids[0, [9, 6]], torch.tensor([1, 2]), at, at, False)
    assert torch.equal(both, lone[[3, 0]])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fmt", ["int8", "sparse-int8"])
def test_vnni_tiles_replace_the_rows_and_keep_the_logits(
    fmt: str, tied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On VNNI CPUs projections without a skipping rule decode from tiles and release the
    row layout, so RAM holds about one copy (not two); decode steps give the row
    kernels' bits, and a prompt longer than a step (matmuls over the weights dequantized
    from the tiles) the same logits too. The tied head's tiles serve the embedding."""
    import sparsellm.runtime.projections as projections
    from sparsellm.runtime.kernels import native_kernel, native_weight

    mod = native_kernel()
    if mod is None or mod.isa() != "avx512vnni":
        pytest.skip("needs the AVX-512 VNNI kernels")
    model = tiny_model("qwen2").eval()
    if tied:  # the head's rows are also the embedding
        model.lm_head.weight = model.model.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))
    with monkeypatch.context() as m:  # the same runtime on the row layout
        m.setattr(projections, "native_weight", lambda ext, p, tiles=False: native_weight(ext, p))
        rows = DecodeRuntime(model, max_len=32, fmt=fmt)
    rt = DecodeRuntime(model, max_len=32, fmt=fmt)
    assert all(p.tiled and p.packed.values.numel() == 0 for p in rt._all_projs())
    assert (rt._embed_tiles is not None) == tied  # a tied head's tiles: the embedding
    assert not any(p.tiled for p in rows._all_projs())
    assert rt.resident_bytes() < 1.1 * rows.resident_bytes()
    # a 20-token prompt (more than STEP_ROWS: matmuls), then 4 decode steps
    assert torch.equal(_stepwise(rt, ids, 20, sparse=False), _stepwise(rows, ids, 20, sparse=False))


def test_tree_rows_see_only_their_ancestors() -> None:
    """A draft tree after the prefix: root t0 with children t1 and t1', t1 with child t2.
    Each node's logits equal those of its path verified as a chain."""
    model = tiny_model("llama").eval()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(6))
    rt = DecodeRuntime(model, max_len=32)
    t0, t1, t1b, t2 = 11, 22, 33, 44
    paths = {(t0, t1, t2), (t0, t1b)}
    chains = {}
    for path in paths:
        rt.reset(1)
        rt.forward(ids, 0, False)
        slots = torch.arange(8, 8 + len(path))
        chains[path] = rt.step(torch.tensor(path), torch.zeros_like(slots), slots, slots, False)
    rt.reset(1)
    rt.forward(ids, 0, False)
    nodes = torch.tensor([t0, t1, t1b, t2])
    depth = torch.tensor([0, 1, 1, 2])
    parent = [-1, 0, 0, 1]
    visible = torch.zeros(4, 12, dtype=torch.bool)
    visible[:, :8] = True
    for i in range(4):
        j = i
        while j >= 0:
            visible[i, 8 + j] = True
            j = parent[j]
    slots = torch.arange(8, 12)
    got = rt.step(nodes, torch.zeros(4, dtype=torch.int64), slots, 8 + depth, False, visible)
    torch.testing.assert_close(got[[0, 1, 3]], chains[(t0, t1, t2)], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[[0, 2]], chains[(t0, t1b)], rtol=1e-5, atol=1e-6)
    # accepting t0, t1b moves t1b's slot (10) next to the prefix; its kv then reproduces
    rt.move_slots(0, [8, 10], 8)
    nxt = rt.step(torch.tensor([5]), torch.zeros(1, dtype=torch.int64), torch.tensor([10]),
                  torch.tensor([10]), False)  # fmt: skip
    rt.reset(1)
    rt.forward(ids, 0, False)
    ref = rt.step(torch.tensor([t0, t1b, 5]), torch.zeros(3, dtype=torch.int64),
                  torch.arange(8, 11), torch.arange(8, 11), False)  # fmt: skip
    torch.testing.assert_close(nxt[0], ref[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 96, 128, 256, 40])
def test_avx512_attention_matches_portable(head_dim: int) -> None:
    """The AVX-512 attention (16 slots per reduction, a 16-lane exp) computes the portable
    loops' softmax attention: a decode step over 37 slots (two full blocks of 16 and a
    tail) and a draft tree whose hidden slots fall inside a block, for head dimensions
    it specialises (40, not a multiple of 16, runs the portable loops on both)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with native_isa("avx512") as mod:
        pass
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 37), generator=torch.Generator().manual_seed(7))
    visible = torch.ones(3, 40, dtype=torch.bool)
    visible[:, 3:9] = False  # a tree row's ancestors need not be every slot before it
    visible[0, 38:] = visible[1, 39] = visible[2, 38] = False
    out = {}
    for isa in ("portable", "avx512"):
        mod.set_isa(isa)
        try:
            rt = DecodeRuntime(model, max_len=48)
            step = _stepwise(rt, ids, 36, sparse=False)
            rt.reset(1)
            rt.forward(ids[:, :37], 0, False)
            slots = torch.arange(37, 40)
            tree = rt.step(torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.int64), slots,
                           slots, False, visible)  # fmt: skip
            out[isa] = (step, tree)
        finally:
            mod.set_isa("auto")
    for got, ref in zip(out["avx512"], out["portable"], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
