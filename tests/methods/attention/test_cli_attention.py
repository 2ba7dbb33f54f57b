"""`sparsellm eval --attention`: runs on a tiny model, restores dense, clear errors."""

from __future__ import annotations

import json

import pytest

from sparsellm.cli import main


def _eval(tiny_dir, text_file, *extra: str) -> list[str]:
    return [
        "eval",
        "--model",
        str(tiny_dir),
        "--eval",
        str(text_file),
        "--eval-windows",
        "2",
        "--seqlen",
        "128",
        "--json",
        *extra,
    ]


def test_eval_with_keep_all_attention_matches_dense(tiny_dir, text_file, capsys) -> None:
    assert main(_eval(tiny_dir, text_file)) == 0
    dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    spec = "sink_window:sink=16,window=128,block=16,min_length=64"
    assert main(_eval(tiny_dir, text_file, "--attention", spec)) == 0
    sparse = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sparse["attention"] == spec
    assert sparse["ppl"] == pytest.approx(dense["ppl"], rel=1e-5)


def test_eval_with_minference_calibrates_first(tiny_dir, text_file, capsys) -> None:
    spec = "minference:sink=16,window=32,vertical=16,slash=16,blocks=2,block=16,min_length=64"
    assert main(_eval(tiny_dir, text_file, "--attention", spec)) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ppl"] > 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "unknown attention method"),
        ("snapkv:budget=64", "only while decoding"),
        ("power:window=x", "window must be int"),
    ],
)
def test_bad_attention_is_one_line_error(tiny_dir, text_file, capsys, spec, message) -> None:
    assert main(_eval(tiny_dir, text_file, "--attention", spec)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
