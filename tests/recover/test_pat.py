"""PAT: the mask schedule and losses by hand, identity at the start, exact merging."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsellm.errors import SparseLLMError
from sparsellm.models.tiny import tiny_model
from sparsellm.recover.pat import (
    HSM,
    add_pat,
    hsms,
    identity_loss,
    mask_loss,
    mask_value,
    merge_pat,
    pat_regularizer,
)

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_mask_schedule_by_hand() -> None:
    mu = torch.tensor([0.0, 1.0, -1.0])
    # start: T = 1, offset 0.5 -> sigmoid(mu) + 0.5
    torch.testing.assert_close(mask_value(mu, 0.0, 100), torch.sigmoid(mu) + 0.5)
    # half-way through 100 steps: t = 50, T = 1 / (1 - log 50 / log 100), no offset
    t = 1 / (1 - math.log(50) / math.log(100) + 1e-6)
    torch.testing.assert_close(mask_value(mu, 0.5, 100), torch.sigmoid(t * mu))
    # frozen from 80% on: the same value at 0.9 as at 0.8, and no gradient to mu
    mu_g = mu.clone().requires_grad_()
    late = mask_value(mu_g, 0.9, 100)
    torch.testing.assert_close(late, mask_value(mu, 0.8, 100))
    assert not late.requires_grad


def test_mask_loss_and_identity_loss_by_hand() -> None:
    mu = torch.tensor([1.0, -1.0, 0.2, -0.3], requires_grad=True)
    # count(mu >= 0) = 2 = keep; (0.25 + 0.09) / 2 + (0.25 + 0.04) / 2
    torch.testing.assert_close(mask_loss(mu, 2), torch.tensor(0.17 + 0.145))
    mask_loss(mu, 1).backward()  # one too many kept: the count term pushes every mu down
    polar = torch.tensor([1.0 - 0.5, -1.0 + 0.5, 0.2 - 0.5, -0.3 + 0.5])  # d/dmu of means
    torch.testing.assert_close(mu.grad, 10 / 1 + polar)
    q, _ = torch.linalg.qr(torch.randn(8, 3))
    assert identity_loss(q.T) < 1e-12
    assert identity_loss(2 * q.T) == pytest.approx(3.0, rel=1e-5)  # (4 - 1)² on 3 of 9 entries


def test_fresh_hsms_leave_the_model_unchanged() -> None:
    model = tiny_model("llama", 0)
    with torch.no_grad():
        dense = model(IDS).logits
        add_pat(model, fraction=0.25, steps=10)
        torch.testing.assert_close(model(IDS).logits, dense)
    assert len(hsms(model)) == 1 + 2 * model.config.num_hidden_layers


@pytest.mark.parametrize("tied", [False, True])
def test_merge_is_the_masked_model_at_the_smaller_width(tied: bool, tmp_path) -> None:
    model = tiny_model("llama", 1)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    mask = add_pat(model, fraction=0.25, steps=10)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        mask.mu.copy_(torch.randn(mask.mu.shape, generator=g))
        for h in hsms(model):
            if h.a is not None:
                h.b.copy_(torch.randn(h.b.shape, generator=g) * 0.05)
                h.scale.copy_(1 + 0.1 * torch.randn(h.scale.shape, generator=g))
        mask.hard = True
        masked = model(IDS).logits
        width = merge_pat(model)
        assert width == model.config.hidden_size == 48  # 64 * 0.75, a multiple of lcm(4, 8)
        torch.testing.assert_close(model(IDS).logits, masked, atol=1e-5, rtol=1e-4)
        assert not any(isinstance(m, HSM) for m in model.modules())
        model.save_pretrained(tmp_path)
        again = AutoModelForCausalLM.from_pretrained(tmp_path)
        torch.testing.assert_close(again(IDS).logits, masked, atol=1e-5, rtol=1e-4)
    assert model.model.embed_tokens.weight.shape[1] == 48
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_regularizer_trains_the_mask_towards_the_target() -> None:
    model = tiny_model("llama", 3)
    for p in model.parameters():
        p.requires_grad_(False)
    mask = add_pat(model, fraction=0.25, steps=60, speed=20.0)
    reg = pat_regularizer(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(60):
        loss = model(IDS, labels=IDS).loss + reg(step / 60)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mask.progress == pytest.approx(59 / 60)
    logits = mask.logits().detach()
    assert abs(int((logits >= 0).sum()) - mask.keep) <= 2
    assert logits.std() > 0.05, "the channels' logits moved apart"


def test_bad_input_is_refused() -> None:
    with pytest.raises(SparseLLMError, match="fraction"):
        add_pat(tiny_model("llama", 0), fraction=1.0)
    with pytest.raises(SparseLLMError, match="does not support 'gemma3_text'"):
        add_pat(tiny_model("gemma3_text", 0))
