"""TidalDecode: which layers select, what the others attend, exactness when all are full."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import DynamicCache

from sparsellm.integrations.transformers import sparse_attention
from sparsellm.methods.attention.tidal import SELECTION, TidalDecode, select_positions
from sparsellm.models.tiny import tiny_model
from tests.methods.attention.test_kv import _greedy, _ids


def test_select_positions_sums_heads_and_sorts() -> None:
    probs = torch.tensor([[[0.1, 0.5, 0.0, 0.4], [0.3, 0.0, 0.6, 0.1]]])  # (B=1, H=2, T=4)
    # head sums: 0.4, 0.5, 0.6, 0.5 -> top 2 are positions 2 and (1 or 3); top 3 = 1, 2, 3
    assert select_positions(probs, 3).tolist() == [[1, 2, 3]]


def test_selection_layers_write_and_others_reuse() -> None:
    m = TidalDecode(budget=2, dense=1, reselect=3)
    layers = [SimpleNamespace(keys=torch.zeros(1, 2, 5, 4)) for _ in range(5)]
    cache = SimpleNamespace(shared={}, layers=layers, sliding=[])
    probs = torch.tensor([[[0.0, 0.9, 0.0, 0.1, 0.0], [0.0, 0.8, 0.0, 0.0, 0.2]]])
    m.after_step(cache, 0, probs)  # a dense layer before the first selection layer: no effect
    assert SELECTION not in cache.shared
    m.after_step(cache, 1, probs)  # layer `dense` selects
    assert cache.shared[SELECTION].tolist() == [[1, 4]]
    assert m.select(cache, 1, None) is None  # selection layers attend everything
    assert m.select(cache, 2, None).tolist() == [[[1, 4], [1, 4]]]
    m.after_step(cache, 2, probs.flip(-1))  # a reuse layer never changes the selection
    assert cache.shared[SELECTION].tolist() == [[1, 4]]
    m.after_step(cache, 3, probs.flip(-1))  # the re-selection layer does
    assert cache.shared[SELECTION].tolist() == [[0, 3]]


def test_selection_layers_are_the_first_full_attention_ones() -> None:
    m = TidalDecode(budget=2, dense=0, reselect=2)
    assert m.selection_layers([]) == (0, 2)  # no sliding layers: `dense` and `reselect`
    sliding = [True, False, True, False, True, False]  # Gemma-3-like
    assert m.selection_layers(sliding) == (1, 3)
    assert [m.full_layer(i, sliding) for i in range(6)] == [0, 1, 0, 1, 0, 0]
    assert TidalDecode(dense=2, reselect=3).full_layer(1, sliding), "below `dense`: full"


def test_all_full_layers_reproduce_dense_and_small_budget_changes_logits() -> None:
    model = tiny_model("llama", 0)
    n_layers = model.config.num_hidden_layers
    ids = _ids(60)
    _, ref_logits = _greedy(model, ids, 6, DynamicCache())
    with sparse_attention(model, f"tidal:budget=8,dense={n_layers}") as session:
        _, logits = _greedy(model, ids, 6, session.new_cache())
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    with sparse_attention(model, "tidal:budget=8,dense=0,reselect=0") as session:
        _, logits = _greedy(model, ids, 6, session.new_cache())
    torch.testing.assert_close(logits[0], ref_logits[0])  # prefill is exact
    assert not torch.allclose(logits[1:], ref_logits[1:], atol=1e-3)
