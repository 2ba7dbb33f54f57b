import copy

import pytest
import torch

from sparsellm.api import sparsify
from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.maskllm import MaskLLMConfig, candidates, learn_masks, prior_logits
from sparsellm.models.tiny import tiny_model


def test_candidates_and_prior():
    c = candidates(2, 4)
    assert c.shape == (6, 4) and (c.sum(1) == 2).all() and len({tuple(r) for r in c.tolist()}) == 6
    keep = torch.tensor([[True, False, True, False, False, False, True, True]])
    logits = prior_logits(keep, c, 3.0)
    assert logits.shape == (1, 2, 6)
    for g in range(2):
        (k,) = torch.nonzero(logits[0, g]).flatten().tolist()
        assert c[k].tolist() == keep[0, 4 * g : 4 * g + 4].float().tolist()
        assert logits[0, g, k] == 3.0


def _setup(calib_ids):
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    sparsify(model, [{"method": "wanda", "pattern": "2:4"}], calib_ids)
    return dense, model


def test_zero_steps_keep_the_initial_mask(calib_ids):
    dense, model = _setup(calib_ids)
    before = [p.clone() for p in model.parameters()]
    log = learn_masks(model, dense, calib_ids, MaskLLMConfig(steps=0))
    assert log.changed_fraction == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_masks_are_valid_nm_at_every_step_and_training_helps(calib_ids):
    dense, model = _setup(calib_ids)

    def check(step, wrapped):
        for layer in wrapped:
            groups = layer.hard_mask().reshape(layer.dense.shape[0], -1, 4)
            assert (groups.sum(-1) == 2).all(), step

    cfg = MaskLLMConfig(steps=25, lr=0.2, prior=1.0, tau_start=2.0, tau_end=0.2)
    log = learn_masks(model, dense, calib_ids, cfg, on_step=check)
    assert sum(log.losses[-5:]) < sum(log.losses[:5])
    assert 0 < log.changed_fraction < 1
    for (name, p), d in zip(model.named_parameters(), dense.parameters(), strict=True):
        if ".layers." in name and p.dim() == 2:
            assert ((p == 0).reshape(p.shape[0], -1, 4).sum(-1) == 2).all(), name
            assert ((p == 0) | (p == d)).all()  # kept weights are the dense values
            assert p.requires_grad


def test_time_budget_stops_training_and_ends_the_annealing(calib_ids):
    dense, model = _setup(calib_ids)
    taus = []

    def record(step, wrapped):
        taus.append(wrapped[0].tau)

    cfg = MaskLLMConfig(steps=50, tau_start=4.0, tau_end=0.05, max_seconds=1e-9)
    log = learn_masks(model, dense, calib_ids, cfg, on_step=record)
    # one step always runs; the budget is spent by then, so τ is already at its end value
    assert len(log.losses) == 1
    assert taus == [pytest.approx(0.05)]
    with pytest.raises(SparseLLMError, match="max_seconds"):
        MaskLLMConfig(max_seconds=0)
