"""ProSparse: the progressive λ schedule by hand, ReLU-fication that reloads, the L1 term
and zero count against a hand computation, and the penalty raising sparsity in training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from sparsellm.errors import SparseLLMError
from sparsellm.models.tiny import tiny_model
from sparsellm.recover.distill import DistillConfig, distill
from sparsellm.recover.prosparse import ActivationL1, progressive_lambda, relufy


def test_progressive_lambda_rises_along_a_quarter_sine_per_stage() -> None:
    stages = [1.0, 3.0]
    assert progressive_lambda(0.0, stages) == 0.0
    assert progressive_lambda(0.25, stages) == pytest.approx(math.sin(math.pi / 4))
    assert progressive_lambda(0.5, stages) == pytest.approx(1.0)
    assert progressive_lambda(0.75, stages) == pytest.approx(1 + 2 * math.sin(math.pi / 4))
    assert progressive_lambda(1.0, stages) == pytest.approx(3.0)
    assert progressive_lambda(7.0, stages) == pytest.approx(3.0)
    for bad in ([], [1.0, -1.0]):
        with pytest.raises(SparseLLMError):
            progressive_lambda(0.5, bad)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_relufy_swaps_the_gate_activation_and_reloads_as_relu(tmp_path) -> None:
    model = tiny_model("llama", 0)
    assert relufy(model) == model.config.num_hidden_layers
    assert all(isinstance(b.mlp.act_fn, nn.ReLU) for b in model.model.layers)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()).logits, model(_ids()).logits)


def test_l1_penalty_and_zero_fraction_match_a_hand_count() -> None:
    model = tiny_model("llama", 1)
    relufy(model)
    pre = []
    hooks = [
        b.mlp.gate_proj.register_forward_hook(lambda m, i, o: pre.append(o.detach()))
        for b in model.model.layers
    ]
    with ActivationL1(model) as l1:
        model(_ids())
        penalty = l1.penalty()
        zeros = l1.zero_fraction()
    for h in hooks:
        h.remove()
    assert penalty.requires_grad
    expect = torch.stack([p.clamp_min(0).mean() for p in pre]).mean()
    torch.testing.assert_close(penalty.detach(), expect)
    assert zeros == pytest.approx(float(torch.cat([p.flatten() for p in pre]).le(0).float().mean()))
    assert l1.penalty().item() == 0.0  # consumed


def test_the_penalty_raises_activation_sparsity_during_training() -> None:
    def trained(lam: float) -> float:
        torch.manual_seed(0)
        teacher = tiny_model("llama", 2)
        student = copy.deepcopy(teacher)
        relufy(student)
        data = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))
        cfg = DistillConfig(steps=15, batch_size=2, lr=3e-3, warmup=1)
        with ActivationL1(student) as l1:
            distill(student, teacher, data, cfg, regularizer=lambda p: lam * l1.penalty())
            l1.reset()
            with torch.no_grad():
                student(data)
            return l1.zero_fraction()

    assert trained(50.0) > trained(0.0) + 0.05
