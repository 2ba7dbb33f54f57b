"""Depth pruning: block choice, renumbering, cache, ratio 0."""

from __future__ import annotations

import torch

from sparsellm.models.adapters import get_blocks
from sparsellm.models.tiny import tiny_model
from sparsellm.structured import apply_structured
from sparsellm.structured.depth import blocks_to_drop, loss_deltas


def test_blocks_to_drop_lowest_scores() -> None:
    assert blocks_to_drop(torch.tensor([0.3, 0.1, 0.5, 0.2]), 0.5).tolist() == [1, 3]
    assert blocks_to_drop(torch.tensor([0.3, 0.1]), 0.9).tolist() == [1]  # one block stays


def test_ratio_zero_keeps_logits(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    ref = model(calib_ids).logits
    apply_structured(model, "depth:ratio=0", calib_ids)
    assert torch.equal(model(calib_ids).logits, ref)


def test_drop_renumbers_and_matches_manual_removal(calib_ids: torch.Tensor) -> None:
    model = tiny_model("qwen2")
    report = apply_structured(model, "depth:ratio=0.5", calib_ids)
    (gone,) = report["dropped_blocks"]
    assert model.config.num_hidden_layers == 1 and len(model.config.layer_types) == 1
    assert [b.self_attn.layer_idx for b in get_blocks(model)] == [0]
    ref = tiny_model("qwen2")
    del get_blocks(ref)[gone]
    get_blocks(ref)[0].self_attn.layer_idx = 0
    assert torch.allclose(model(calib_ids).logits, ref(calib_ids).logits)
    gen = model.generate(calib_ids[:1, :8], max_new_tokens=4, do_sample=False)  # KV cache
    assert gen.shape == (1, 12)


def test_loss_deltas_positive_for_real_blocks(calib_ids: torch.Tensor) -> None:
    d = loss_deltas(tiny_model("llama"), calib_ids, 4)
    assert d.shape == (2,) and torch.isfinite(d).all()
