"""Depth pruning: which block goes (angular vs loss), renumbering, cache, ratio 0."""

from __future__ import annotations

import pytest
import torch

from sparsellm.methods.structured import apply_structured
from sparsellm.methods.structured.depth import (
    DepthConfig,
    DepthPPLConfig,
    blocks_to_drop,
    loss_deltas,
)
from sparsellm.models.adapters import get_blocks
from sparsellm.models.tiny import tiny_model

IDENTITY, NOISY = 2, 0  # the planted blocks of `_planted`


def _planted() -> torch.nn.Module:
    """Four blocks: block 2 writes nothing (an exact identity: angular distance 0, and
    skipping it changes no loss), block 0 writes 20x amplified noise into the stream (it
    turns the stream most, yet the random model's loss is lowest without it)."""
    model = tiny_model("llama", layers=4)
    blocks = get_blocks(model)
    with torch.no_grad():
        blocks[IDENTITY].self_attn.o_proj.weight.zero_()
        blocks[IDENTITY].mlp.down_proj.weight.zero_()
        blocks[NOISY].mlp.down_proj.weight.mul_(20)
    return model


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    batches = ids.split(4)
    return sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)


def _without(i: int) -> torch.nn.Module:
    model = _planted()
    del get_blocks(model)[i]
    for j, block in enumerate(get_blocks(model)):
        block.self_attn.layer_idx = j
    return model


def test_blocks_to_drop_lowest_scores() -> None:
    assert blocks_to_drop(torch.tensor([0.3, 0.1, 0.5, 0.2]), 0.5).tolist() == [1, 3]
    assert blocks_to_drop(torch.tensor([0.3, 0.1]), 0.9).tolist() == [1]  # one block stays


def test_angular_drops_the_identity_block_and_keeps_logits(calib_ids: torch.Tensor) -> None:
    model = _planted()
    ref = model(calib_ids).logits
    report = apply_structured(model, DepthConfig(ratio=0.25), calib_ids)
    assert report["dropped_blocks"] == [IDENTITY]
    assert report["measured_ratio"] == pytest.approx(0.25)
    assert model.config.num_hidden_layers == 3
    # the dropped block added exact zeros: the function is unchanged
    assert torch.equal(model(calib_ids).logits, ref)


@torch.no_grad()
def test_loss_deltas_match_removing_each_block_by_hand(calib_ids: torch.Tensor) -> None:
    base = _loss(_planted(), calib_ids)
    by_hand = torch.tensor([_loss(_without(i), calib_ids) - base for i in range(4)])
    deltas = loss_deltas(_planted(), calib_ids, 4)
    assert torch.allclose(deltas, by_hand, atol=1e-5)
    assert deltas[IDENTITY].abs() < 1e-6  # skipping an identity block costs nothing
    assert deltas.argmin() == NOISY  # removing the noise helps most


def test_ppl_drops_the_block_whose_removal_helps_most(calib_ids: torch.Tensor) -> None:
    """Angular and loss scores disagree here: each config must use its own score."""
    model = _planted()
    report = apply_structured(model, DepthPPLConfig(ratio=0.25), calib_ids)
    assert report["method"] == "depth-ppl" and report["dropped_blocks"] == [NOISY]
    expected = _without(NOISY)(calib_ids).logits
    assert torch.allclose(model(calib_ids).logits, expected, atol=1e-5)


def test_ratio_zero_keeps_logits(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    ref = model(calib_ids).logits
    assert apply_structured(model, DepthConfig(ratio=0.0), calib_ids)["dropped_blocks"] == []
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
