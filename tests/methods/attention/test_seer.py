"""SeerAttention: the gate's inputs, its distillation target, its loss and recall by hand,
a gate that learns a planted pattern, and the calibrated method run on a tiny model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sparsellm.config import from_spec
from sparsellm.errors import SparseLLMError
from sparsellm.integrations.transformers import run_calibration, sparse_attention
from sparsellm.methods.attention import patterns as P
from sparsellm.methods.attention.seer import (
    BUCKETS,
    Seer,
    block_truth,
    distance_buckets,
    fit_gate,
    gate_features,
    gate_log_probs,
    kl_to_truth,
    mass_recall_at_density,
    recall_at_density,
    save_gates,
)
from sparsellm.models.tiny import tiny_model


def test_gate_features_pool_queries_by_mean_and_keys_by_max_min_mean() -> None:
    key = torch.tensor([1.0, 5.0, -2.0, 4.0, 3.0]).view(1, 1, 5, 1)  # blocks {1,5} {-2,4} {3}
    qf, kf = gate_features(key, key, 2)
    assert qf.flatten().tolist() == [3.0, 1.0, 3.0]
    assert kf[0, 0].tolist() == [[5.0, 1.0, 3.0], [4.0, -2.0, 1.0], [3.0, 3.0, 3.0]]


def test_block_truth_is_the_max_pooled_attention_renormalised_per_row() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 3), torch.randn(1, 1, 6, 3)  # two query heads share a KV head
    scale = 0.7
    expect = torch.zeros(3, 3)
    for h in range(2):
        s = (q[0, h] @ k[0, 0].T) * scale
        s = s.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
        p = torch.softmax(s, -1)
        pooled = torch.tensor(
            [[p[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].max() for j in range(3)] for i in range(3)]
        )
        expect += pooled / pooled.sum(-1, keepdim=True) / 2
    for chunk in (1, 8):
        got = block_truth(q, k, 2, scale, chunk=chunk)
        torch.testing.assert_close(got[0, 0], expect)
    assert got[0, 0].triu(1).abs().sum() == 0


def test_kl_is_zero_at_the_target_and_positive_elsewhere() -> None:
    truth = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.5, 0.25, 0.25]])
    assert kl_to_truth(truth, truth.clamp_min(1e-30).log()).abs() < 1e-6
    uniform = torch.tensor([[1.0, 1, 1], [0.5, 0.5, 1], [1 / 3, 1 / 3, 1 / 3]]).log()
    # rows 1 and 2 (row 0 excluded): KL((.25,.75)||(.5,.5)) and KL((.5,.25,.25)||uniform)
    by_hand = (
        0.25 * math.log(0.5) + 0.75 * math.log(1.5) + 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    ) / 2
    assert kl_to_truth(truth, uniform).item() == pytest.approx(by_hand, rel=1e-5)


def test_recall_at_density_by_hand() -> None:
    # density 0.5 keeps ceil(0.5 * [1, 2, 3, 4]) = [1, 1, 2, 2] blocks; row 0 is left out
    truth = torch.tensor(
        [[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.1, 0.5, 0.4, 0], [0.4, 0.3, 0.2, 0.1]]
    )
    scores = torch.tensor(
        [[1.0, 0, 0, 0], [0.1, 0.9, 0, 0], [0.2, 0.5, 0.3, 0], [0.4, 0.1, 0.2, 0.3]]
    )
    # row 1: {0} vs {1}: 0; row 2: {1,2} vs {1,2}: 1; row 3: {0,1} vs {0,3}: 1/2
    assert recall_at_density(scores, truth, 0.5) == pytest.approx(0.5)
    assert recall_at_density(truth, truth, 0.25) == 1.0
    # mass: row 1 0.1 of 0.9; row 2 0.9 of 0.9; row 3 (0.4 + 0.1) of (0.4 + 0.3)
    assert mass_recall_at_density(scores, truth, 0.5) == pytest.approx((1 / 9 + 1 + 5 / 7) / 3)


def test_distance_buckets_are_log2_of_the_block_distance() -> None:
    got = distance_buckets(9)
    assert got[8].tolist() == [4, 3, 3, 3, 3, 2, 2, 1, 0]  # distances 8, 7, ..., 0
    assert (got.triu(1) == 0).all()


def test_fit_gate_recovers_a_planted_gate() -> None:
    g = torch.Generator().manual_seed(0)
    bias = torch.zeros(2, BUCKETS)
    bias[:, 0] = 2.0  # both heads favour the diagonal block
    true = (torch.randn(2, 4, 3, generator=g), torch.randn(1, 12, 3, generator=g), bias)
    data = []
    for _ in range(4):
        qf, kf = torch.randn(1, 2, 16, 4, generator=g), torch.randn(1, 1, 16, 12, generator=g)
        truth = gate_log_probs(true, qf, kf).exp() * P.causal_blocks(16)
        data.append((qf, kf, truth))
    start = fit_gate(data, dim=3, steps=0, lr=0.05)
    fitted = fit_gate(data, dim=3, steps=300, lr=0.05)
    qf, kf, truth = data[0]
    before = kl_to_truth(truth, gate_log_probs(start, qf, kf))
    after = kl_to_truth(truth, gate_log_probs(fitted, qf, kf))
    assert after < 0.1 * before
    assert recall_at_density(gate_log_probs(fitted, qf, kf), truth, 0.25) > 0.9


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_calibrated_gate_runs_full_budget_exactly_and_sparse_budget_differently(
    family: str, tmp_path
) -> None:
    model = tiny_model(family, 1)
    ids = _ids(200)
    spec = "seer:sink=0,window=16,block=16,min_length=0,steps=20"
    cfg = from_spec(spec, family="prefill")
    assert cfg.needs_calibration()
    trained = run_calibration(model, _ids(128, seed=1), cfg.calibration(128))
    assert not trained.needs_calibration()
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_attention(model, trained):  # 16 blocks cover all 13: exact
            full = model(ids).logits
        with sparse_attention(model, dataclasses.replace(trained, blocks=1)):
            sparse = model(ids).logits
    torch.testing.assert_close(full, dense, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, dense, atol=1e-4)
    path = str(tmp_path / "gates.safetensors")
    save_gates(trained, path)
    loaded = from_spec(f"{spec},blocks=1,gate={path}", family="prefill")
    layer = next(i for i, gate in enumerate(trained.gates) if gate is not None)
    (hq, d, _), hkv = trained.gates[layer][0].shape, trained.gates[layer][1].shape[0]
    q, k = torch.randn(1, hq, 200, d), torch.randn(1, hkv, 200, d)
    assert torch.equal(
        loaded.block_mask(q, k, layer),
        dataclasses.replace(trained, blocks=1).block_mask(q, k, layer),
    )


def test_missing_gates_and_short_calibration_are_refused(tmp_path) -> None:
    with pytest.raises(SparseLLMError, match="cannot read seer gates"):
        Seer(gate=str(tmp_path / "none.safetensors"))
    with pytest.raises(SparseLLMError, match=">= 256 tokens"):
        Seer().calibration(100)
