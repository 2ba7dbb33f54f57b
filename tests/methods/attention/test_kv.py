"""KV-cache compression: budgets, sinks, keep-all equivalence, positions."""

from __future__ import annotations

import pytest
import torch

from sparsellm.integrations.transformers import sparse_attention
from sparsellm.methods.attention.cache import keep_tokens
from sparsellm.methods.attention.decode import cache_nbytes
from sparsellm.models.tiny import tiny_model


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, steps: int, cache) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the stacked step logits, one token per forward after prefill."""
    out = model(ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    tokens = []
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        logits.append(model(nxt, past_key_values=cache, use_cache=True).logits[:, -1])
    return tokens, torch.stack(logits)


@pytest.mark.parametrize(
    "spec",
    [
        "streaming_kv:sink=4,window=500",
        "snapkv:budget=500",
        "h2o:budget=500,recent=64",
        "think:keep=1.0",
    ],
)
def test_keep_all_reproduces_dense_generation(spec: str) -> None:
    from transformers import DynamicCache

    model = tiny_model("llama", 0)
    ids = _ids(60)
    ref_tokens, ref_logits = _greedy(model, ids, 8, DynamicCache())
    with sparse_attention(model, spec) as session:
        tokens, logits = _greedy(model, ids, 8, session.new_cache())
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("spec", "stored"),
    [
        ("streaming_kv:sink=4,window=20", 24),
        ("snapkv:budget=24,window=8,sink=4", 24 + 6),  # prompt budget; decode appends
        ("h2o:budget=24,recent=8,sink=4", 24),
    ],
)
def test_budgets_hold_and_sinks_survive(spec: str, stored: int) -> None:
    model = tiny_model("llama", 1)
    ids = _ids(80, seed=1)
    with sparse_attention(model, spec) as session:
        cache = session.new_cache()
        _, logits = _greedy(model, ids, 6, cache)
        for layer in cache.layers:
            assert layer.keys.shape[2] <= stored
            assert layer.get_seq_length() == 80 + 6
        # sinks: the first 4 stored keys equal a fresh dense prefill's first 4 keys
        from transformers import DynamicCache

        dense = DynamicCache()
        model(ids, past_key_values=dense, use_cache=True)
        sink_keys = dense.layers[0].keys[:, :, :4]
    torch.testing.assert_close(cache.layers[0].keys[:, :, :4], sink_keys)
    assert torch.isfinite(logits).all()


def test_think_stores_fewer_key_channels() -> None:
    model = tiny_model("llama", 2)
    with sparse_attention(model, "think:keep=0.5") as session:
        cache = session.new_cache()
        _greedy(model, _ids(40), 3, cache)
    layer = cache.layers[0]
    assert layer.keys.shape[-1] == layer.values.shape[-1] // 2
    assert cache_nbytes(cache) == sum(
        layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in cache.layers
    )


def test_keep_tokens_orders_sinks_top_and_tail() -> None:
    scores = torch.tensor([[[9.0, 0, 5, 1, 7, 0, 0, 3]]])
    idx = keep_tokens(scores, 8, n_top=2, sink=1, tail=2)
    assert idx.tolist() == [[[0, 2, 4, 6, 7]]]


def test_use_cache_false_is_plain_dense() -> None:
    model = tiny_model("llama", 3)
    ids = _ids(30)
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        with sparse_attention(model, "snapkv:budget=8,window=4"):
            assert torch.equal(model(ids, use_cache=False).logits, dense)


def test_quest_bounds_are_upper_bounds_and_select_the_best_page() -> None:
    from sparsellm.methods.attention.cache import CompressedLayer
    from sparsellm.methods.attention.kv import Quest, quest_tokens

    g = torch.Generator().manual_seed(0)
    layer = CompressedLayer()
    layer.update(torch.randn(1, 1, 64, 8, generator=g), torch.randn(1, 1, 64, 8, generator=g))
    q = torch.randn(1, 2, 1, 8, generator=g)
    idx = quest_tokens(layer, q, Quest(budget=16, page=8))
    scores = (q[0, :, 0] @ layer.keys[0, 0].T).sum(0)  # group-summed exact scores
    page_bound = (
        torch.maximum(
            q[0, :, 0, None] * layer.page_min[0, 0], q[0, :, 0, None] * layer.page_max[0, 0]
        )
        .sum(-1)
        .sum(0)
    )
    exact_pages = scores.view(8, 8)
    assert (page_bound[:, None] >= exact_pages - 1e-5).all()
    assert idx.shape[-1] == 16
    assert set((idx[0, 0] // 8).tolist()) == set(page_bound.topk(2).indices.tolist())


def test_quest_keep_all_budget_reproduces_dense() -> None:
    from transformers import DynamicCache

    model = tiny_model("llama", 5)
    ids = _ids(50)
    ref_tokens, ref_logits = _greedy(model, ids, 5, DynamicCache())
    with sparse_attention(model, "quest:budget=64,page=8") as session:
        tokens, logits = _greedy(model, ids, 5, session.new_cache())
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    with sparse_attention(model, "quest:budget=16,page=8") as session:
        _, small = _greedy(model, ids, 5, session.new_cache())
    assert not torch.allclose(small[1:], ref_logits[1:], atol=1e-4)


def test_generate_with_compressed_cache_keeps_budget() -> None:
    model = tiny_model("llama", 6)
    ids = _ids(60)
    with sparse_attention(model, "streaming_kv:sink=4,window=16") as session:
        cache = session.new_cache()
        out = model.generate(
            ids, past_key_values=cache, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    assert out.shape[1] == 65
    assert all(layer.keys.shape[2] == 20 for layer in cache.layers)


def test_kv_method_with_sparse_prefill_composes() -> None:
    """A KV method's prefill computed by a prefill method: same first logits as that
    prefill method alone, then decoding from the compressed cache."""
    from sparsellm.errors import SparseLLMError

    model = tiny_model("llama", 0)
    ids = _ids(60)
    window = "sink_window:sink=8,window=16,block=8,min_length=16"
    with sparse_attention(model, window):
        ref = model(ids).logits[:, -1]
    with sparse_attention(model, "snapkv:budget=24,window=8", prefill=window) as session:
        cache = session.new_cache()
        _, logits = _greedy(model, ids, 2, cache)
    torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].keys.shape[2] == 24 + 2
    with (
        pytest.raises(SparseLLMError, match="pairs a prefill"),
        sparse_attention(model, window, prefill=window),
    ):
        pass


@pytest.mark.parametrize(
    "spec",
    ["streaming_kv:sink=4,window=500", "snapkv:budget=500", "think:keep=1.0", "quest:budget=512"],
)
def test_sliding_window_model_keeps_its_window_layers_and_dense_generation(spec: str) -> None:
    """Gemma-3: sliding layers keep transformers' window cache, full layers compress;
    at a keep-everything budget generation equals the model's own default cache."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from sparsellm.methods.attention.cache import CompressedLayer

    model = tiny_model("gemma3_text", 0)  # layer 0 sliding (window 16), layer 1 full
    ids = _ids(60)
    ref_tokens, ref_logits = _greedy(model, ids, 8, DynamicCache(config=model.config))
    with sparse_attention(model, spec) as session:
        cache = session.new_cache()
        tokens, logits = _greedy(model, ids, 8, cache)
    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer)
    assert isinstance(cache.layers[1], CompressedLayer)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_sliding_window_model_compresses_its_full_layers() -> None:
    model = tiny_model("gemma3_text", 0)
    with sparse_attention(model, "streaming_kv:sink=4,window=20") as session:
        cache = session.new_cache()
        _greedy(model, _ids(60), 4, cache)
    assert cache.layers[1].keys.shape[2] == 24, "the full layer holds sink + window"
    assert cache.layers[0].keys.shape[2] <= 16, "the sliding layer holds its window"


