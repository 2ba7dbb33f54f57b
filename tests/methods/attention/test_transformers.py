"""sparsellm.integrations.transformers: registration through transformers' AttentionInterface,
calibration and spec validation, on tiny random models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparsellm.config import from_spec
from sparsellm.errors import SparseLLMError
from sparsellm.integrations import transformers as glue
from sparsellm.integrations.transformers import run_calibration, sparse_attention
from sparsellm.models.tiny import tiny_model


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_keep_everything_reproduces_dense_and_restores(family: str, monkeypatch) -> None:
    calls, windows = [], []
    real, real_window = glue.block_sparse_attention, glue.sliding_window_attention
    monkeypatch.setattr(glue, "block_sparse_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(
        glue, "sliding_window_attention", lambda *a: windows.append(1) or real_window(*a)
    )
    model = tiny_model(family, 0)
    ids = _ids(100)
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_attention(model, "full:block=16,min_length=0"):
            full = model(ids).logits
            assert model.config._attn_implementation.startswith("sparsellm_full")
        after = model(ids).logits
    # Gemma-3's sliding layer computes its own window exactly; its global layer the method
    sliding = family == "gemma3_text"
    assert len(calls) == (1 if sliding else model.config.num_hidden_layers)
    assert len(windows) == (1 if sliding else 0)
    torch.testing.assert_close(full, dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, dense)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "spec",
    [
        "sink_window:sink=16,window=512,block=16,min_length=0",
        "power:sink=16,window=512,block=16,min_length=0",
        "block_topk:blocks=64,block=16,min_length=0",
        "hip:blocks=64,block=16,min_length=0",
        "vertical_slash:vertical=512,slash=512,block=16,min_length=0",
        "flexprefill:gamma=1.0,block=16,min_length=0",
    ],
)
def test_methods_at_full_budget_equal_dense(spec: str) -> None:
    model = tiny_model("llama", 1)
    ids = _ids(90)
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_attention(model, spec):
            got = model(ids).logits
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "spec",
    [
        "sink_window:sink=16,window=16,block=16,min_length=0",
        "power:sink=16,window=16,block=16,min_length=0",
        "block_topk:blocks=1,sink=0,window=16,block=16,min_length=0",
        "hip:blocks=1,sink=0,window=16,block=16,min_length=0",
        "vertical_slash:vertical=8,slash=8,sink=4,local=4,block=16,min_length=0",
        "flexprefill:gamma=0.3,block=16,min_length=0",
    ],
)
def test_sparse_budgets_change_long_prefill_but_not_decode(spec: str) -> None:
    model = tiny_model("llama", 1)
    ids = _ids(200)
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_attention(model, spec):
            got = model(ids).logits
            step = model(ids[:, :1]).logits  # q_len 1: SDPA path
    assert torch.isfinite(got).all()
    assert not torch.allclose(got, dense, atol=1e-4)
    torch.testing.assert_close(step, dense[:, :1])


def test_short_inputs_fall_back_to_sdpa() -> None:
    model = tiny_model("llama", 2)
    ids = _ids(50)
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_attention(model, "sink_window:sink=16,window=16,block=16,min_length=64"):
            assert torch.equal(model(ids).logits, dense)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nope", "unknown method 'nope'"),
        ("wanda", "unknown method 'wanda' \\(prefill or kv\\)"),
        ("sink_window:size=3", "valid: sink, window"),
        ("sink_window:window=abc", "window must be int"),
        ("sink_window:block=0", "block and page >= 1"),
        ("quest:page=0", "block and page >= 1"),
        ("snapkv:budget=-1", "non-negative"),
    ],
)
def test_bad_specs_are_clear_errors(spec: str, needle: str) -> None:
    with pytest.raises(SparseLLMError, match=needle):
        from_spec(spec, family=("prefill", "kv"))


def test_minference_calibration_picks_a_pattern_per_kv_head() -> None:
    from sparsellm.methods.attention.minference import MInference

    model = tiny_model("llama", 4)
    base = MInference(sink=16, window=16, vertical=8, slash=8, blocks=1, block=16, min_length=0)
    ids = _ids(320)
    search = base.calibration(ids.shape[1])
    method = run_calibration(model, ids, search)
    recall = search.recall
    assert len(method.choice) == 2 and all(len(c) == 2 for c in method.choice)
    assert recall[0].shape == (3, 2) and (recall[0] <= 1 + 1e-5).all()
    for layer, picks in enumerate(method.choice):
        assert list(picks) == recall[layer].argmax(0).tolist()
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_attention(model, method):
            got = model(ids).logits
    assert torch.isfinite(got).all() and not torch.allclose(got, dense, atol=1e-4)
    with (
        pytest.raises(SparseLLMError, match="minference needs its calibrated table"),
        sparse_attention(model, "minference"),
    ):
        pass


@pytest.mark.parametrize("kind", ["minference", "moa"])
def test_calibrated_methods_on_sliding_window_models(kind: str) -> None:
    """Gemma-3: calibration covers the full-attention layers only (the sliding ones keep
    their window under any method), and the calibrated method runs."""
    from sparsellm.integrations.transformers import calibrate
    from sparsellm.methods.attention.minference import MInference
    from sparsellm.methods.attention.moa import MoA

    model = tiny_model("gemma3_text", 0, layers=4)  # sliding, full, sliding, full
    ids = _ids(320)
    if kind == "minference":
        base = MInference(sink=16, window=16, vertical=8, slash=8, blocks=1, block=16)
        method = calibrate(model, ids, base)
        table = method.choice
    else:
        search = MoA(density=0.3, sink=16, block=16).calibration(ids.shape[1])
        method = run_calibration(model, ids, search)
        assert search.recall.shape[0] == 2, "one row per full-attention layer"
        table = method.spans
    hkv = model.config.num_key_value_heads
    assert [len(t) for t in table] == [0, hkv, 0, hkv]  # per KV head of the full layers
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_attention(model, dataclasses.replace(method, min_length=0)):
            got = model(ids).logits
    assert torch.isfinite(got).all() and not torch.allclose(got, dense, atol=1e-4)


def test_window_mask_check_accepts_only_the_plain_band() -> None:
    from sparsellm.integrations.transformers import is_window_mask

    i = torch.arange(40)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 8)
    assert is_window_mask(band[None, None].expand(2, 1, 40, 40), 8, 40)
    padded = band[None, None].repeat(2, 1, 1, 1)
    padded[1, :, :, :3] = False  # left padding in the second row of the batch
    assert not is_window_mask(padded, 8, 40)
    assert not is_window_mask(band, 16, 40), "another window"
    assert not is_window_mask(band.float(), 8, 40) and not is_window_mask(None, 8, 40)
    wider = band.clone()
    wider[30, 5] = True  # one extra key outside the band
    assert not is_window_mask(wider, 8, 40)
    for hole, extra in (((30, 28), (30, 5)), ((3, 1), (3, 20))):  # same count, moved key
        moved = band.clone()
        moved[hole], moved[extra] = False, True
        assert not is_window_mask(moved, 8, 40), f"hole at {hole}"
    assert is_window_mask(band[:5, :5], 8, 5), "a window longer than the input: causal"


def test_dense_tail_rows_equal_sdpa_and_other_rows_keep_the_pattern() -> None:
    from sparsellm.methods.attention.blocksparse import block_sparse_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 90, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: 2 KV heads
    plain = from_spec("sink_window:sink=16,window=16,block=16,min_length=0")
    tailed = from_spec("sink_window:sink=16,window=16,block=16,min_length=0,tail=20")
    # 90 tokens = 6 blocks, the last one partial: tail 20 rounds up to the last 2 blocks
    with_tail = block_sparse_attention(q, k, v, tailed.prefill_mask(q, k, 0), 16)
    without = block_sparse_attention(q, k, v, plain.prefill_mask(q, k, 0), 16)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    )
    torch.testing.assert_close(with_tail[:, :, 64:], dense[:, :, 64:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_tail[:, :, :64], without[:, :, :64], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(without[:, :, 64:], dense[:, :, 64:], atol=1e-3)
    # tail 12 = tokens 78-89: block 4 is in the tail too, though 12 < one block
    short = from_spec("sink_window:sink=16,window=16,block=16,min_length=0,tail=12")
    got = block_sparse_attention(q, k, v, short.prefill_mask(q, k, 0), 16)
    torch.testing.assert_close(got, with_tail, atol=1e-6, rtol=1e-6)


def test_tail_covering_the_prompt_reproduces_dense_logits() -> None:
    model = tiny_model("llama", 1)
    ids = _ids(90)
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_attention(model, "sink_window:sink=16,window=16,block=16,min_length=0"):
            sparse = model(ids).logits
        spec = "sink_window:sink=16,window=16,block=16,min_length=0,tail=96"
        with sparse_attention(model, spec):
            tailed = model(ids).logits
    assert not torch.allclose(sparse, dense, atol=1e-3)
    torch.testing.assert_close(tailed, dense, atol=1e-5, rtol=1e-5)
