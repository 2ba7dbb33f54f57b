import copy
import math

import pytest
import torch
from torch import nn

from sparsellm.api import sparsify
from sparsellm.errors import SparseLLMError
from sparsellm.models.tiny import tiny_model
from sparsellm.recover.distill import DistillConfig, _lr_at, distill, feature_loss, kl_loss
from sparsellm.recover.lora import MaskedLoRALinear, add_lora, merge_lora


def _pruned(calib_ids, pattern="2:4"):
    dense = tiny_model("llama")
    sparse = copy.deepcopy(dense)
    sparsify(sparse, [{"method": "wanda", "pattern": pattern}], calib_ids)
    zeros = {n: p == 0 for n, p in sparse.named_parameters()}
    return dense, sparse, zeros


def test_losses_by_hand():
    teacher = torch.tensor([[0.0, 0.0]])
    student = torch.tensor([[math.log(3.0), 0.0]])  # p = .75, .25
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert kl_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    hs, ht = (torch.tensor([1.0, 3.0]),), (torch.tensor([1.0, 1.0]),)
    assert feature_loss(hs, ht).item() == pytest.approx(2.0)  # (0 + 4) / (1 + 1)


@pytest.mark.parametrize("bf16", [False, True])
def test_full_distillation_keeps_zeros_and_lowers_the_loss(calib_ids, bf16):
    dense, sparse, zeros = _pruned(calib_ids)
    cfg = DistillConfig(steps=30, lr=3e-3, warmup=2, bf16=bf16)
    log = distill(sparse, dense, calib_ids, cfg)
    assert sum(log.losses[-5:]) < sum(log.losses[:5])
    for name, p in sparse.named_parameters():
        assert (p[zeros[name]] == 0).all(), name
        assert p.dtype == torch.float32, name  # autocast leaves the master weights fp32
    with torch.no_grad():
        assert torch.isfinite(sparse(input_ids=calib_ids[:1]).logits).all()


def test_time_budget_stops_training_and_ends_the_schedule(calib_ids):
    dense, sparse, _ = _pruned(calib_ids)
    log = distill(sparse, dense, calib_ids, DistillConfig(steps=50, max_seconds=1e-9))
    assert len(log.losses) == 1  # the first step always runs
    cfg = DistillConfig(steps=100, lr=1.0, warmup=0, max_seconds=10.0)
    assert _lr_at(1, cfg, 5.0) == pytest.approx(0.5)  # halfway in time: cosine at 1/2
    assert _lr_at(1, cfg, 20.0) == pytest.approx(0.0)
    with pytest.raises(SparseLLMError, match="max_seconds"):
        DistillConfig(max_seconds=0)


def test_masked_lora_starts_as_identity_and_merges_exactly(calib_ids):
    dense, sparse, zeros = _pruned(calib_ids, "unstructured")
    with torch.no_grad():
        before = sparse(input_ids=calib_ids[:2]).logits
    wrapped = add_lora(sparse, rank=4)
    assert wrapped and all(isinstance(w, MaskedLoRALinear) for w in wrapped)
    with torch.no_grad():
        assert torch.equal(sparse(input_ids=calib_ids[:2]).logits, before)  # B = 0
    distill(sparse, dense, calib_ids, DistillConfig(steps=10, lr=1e-2, warmup=1))
    with torch.no_grad():
        trained = sparse(input_ids=calib_ids[:2]).logits
    assert not torch.allclose(trained, before)
    assert merge_lora(sparse) == len(wrapped)
    assert not any(isinstance(m, MaskedLoRALinear) for m in sparse.modules())
    assert all(isinstance(b.mlp.down_proj, nn.Linear) for b in sparse.model.layers)
    with torch.no_grad():
        merged = sparse(input_ids=calib_ids[:2]).logits
    assert torch.allclose(merged, trained, atol=1e-5)
    for name, p in sparse.named_parameters():
        assert (p[zeros[name]] == 0).all(), name
