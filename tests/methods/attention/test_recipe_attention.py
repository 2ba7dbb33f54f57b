"""The recipe `attention:` key: parsed strictly, and composed with weight sparsity by
`prune --recipe` and `eval --recipe` (a keep-all pattern leaves the numbers unchanged, a
real one changes them)."""

from __future__ import annotations

import json

import pytest

from sparsellm.cli import main
from sparsellm.config import from_spec
from sparsellm.errors import SparseLLMError
from sparsellm.recipe import AttentionSpec, parse_recipe

WINDOW = "sink_window:sink=16,window=16,block=16,min_length=32"  # sparse at 64 tokens
KEEP_ALL = "sink_window:sink=16,window=64,block=16,min_length=32"  # covers every block


def test_bare_spec_goes_to_its_kind_and_steps_still_parse() -> None:
    raw = {"steps": [{"method": "magnitude", "sparsity": 0.5}], "attention": WINDOW}
    assert parse_recipe(raw).attention == AttentionSpec(prefill=from_spec(WINDOW))
    snap = from_spec("snapkv:budget=64")
    assert parse_recipe({"attention": "snapkv:budget=64"}).attention == AttentionSpec(kv=snap)
    both = {"attention": {"prefill": WINDOW, "kv": "quest:budget=64"}}
    assert parse_recipe(both).attention == AttentionSpec(
        prefill=from_spec(WINDOW), kv=from_spec("quest:budget=64")
    )
    assert [s.name for s in parse_recipe(raw).steps] == ["magnitude"]
    assert parse_recipe({"attention": WINDOW}).steps == ()
    assert not parse_recipe([{"method": "magnitude"}]).attention


@pytest.mark.parametrize(
    ("attention", "message"),
    [
        ({"prefill": "snapkv:budget=64"}, "unknown method 'snapkv' \\(prefill\\)"),
        ({"kv": WINDOW}, "unknown method 'sink_window' \\(kv\\)"),
        ({"decode": WINDOW}, "keys prefill, kv"),
        ("bogus", "unknown method 'bogus'"),
    ],
)
def test_bad_attention_key_is_an_error(attention, message) -> None:
    with pytest.raises(SparseLLMError, match=message):
        parse_recipe({"steps": [{"method": "magnitude"}], "attention": attention})
    with pytest.raises(SparseLLMError, match="valid: steps, attention"):
        parse_recipe({"steps": [{"method": "magnitude"}], "attentoin": WINDOW})


def _prune(tiny_dir, text_file, tmp_path, recipe: str, capsys) -> dict:
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
    args = ["prune", "--model", str(tiny_dir), "--calib", str(text_file), "--eval"]
    args += [str(text_file), "--nsamples", "4", "--seqlen", "64", "--eval-windows", "4"]
    assert main([*args, "--out", str(out), "--recipe", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_prune_recipe_composes_weight_and_attention_sparsity(
    tiny_dir, text_file, tmp_path, capsys
) -> None:
    steps = "steps:\n  - method: magnitude\n    sparsity: 0.5\n"
    plain = _prune(tiny_dir, text_file, tmp_path, steps, capsys)
    keep = _prune(tiny_dir, text_file, tmp_path, steps + f"attention: '{KEEP_ALL}'\n", capsys)
    sparse = _prune(tiny_dir, text_file, tmp_path, steps + f"attention: '{WINDOW}'\n", capsys)
    assert keep["attention"] == {"prefill": KEEP_ALL, "kv": ""}
    assert keep["sparse_ppl"] == pytest.approx(plain["sparse_ppl"], rel=1e-5)
    assert sparse["sparse_ppl"] != pytest.approx(plain["sparse_ppl"], rel=1e-3)
    assert sparse["dense_ppl"] == pytest.approx(plain["dense_ppl"], rel=1e-6)
    assert sparse["measured_sparsity"] == pytest.approx(plain["measured_sparsity"])


def test_eval_recipe_applies_steps_then_attention(tiny_dir, text_file, tmp_path, capsys) -> None:
    base = ["eval", "--model", str(tiny_dir), "--eval", str(text_file), "--seqlen", "64"]
    base += ["--eval-windows", "2", "--json"]
    path = tmp_path / "r.yaml"
    path.write_text(f"steps: [{{method: magnitude, sparsity: 0.5}}]\nattention: '{WINDOW}'\n")
    assert main([*base, "--recipe", str(path)]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["attention"] == WINDOW
    assert got["block_linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert main([*base, "--recipe", str(path), "--attention", WINDOW]) == 2
    assert "cannot be combined" in capsys.readouterr().err
