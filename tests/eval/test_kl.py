import math

import pytest
import torch

import sparsellm as sl
from sparsellm.eval.kl import compare_logprobs, compare_models
from sparsellm.eval.perplexity import perplexity
from sparsellm.models.tiny import tiny_model


def test_kl_hand_computed():
    """Every position: dense uniform over 2 tokens, sparse [3/4, 1/4]; target token 0."""
    uniform = torch.log(torch.tensor([[0.5, 0.5]])).expand(4, 2)
    skewed = torch.log(torch.tensor([[0.75, 0.25]])).expand(4, 2)
    targets = torch.zeros(4, dtype=torch.long)
    out = compare_logprobs([(targets, uniform, skewed), (targets, uniform, skewed)])
    # KL(u ‖ [3/4, 1/4]) = ½ ln(½ / ¾) + ½ ln(½ / ¼) = ½ ln(4/3)
    assert out["kl"] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert out["dense_ppl"] == pytest.approx(2.0)
    assert out["sparse_ppl"] == pytest.approx(4 / 3)  # token 0 has p = 3/4
    assert out["tokens"] == 8 and out["top1_agreement"] == 1.0  # argmax ties pick token 0


def test_identical_models_and_consistency_with_perplexity(calib_ids):
    model = tiny_model("qwen2")
    same = compare_models(model, model, calib_ids)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    pruned = tiny_model("qwen2")
    sl.sparsify(pruned, [{"method": "magnitude", "sparsity": 0.7}])
    diff = compare_models(model, pruned, calib_ids)
    assert diff["kl"] > 0.01 and diff["top1_agreement"] < 1.0
    assert diff["dense_ppl"] == pytest.approx(perplexity(model, calib_ids)["ppl"], rel=1e-9)
    assert diff["sparse_ppl"] == pytest.approx(perplexity(pruned, calib_ids)["ppl"], rel=1e-9)
