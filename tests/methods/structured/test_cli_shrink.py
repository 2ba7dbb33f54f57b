"""`sparsellm shrink` on the tiny on-disk model: end to end, reload, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsellm
from sparsellm.cli import main


def _args(tiny_dir, text_file, out, *extra):
    return [
        "shrink",
        "--model",
        str(tiny_dir),
        "--calib",
        str(text_file),
        "--eval",
        str(text_file),
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--eval-windows",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_shrink_saves_plain_hf_and_recovers(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "small"
    extra = ("--method", "obs", "--ratio", "0.3", "--recover-steps", "2", "--json")
    assert main(_args(tiny_dir, text_file, out, *extra)) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.25 < result["shrink"]["measured_ratio"] < 0.35
    assert result["recovery"]["steps"] == 2 and "after" in result
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 1
    ids = torch.randint(0, 256, (1, 16))
    again = sparsellm.load(out).model
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_shrink_per_layer_loads_with_sparsellm(tiny_dir, text_file, tmp_path):
    out = tmp_path / "small"
    extra = ("--method", "activation", "--ratio", "0.3", "--per-layer")
    assert main(_args(tiny_dir, text_file, out, *extra)) == 0
    assert sparsellm.load(out).info["layer_shapes"]


@pytest.mark.parametrize(
    "extra",
    [
        ("--method", "depth", "--ratio", "1.0"),
        ("--method", "depth", "--ratio", "-0.1"),
        ("--method", "depth", "--ratio", "0.2", "--per-layer"),
    ],
)
def test_shrink_bad_input_exits_2(tiny_dir, text_file, tmp_path, extra):
    assert main(_args(tiny_dir, text_file, tmp_path / "o", *extra)) == 2
    assert not (tmp_path / "o").exists()


def test_shrink_unknown_method_is_rejected(tiny_dir, text_file, tmp_path):
    with pytest.raises(SystemExit):
        main(_args(tiny_dir, text_file, tmp_path / "o", "--method", "nope", "--ratio", "0.2"))
