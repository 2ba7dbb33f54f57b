"""A few checks on the bundled default model (SmolLM2-135M) and corpora. Marked `real`."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsellm as sl
from sparsellm.cli import main
from sparsellm.eval.perplexity import perplexity

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def default_model():
    return sl.load_model("default")


def test_dense_perplexity_equals_transformers_loss(default_model):
    model, tok = default_model
    ids = sl.calibration(tok, "wiki", 3, 256)
    ours = perplexity(model, ids)["ppl"]
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids]
    assert ours == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert 5 < ours < 60  # a working 135M model, not noise (vocab 49152 -> ppl ~ 5e4)


def test_cli_prune_default_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "sparse"
    code = main(
        [
            "prune",
            "--model",
            "default",
            "--method",
            "wanda",
            "--pattern",
            "2:4",
            "--nsamples",
            "4",
            "--seqlen",
            "128",
            "--eval-windows",
            "4",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Q4 de-quantised weights already hold a few exact zeros, so "at least" 2 of 4
    assert result["measured_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert result["sparse_ppl"] > result["dense_ppl"]
    model = AutoModelForCausalLM.from_pretrained(out)
    down = model.model.layers[29].mlp.down_proj.weight
    assert ((down == 0).view(down.shape[0], -1, 4).sum(-1) >= 2).all()
    assert result["calib"]["data"]["name"] == "c4" and result["eval"]["data"]["name"] == "wiki"
