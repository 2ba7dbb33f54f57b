import pytest
import torch

from sparsellm.api import sparsify
from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.allocation import outlier_ratio, owl_sparsities
from sparsellm.models.tiny import tiny_model
from sparsellm.recipe import parse_recipe


def test_outlier_ratio_by_hand():
    # mean of [1, 1, 1, 1, 100] is 20.8; above 2 x 20.8 only the 100: ratio 1/5
    ratio = outlier_ratio([torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 100])], 2.0)
    assert ratio == pytest.approx(0.2)


def test_owl_budgets_by_hand_and_weighted_mean_is_the_target():
    # ratios .1 .2 .3 -> spread 0 .1 .2 (lambda .1); mean .1 -> sparsity .6 .5 .4
    assert owl_sparsities([0.1, 0.2, 0.3], 0.5, 0.1) == pytest.approx([0.6, 0.5, 0.4])
    s = owl_sparsities([0.1, 0.2, 0.3], 0.5, 0.1, sizes=[1, 1, 2])
    assert s == pytest.approx([0.625, 0.525, 0.425])
    assert (s[0] + s[1] + 2 * s[2]) / 4 == pytest.approx(0.5)
    assert owl_sparsities([0.2, 0.2], 0.7, 0.08) == [0.7, 0.7]
    with pytest.raises(SparseLLMError, match="outside"):
        owl_sparsities([0.0, 1.0], 0.9, 0.2)


def test_owl_on_a_model_keeps_global_sparsity(calib_ids):
    uniform = sparsify(tiny_model("llama"), [{"method": "wanda", "sparsity": 0.6}], calib_ids)
    model = tiny_model("llama")
    report = sparsify(
        model,
        [{"method": "wanda", "sparsity": 0.6, "allocation": "owl", "owl_lambda": 0.1}],
        calib_ids,
    )
    targets = {v["target"] for v in report.layers.values()}
    assert len(targets) == 2  # two blocks, two budgets
    # per-row counts are floored (64 inputs per row here), as in the uniform run
    assert abs(report.sparsity - uniform.sparsity) <= 1 / 64
    with pytest.raises(SparseLLMError, match="N:M fixes it"):
        parse_recipe([{"method": "wanda", "pattern": "2:4", "allocation": "owl"}])
