"""WeLore-style ranks: threshold maths by hand, exact factors, reload."""

from __future__ import annotations

from pathlib import Path

import torch

import sparsellm
from sparsellm.methods.structured import apply_structured
from sparsellm.methods.structured.lowrank import (
    WeLoreConfig,
    WeLoreSparseConfig,
    allocate_ranks,
    factorise,
    ranks_for_threshold,
    split_budget,
    split_sparse_low_rank,
)
from sparsellm.models.tiny import tiny_model


def test_ranks_for_threshold_by_hand() -> None:
    spectra = [torch.tensor([4.0, 2.0, 1.0]), torch.tensor([1.0, 0.9, 0.8])]
    assert ranks_for_threshold(spectra, 0.4) == [2, 3]
    assert ranks_for_threshold(spectra, 0.99) == [1, 1]


def test_allocate_prefers_fast_decay() -> None:
    fast = torch.tensor([10.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    flat = torch.ones(8)
    ranks = allocate_ranks([fast, flat], [(8, 8), (8, 8)], 0.3)
    assert ranks == [1, None]  # 1*(8+8)=16 of 64 params: 48/128 = 37.5% removed
    assert allocate_ranks([fast, flat], [(8, 8), (8, 8)], 0.0) == [None, None]


def test_full_rank_factors_are_exact() -> None:
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    assert torch.allclose(factorise(lin, 4)(x), lin(x), atol=1e-6)


def test_welore_shrinks_and_reloads(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = tiny_model("llama")
    ref = model(calib_ids).logits
    assert apply_structured(model, WeLoreConfig(ratio=0.0))["measured_ratio"] == 0
    assert torch.equal(model(calib_ids).logits, ref)
    report = apply_structured(model, WeLoreConfig(ratio=0.3))  # reads no data
    assert 0.2 < report["measured_ratio"] < 0.4 and report["ranks"]
    model.save_pretrained(tmp_path)
    again = sparsellm.load(tmp_path).model
    assert torch.equal(again(calib_ids).logits, model(calib_ids).logits)


def test_split_recovers_low_rank_plus_spikes() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 2, generator=g) @ torch.randn(2, 10, generator=g)
    spikes = torch.tensor([[0, 3], [5, 7], [11, 0]])
    w[spikes[:, 0], spikes[:, 1]] += torch.tensor([20.0, -15.0, 30.0])
    a, b, index, values = split_sparse_low_rank(w, 2, 3, iters=50)
    approx = (b @ a).index_put((index[0], index[1]), values, accumulate=True)
    assert torch.allclose(approx, w.double(), atol=1e-6)
    assert sorted(index.T.tolist()) == sorted(spikes.tolist())


def test_split_no_worse_than_low_rank_alone() -> None:
    w = torch.randn(16, 12)
    a, b, index, values = split_sparse_low_rank(w, 3, 20)
    split = (b @ a).index_put((index[0], index[1]), values, accumulate=True)
    lin = torch.nn.Linear(12, 16, bias=False)
    lin.weight.data.copy_(w)
    plain = factorise(lin, 3)
    plain_err = (plain.b @ plain.a - w).norm()
    assert (split.float() - w).norm() < plain_err


def test_sparse_factor_forward_matches_its_matrix() -> None:
    lin = torch.nn.Linear(10, 8)
    lr = factorise(lin, 2, nnz=12)
    rows, cols = lr.sparse_index
    w = (lr.b @ lr.a).index_put((rows, cols), lr.sparse_values, accumulate=True)
    x = torch.randn(2, 3, 10)
    assert torch.allclose(lr(x), x @ w.T + lr.bias, atol=1e-5)  # training: COO path
    with torch.no_grad():  # inference: the cached CSR copy
        torch.testing.assert_close(lr(x), x @ w.T + lr.bias, atol=1e-5, rtol=1e-5)
        lr.sparse_values.mul_(2)  # a new version of the values: the copy is rebuilt
        w2 = (lr.b @ lr.a).index_put((rows, cols), lr.sparse_values, accumulate=True)
        torch.testing.assert_close(lr(x), x @ w2.T + lr.bias, atol=1e-5, rtol=1e-5)
    lr(x).sum().backward()
    assert lr.sparse_values.grad is not None and lr.sparse_values.grad.abs().sum() > 0


def test_split_budget_keeps_parameter_count() -> None:
    assert split_budget(8, (30, 20), 0.25) == (6, 100)
    assert split_budget(1, (30, 20), 0.25) == (1, 0)


def test_welore_sparse_shrinks_and_reloads(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = tiny_model("llama")
    report = apply_structured(model, WeLoreSparseConfig(ratio=0.3))
    assert 0.2 < report["measured_ratio"] < 0.4
    assert any(nnz > 0 for _, nnz in report["ranks"].values())
    out = model(calib_ids).logits
    model.save_pretrained(tmp_path)
    again = sparsellm.load(tmp_path).model
    assert torch.equal(again(calib_ids).logits, out)
