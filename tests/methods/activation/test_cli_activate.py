"""`sparsellm activate` end to end on the tiny on-disk model, and its input errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsellm.cli import main
from tests.cli import cli_args, last_json


def _activate(tiny_dir: Path, text_file: Path, *extra: str) -> list[str]:
    return cli_args("activate", tiny_dir, text_file, "--calib-seqlen", "32", *extra, eval_windows=2)


def test_activate_saves_and_eval_reapplies(tiny_dir, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "act"
    args = _activate(
        tiny_dir, text_file, "--method", "wina", "--speed", "--new-tokens", "8", "--out", str(out)
    )
    assert main([*args, "--json"]) == 0
    result = last_json(capsys)
    assert result["sparse_ppl"] > result["dense_ppl"]
    assert result["measured_sparsity"] == pytest.approx(0.5, abs=0.1)
    assert result["decode_speed"]["skipped_fraction"] > 0.3
    assert result["config"]["method"] == "wina" and not result["config"]["head"]
    assert (out / "activation_sparsity.safetensors").is_file()
    ev = ["eval", "--model", str(out), "--eval", str(text_file), "--seqlen", "64"]
    assert main([*ev, "--eval-windows", "2", "--json"]) == 0
    assert last_json(capsys)["ppl"] == pytest.approx(result["sparse_ppl"], rel=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--method", "nope"), "unknown activation method 'nope'"),
        (("--sparsity", "0.99"), "activation sparsity must be in"),
        (("--nsamples", "0"), "--nsamples must be >= 1"),
        (("--method", "cats", "--head"), "head sparsity needs an input method"),
    ],
)
def test_activate_bad_input(tiny_dir, text_file, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "never"
    assert main([*_activate(tiny_dir, text_file, *extra), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_activate_head_thresholds_the_lm_head(tiny_dir, text_file, capsys) -> None:
    assert (
        main([*_activate(tiny_dir, text_file, "--head", "--speed", "--new-tokens", "6"), "--json"])
        == 0
    )
    result = last_json(capsys)
    assert result["config"]["head"]
    assert result["measured_sparsity"] == pytest.approx(0.5, abs=0.1)
    assert result["decode_speed"]["skipped_fraction"] > 0.3