def _cross_layer_session(model, spec: str, ids: torch.Tensor):
    """A session's cache for `spec` (tidal, double_sparsity or speckv) on `model`,
    calibrating or drafting first as the method needs."""
    import copy

    from sparsellm.config import from_spec
    from sparsellm.integrations.transformers import calibrate, draft_cache

    method = from_spec(spec, family="kv")
    if method.needs_calibration():
        method = calibrate(model, _ids(48, 1), method)
    draft = copy.deepcopy(model)  # SpecKV's stand-in draft, copied outside any session
    session = sparse_attention(model, method)

    def cache(s):
        if method.needs_draft():
            return s.new_cache(draft_cache(draft, ids, method))
        return s.new_cache()

    return session, cache


@pytest.mark.parametrize(
    ("keep_all", "small"),
    [
        ("tidal:budget=100,dense=0,reselect=0", "tidal:budget=8,dense=0,reselect=0"),
        ("double_sparsity:budget=100,channels=4", "double_sparsity:budget=8,channels=4"),
        ("speckv:budget=100,lookahead=2", "speckv:budget=12,lookahead=2,window=4"),
    ],
)
def test_cross_layer_methods_on_sliding_window_models(keep_all: str, small: str) -> None:
    """tidal, double_sparsity and speckv act on a Gemma-3 model's full-attention layers
    (layers 1 and 3 of sliding/full/sliding/full): a keep-everything budget generates
    exactly as the model's own cache does, a small one changes the decode logits."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    model = tiny_model("gemma3_text", 0, layers=4)
    ids = _ids(60)
    ref_tokens, ref_logits = _greedy(model, ids, 6, DynamicCache(config=model.config))
    for spec in (keep_all, small):
        session, make = _cross_layer_session(model, spec, ids)
        with session as s:
            cache = make(s)
            tokens, logits = _greedy(model, ids, 6, cache)
        assert all(isinstance(cache.layers[i], DynamicSlidingWindowLayer) for i in (0, 2))
        torch.testing.assert_close(logits[0], ref_logits[0], atol=1e-5, rtol=1e-5)  # prefill
        if spec == keep_all:
            assert tokens == ref_tokens
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(logits[1:], ref_logits[1:], atol=1e-4)
