import copy

import pytest
import torch
from torch import nn

from sparsellm.api import sparsify
from sparsellm.errors import SparseLLMError
from sparsellm.models.tiny import tiny_model
from sparsellm.recover.distill import DistillConfig, distill
from sparsellm.recover.dsee import DSEELinear, add_dsee, sparse_support
from sparsellm.recover.lora import merge_lora
from sparsellm.recover.sora import GateProximal, SoRALinear, active_ranks, add_sora, soft_threshold


def _pruned(calib_ids):
    dense = tiny_model("llama")
    sparse = copy.deepcopy(dense)
    sparsify(sparse, [{"method": "wanda", "pattern": "2:4"}], calib_ids)
    zeros = {n: p == 0 for n, p in sparse.named_parameters()}
    return dense, sparse, zeros


def test_soft_threshold_by_hand():
    x = torch.tensor([-3.0, -0.5, 0.2, 2.0, 0.0])
    assert torch.equal(soft_threshold(x, 1.0), torch.tensor([-2.0, 0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(soft_threshold(x, 0.0), x)
    with pytest.raises(SparseLLMError):
        soft_threshold(x, -1.0)


def test_gate_proximal_step_thresholds_by_lambda_times_lr():
    gate = nn.Parameter(torch.tensor([0.5, -0.15, 0.1, -2.0]))
    GateProximal([gate], lam=2.0)(0.1)  # threshold 0.2
    assert torch.allclose(gate.data, torch.tensor([0.3, 0.0, 0.0, -1.8]))


def test_sora_delta_is_the_gated_masked_product_by_hand():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 3.0]]))  # (0, 1) pruned
    m = SoRALinear(lin, rank=2, alpha=2.0)  # scale 1
    with torch.no_grad():
        m.lora_a.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        m.lora_b.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        m.gate.copy_(torch.tensor([2.0, 0.0]))  # the second component is pruned
    # B diag(g) A = [[2, 4], [0, 0]]; masked: (0, 1) -> 0
    assert torch.equal(m.delta(), torch.tensor([[2.0, 0.0], [0.0, 0.0]]))


def test_sora_prunes_gates_to_exact_zeros_and_merges_exactly(calib_ids):
    dense, sparse, zeros = _pruned(calib_ids)
    with torch.no_grad():
        before = sparse(input_ids=calib_ids[:2]).logits
    wrapped, prox = add_sora(sparse, rank=8, lam=30.0)
    with torch.no_grad():  # B = 0: the wrapped model starts as the sparse one
        assert torch.equal(sparse(input_ids=calib_ids[:2]).logits, before)
    distill(sparse, dense, calib_ids, DistillConfig(steps=10, lr=1e-2, warmup=1), prox)
    ranks = active_ranks(sparse)
    # λ·η sums to about 1.5 over the run: small gates die, large ones (|g| > 1.5) live
    assert len(ranks) == len(wrapped) and 0 < sum(ranks) < 8 * len(wrapped)
    with torch.no_grad():
        trained = sparse(input_ids=calib_ids[:2]).logits
    merge_lora(sparse)
    assert not any(isinstance(m, SoRALinear) for m in sparse.modules())
    with torch.no_grad():
        assert torch.allclose(sparse(input_ids=calib_ids[:2]).logits, trained, atol=1e-5)
    for name, p in sparse.named_parameters():
        assert (p[zeros[name]] == 0).all(), name


def test_dsee_support_is_the_largest_residual_after_the_low_rank_part():
    # singular values 10, 3, 2 with axis-aligned vectors: rank r removes the r largest
    w = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, -2.0, 0.0, 0.0]])
    keep = w != 0
    assert sparse_support(w, keep, 0, 1).tolist() == [0]  # the largest |W|: (0, 0)
    assert sparse_support(w, keep, 1, 2).tolist() == [1 * 4 + 2, 2 * 4 + 1]
    assert sparse_support(w, keep, 2, 1).tolist() == [2 * 4 + 1]
    keep[1, 2] = False  # a pruned position is never in the support, nor are more than kept
    assert sparse_support(w, keep, 1, 5).tolist() == [0, 2 * 4 + 1]
    assert sparse_support(w, torch.zeros_like(keep), 1, 3).numel() == 0


def test_dsee_delta_adds_the_sparse_values_on_their_support():
    lin = nn.Linear(4, 3, bias=False)
    m = DSEELinear(lin, rank=1, alpha=1.0, n_sparse=2)
    with torch.no_grad():
        m.sparse_values.copy_(torch.tensor([10.0, 20.0]))
    d = m.delta().flatten()  # B = 0: only the sparse part
    i, j = m.support.tolist()
    assert d[i] == 10.0 and d[j] == 20.0 and d.count_nonzero() == 2


@pytest.mark.parametrize("bf16", [False, True])
def test_dsee_keeps_zeros_and_merges_exactly(calib_ids, bf16):
    dense, sparse, zeros = _pruned(calib_ids)
    wrapped = add_dsee(sparse, rank=4, n_sparse=16)
    assert all(w.support.numel() == 16 for w in wrapped)
    distill(sparse, dense, calib_ids, DistillConfig(steps=10, lr=1e-2, warmup=1, bf16=bf16))
    assert any(w.sparse_values.abs().sum() > 0 for w in wrapped)
    with torch.no_grad():
        trained = sparse(input_ids=calib_ids[:2]).logits
    merge_lora(sparse)
    with torch.no_grad():
        assert torch.allclose(sparse(input_ids=calib_ids[:2]).logits, trained, atol=1e-5)
    for name, p in sparse.named_parameters():
        assert (p[zeros[name]] == 0).all(), name
