"""PST: the N:M detection, the hard mask, the straight-through score gradient by hand, and
a trained adapter that merges exactly in the start's pattern."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.models.tiny import tiny_model
from sparsellm.recover.lora import merge_lora
from sparsellm.recover.pst import PSTLinear, add_pst, nm_pattern, top_mask


def _two_four(out_f: int, in_f: int, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    w = torch.randn(out_f, in_f, generator=g)
    groups = w.view(out_f, -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter(
        -1, groups.abs().topk(2, -1).indices, True
    )
    lin.weight.data = (groups * keep).view(out_f, in_f)
    return lin


def test_nm_pattern_finds_two_four_even_with_thinner_groups_and_refuses_unstructured() -> None:
    keep = _two_four(3, 8).weight != 0
    assert nm_pattern(keep) == (2, 4)
    thinner = keep.clone()
    thinner[0, :4] = torch.tensor([True, False, False, False])  # a kept weight that is 0
    assert nm_pattern(thinner) == (2, 4)
    uneven = keep.clone()
    uneven[0, :4] = True  # one group with four kept
    assert nm_pattern(uneven) is None


def test_top_mask_by_hand() -> None:
    s = torch.tensor([[0.1, 0.9, 0.5, 0.2, 3.0, 1.0, 2.0, 0.0]])
    assert top_mask(s, torch.tensor([3]), (2, 4)).int().tolist() == [[0, 1, 1, 0, 1, 0, 1, 0]]
    assert top_mask(s, torch.tensor([3]), None).int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 0]]


def test_starts_as_the_base_layer_and_the_score_gets_the_mask_gradient() -> None:
    base = _two_four(2, 8)
    pst = PSTLinear(base, rank=2)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pst(x), F.linear(x, base.weight))
    pst(x).sum().backward()
    # L = Σ x W'ᵀ: dL/dW'_ij = Σ_b x_bj; dL/dS_ij = that · (W + ΔW)_ij, ΔW = 0 at start
    d_s = x.sum(0)[None, :] * base.weight
    torch.testing.assert_close(pst.score_col.grad, d_s.sum(0, keepdim=True))
    torch.testing.assert_close(pst.score_row.grad, d_s.sum(1, keepdim=True))
    assert pst.lora_a.grad.abs().sum() == 0  # B starts at zero, as LoRA's


def test_trained_adapter_merges_exactly_and_keeps_two_four() -> None:
    torch.manual_seed(0)
    model = tiny_model("llama", 0)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.shape[1] % 4 == 0 and m is not model.lm_head:
            w = m.weight.data.view(m.weight.shape[0], -1, 4)
            top = w.abs().topk(2, -1).indices
            keep = torch.zeros_like(w, dtype=torch.bool).scatter(-1, top, True)
            m.weight.data = (w * keep).view_as(m.weight)
    wrapped = add_pst(model, rank=4)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    masks = [w.mask() for w in wrapped]
    starts = [w.keep.clone() for w in wrapped]
    with torch.no_grad():
        trained = model(ids).logits
    assert merge_lora(model) == len(wrapped)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained, atol=1e-4, rtol=1e-4)
    for w, mask in zip(wrapped, masks, strict=True):
        weight = w.base_layer.weight
        assert not weight[~mask].any()  # merged zeros are the learned mask's
        assert nm_pattern(mask) == (2, 4)
    assert any(not torch.equal(m, s) for m, s in zip(masks, starts, strict=True))  # it moved
