"""Double Sparsity: channel scores, approximate selection, calibration, keep-all."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from sparsellm.errors import SparseLLMError
from sparsellm.integrations.transformers import calibrate, sparse_attention
from sparsellm.methods.attention.double_sparsity import approx_top_tokens, channel_scores
from sparsellm.models.tiny import tiny_model
from tests.methods.attention.test_kv import _greedy, _ids


def test_channel_scores_are_l1_products_group_summed() -> None:
    q = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # (B=1, Hq=2, T=1, D=2): one group
    k = torch.tensor([[[[2.0, 1.0], [-1.0, 1.0]]]])  # (B=1, Hkv=1, T=2, D=2)
    # |q| summed over the group: [4, 2]; |k| summed over tokens: [3, 2]
    assert channel_scores(q, k).tolist() == [[[12.0, 4.0]]]


def test_all_channels_select_the_exact_top_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    q, labels = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    exact = torch.softmax(q @ labels.transpose(-1, -2) * 0.3, -1).sum(2)
    want = exact.topk(5, -1).indices.sort(-1).values
    assert torch.equal(approx_top_tokens(q, labels, 5, 0.3), want)


def test_calibration_and_keep_all_generation() -> None:
    model = tiny_model("llama", 0)
    with (
        pytest.raises(SparseLLMError, match="needs its calibrated table"),
        sparse_attention(model, "double_sparsity"),
    ):
        pass
    method = calibrate(model, _ids(48), "double_sparsity")
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert len(method.label) == cfg.num_hidden_layers
    assert {len(h) for layer in method.label for h in layer} == {method.channels}
    assert all(len(layer) == cfg.num_key_value_heads for layer in method.label)
    ids = _ids(60)
    _, ref_logits = _greedy(model, ids, 6, DynamicCache())
    keep_all = type(method)(budget=100, channels=method.channels, label=method.label)
    with sparse_attention(model, keep_all) as session:
        _, logits = _greedy(model, ids, 6, session.new_cache())
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    every = calibrate(model, _ids(48), type(method)(budget=8, channels=head_dim))
    with sparse_attention(model, every) as session:
        cache = session.new_cache()
        _greedy(model, ids, 2, cache)
    assert ("ds_label", 0) in cache.shared
    assert cache.shared[("ds_label", 0)].shape[2] == cache.layers[0].keys.shape[2]
