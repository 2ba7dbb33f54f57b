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
from sparsellm.methods.attention.rope import rope_angles, rotate
from sparsellm.methods.attention.seer import (
    BUCKETS,
    GateTraining,
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

THETA = 10000.0


def test_gate_features_pool_queries_by_mean_and_keys_by_max_min_mean() -> None:
    # position-free keys (x, 0), blocks {1,5} {-2,4} {3}, handed over rotated to 0..4
    pre = torch.tensor([1.0, 5.0, -2.0, 4.0, 3.0]).view(1, 1, 5, 1)
    pre = torch.cat([pre, torch.zeros_like(pre)], -1)
    key = rotate(pre, rope_angles(torch.arange(5), 500.0, 2))
    qf, kf = gate_features(key, key, 2, 500.0)
    torch.testing.assert_close(qf[0, 0, :, 0], torch.tensor([3.0, 1.0, 3.0]))
    by_hand = torch.tensor([[5.0, 1.0, 3.0], [4.0, -2.0, 1.0], [3.0, 3.0, 3.0]])
    torch.testing.assert_close(kf[0, 0, :, 0::2], by_hand)
    torch.testing.assert_close(kf[0, 0, :, 1::2], torch.zeros(3, 3), atol=1e-6, rtol=0)


def test_gate_features_pool_the_position_free_vectors() -> None:
    # one vector rotated to positions 0..7: post-RoPE its block mean shrinks (the pairs
    # turn), undone it pools back to itself; any other base leaves a residue
    d, theta = 8, 100.0
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    post = rotate(v.expand(1, 1, 8, d), rope_angles(torch.arange(8), theta, d))
    qf, kf = gate_features(post, post, 4, theta)
    torch.testing.assert_close(qf[0, 0], v.expand(2, d), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kf[0, 0], v.repeat(3).expand(2, 3 * d), atol=1e-5, rtol=1e-5)
    assert (post[0, 0, :4].mean(0) - v).abs().max() > 0.1
    wrong, _ = gate_features(post, post, 4, 2 * theta)
    assert (wrong[0, 0] - v).abs().max() > 0.1


def test_block_truth_is_the_max_pooled_attention_renormalised_per_row() -> None:
    torch.manual_seed(0)
    # two query heads share a KV head; 5 tokens: the last blocks hold one query, one key
    q, k = torch.randn(1, 2, 5, 3), torch.randn(1, 1, 5, 3)
    scale = 0.7
    expect = torch.zeros(3, 3)
    for h in range(2):
        s = (q[0, h] @ k[0, 0].T) * scale
        s = s.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
        p = torch.softmax(s, -1)
        pooled = torch.tensor(
            [[p[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].max() for j in range(3)] for i in range(3)]
        )
        expect += pooled / pooled.sum(-1, keepdim=True) / 2
    for chunk in (1, 8):
        got = block_truth(q, k, 2, scale, chunk=chunk)["max"]
        torch.testing.assert_close(got[0, 0], expect)
    assert got[0, 0].triu(1).abs().sum() == 0


def test_mass_target_is_the_block_share_of_attention_by_hand() -> None:
    # equal scores: query i spreads 1/(i+1) over keys 0..i. Query block 0 (queries 0, 1)
    # gives key block 0 everything; query block 1: query 2 gives blocks (2/3, 1/3), query
    # 3 (1/2, 1/2), so their mean (7/12, 5/12). A 5th query (a partial block) alone: 2/5
    # to each of blocks 0 and 1, 1/5 to block 2. Two query heads, the same map: their mean.
    q, k = torch.zeros(1, 2, 5, 2), torch.zeros(1, 1, 5, 2)
    for chunk in (1, 8):
        got = block_truth(q, k, 2, 1.0, chunk=chunk, pools=("mass", "max"))
        expect = torch.tensor([[1.0, 0, 0], [7 / 12, 5 / 12, 0], [0.4, 0.4, 0.2]])
        torch.testing.assert_close(got["mass"][0, 0], expect)
        assert set(got) == {"mass", "max"}
    with pytest.raises(SparseLLMError, match="unknown target sum; valid: mass, max"):
        block_truth(q, k, 2, 1.0, pools=("sum",))


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
    true = (torch.randn(2, 4, 4, generator=g), torch.randn(1, 12, 4, generator=g), bias)
    data = []
    for _ in range(4):
        qf, kf = torch.randn(1, 2, 16, 4, generator=g), torch.randn(1, 1, 16, 12, generator=g)
        truth = gate_log_probs(true, qf, kf, THETA, 16).exp() * P.causal_blocks(16)
        data.append((qf, kf, truth))
    start = fit_gate(data, dim=4, steps=0, lr=0.05, theta=THETA, block=16)
    fitted = fit_gate(data, dim=4, steps=300, lr=0.05, theta=THETA, block=16)
    qf, kf, truth = data[0]
    before = kl_to_truth(truth, gate_log_probs(start, qf, kf, THETA, 16))
    after = kl_to_truth(truth, gate_log_probs(fitted, qf, kf, THETA, 16))
    assert after < 0.1 * before
    assert recall_at_density(gate_log_probs(fitted, qf, kf, THETA, 16), truth, 0.25) > 0.9


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
    with pytest.raises(SparseLLMError, match="rotary base"):
        cfg.calibration(128)  # unbound: the gate could not undo the model's RoPE
    trained = run_calibration(model, _ids(128, seed=1), cfg.bind(model.config).calibration(128))
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
    loaded = from_spec(f"{spec},blocks=1,gate={path}", family="prefill").bind(model.config)
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
    with pytest.raises(SparseLLMError, match="even"):
        Seer(dim=15)
    with pytest.raises(SparseLLMError, match="unknown target sum"):
        Seer(target="sum")
    with pytest.raises(SparseLLMError, match="unknown target sum"):
        GateTraining(Seer(), pools=("sum",))  # refused before any forward
    with pytest.raises(SparseLLMError, match="rotary base"):
        Seer(
            gates=((torch.zeros(1, 2, 2), torch.zeros(1, 6, 2), torch.zeros(1, BUCKETS)),)
        ).block_mask(torch.zeros(1, 1, 256, 2), torch.zeros(1, 1, 256, 2), 0)


def test_gates_saved_before_pre_rope_features_are_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    path = str(tmp_path / "old.safetensors")
    save_file({"0.wq": torch.zeros(1)}, path, metadata={"method": "seer", "layers": "1"})
    with pytest.raises(SparseLLMError, match="post-RoPE features: train them again"):
        Seer(gate=path)


def test_gate_scores_depend_on_the_block_distance_not_the_position() -> None:
    # the same pooled content in every block: the gate's logits, before the softmax, are
    # a function of i - j only (its RoPE and its distance bias are both relative)
    g = torch.Generator().manual_seed(1)
    gate = (torch.randn(1, 4, 6, generator=g), torch.randn(1, 12, 6, generator=g),
            torch.randn(1, BUCKETS, generator=g))  # fmt: skip
    qf = torch.randn(4, generator=g).expand(1, 1, 10, 4)
    kf = torch.randn(12, generator=g).expand(1, 1, 10, 12)
    lp = gate_log_probs(gate, qf, kf, THETA, 16)[0, 0]
    # a row's log-softmax is its logits less one constant: lp[i, i-d] - lp[i, i] = f(d) - f(0)
    by_distance = []
    for d in range(1, 6):
        diffs = torch.stack([lp[i, i - d] - lp[i, i] for i in range(d, 10)])
        torch.testing.assert_close(diffs, diffs[:1].expand_as(diffs), atol=1e-4, rtol=1e-4)
        by_distance.append(diffs[0])
    assert torch.stack(by_distance).std() > 0.01  # and it does depend on the distance


def test_one_observation_fits_a_gate_per_target_and_refuses_an_unobserved_one() -> None:
    from sparsellm.integrations.transformers import observe_forward

    model = tiny_model("llama", 1)
    base = Seer(block=16, min_length=0, steps=5).bind(model.config)
    both = GateTraining(base, pools=("mass", "max"))
    observe_forward(model, _ids(128), both)
    by_target = {t: both.result(model, target=t) for t in ("mass", "max")}
    assert [c.target for c in by_target.values()] == ["mass", "max"]
    layer = next(i for i, gate in enumerate(by_target["max"].gates) if gate is not None)
    assert not torch.equal(by_target["mass"].gates[layer][0], by_target["max"].gates[layer][0])
    own = base.calibration(128)  # observes the base's own target only
    assert own.pools == ("mass",)
    observe_forward(model, _ids(128), own)
    with pytest.raises(SparseLLMError, match="target max was not observed"):
        own.result(model, target="max")


def test_loaded_gates_report_the_target_they_learned(tmp_path) -> None:
    from safetensors.torch import save_file

    gate = (torch.zeros(1, 2, 2), torch.zeros(1, 6, 2), torch.zeros(1, BUCKETS))
    path = str(tmp_path / "max.safetensors")
    save_gates(Seer(target="max", gates=(None, gate)), path)
    loaded = Seer(gate=path)  # the default target is mass; the file's wins
    assert loaded.target == "max" and loaded.gates[0] is None
    assert torch.equal(loaded.gates[1][1], gate[1])
    # written before targets were recorded: those gates learned the max-pooled map
    tensors = {f"0.{part}": t for part, t in zip(("wq", "wk", "bias"), gate, strict=True)}
    meta = {"method": "seer", "layers": "1", "features": "pre-rope"}
    save_file(tensors, path, metadata=meta)
    assert Seer(gate=path).target == "max"
