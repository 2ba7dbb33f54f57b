"""`sparsellm report` renders Results of every kind side by side, and reads nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsellm.cli import main
from sparsellm.report.markdown import fmt
from sparsellm.result import Result
from tests.cli import cli_args


def _row(text: str, name: str) -> str:
    """The summary-table line of run `name` in report.md."""
    return next(line for line in text.splitlines() if line.startswith(f"| {name} "))


def test_one_report_holds_prune_shrink_activate_and_recover(tiny_dir, text_file, tmp_path):
    runs = {name: tmp_path / name for name in ("pruned", "shrunk", "activated", "recovered")}
    small = {"eval_windows": 2}
    prune = ("--method", "wanda")
    assert main(cli_args("prune", tiny_dir, text_file, *prune, out=runs["pruned"])) == 0
    shrink = ("--method", "obs", "--ratio", "0.3")
    assert main(cli_args("shrink", tiny_dir, text_file, *shrink, out=runs["shrunk"], **small)) == 0
    act = ("--method", "teal", "--calib-seqlen", "32")
    assert (
        main(cli_args("activate", tiny_dir, text_file, *act, out=runs["activated"], **small)) == 0
    )
    recover = ["recover", "--model", str(runs["pruned"]), "--teacher", str(tiny_dir)]
    recover += ["--data", str(text_file), "--eval", str(text_file), "--seqlen", "64"]
    recover += ["--nsamples", "4", "--eval-windows", "2", "--steps", "2"]
    assert main([*recover, "--out", str(runs["recovered"])]) == 0

    out = tmp_path / "report"
    assert main(["report", *map(str, runs.values()), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    expected = {"pruned": "wanda", "shrunk": "obs", "activated": "teal", "recovered": "wanda"}
    kinds = {"pruned": "prune", "shrunk": "shrink", "activated": "activate", "recovered": "recover"}
    for name, path in runs.items():
        result = Result.read(path)
        assert result.kind == kinds[name] and result.method == expected[name]
        row = [c.strip() for c in _row(md, name).strip("|").split("|")]
        assert row[:3] == [name, kinds[name], expected[name]]
        numbers = [result.metric("after", "ppl"), result.metric("comparison", "kl")]
        numbers.append(result.measured_sparsity)
        for value in numbers:
            assert fmt(value) in row, (name, value, row)
            assert f"<td>{fmt(value)}</td>" in page
        assert f"<td>{name}</td><td>{kinds[name]}</td><td>{expected[name]}</td>" in page
    # the recover row compares with the teacher; its own before/after are in the Result
    recovered = Result.read(runs["recovered"])
    assert fmt(recovered.details["teacher"]["ppl"]) in _row(md, "recovered")
    assert (out / "plots" / "layers_pruned.png").is_file()  # only pruning has per-layer data
    assert not (out / "plots" / "layers_shrunk.png").exists()


def test_report_refuses_a_manifest_that_is_not_a_result(tmp_path: Path, capsys) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "sparsellm_manifest.json").write_text(json.dumps({"method": "wanda"}))
    assert main(["report", str(old), "--out", str(tmp_path / "r")]) == 2
    assert "not a sparsellm Result" in capsys.readouterr().err


def test_eval_out_writes_a_result_the_report_reads(tiny_dir, text_file, tmp_path) -> None:
    out = tmp_path / "dense-eval"
    args = ["eval", "--model", str(tiny_dir), "--eval", str(text_file), "--seqlen", "64"]
    assert main([*args, "--eval-windows", "2", "--out", str(out)]) == 0
    result = Result.read(out)
    assert result.kind == "eval" and result.method == "dense"
    assert result.measured_sparsity == 0.0 and result.metric("before", "ppl") is None
    assert main(["report", str(out), "--out", str(tmp_path / "r")]) == 0
    row = _row((tmp_path / "r" / "report.md").read_text(), "dense-eval")
    assert fmt(result.metric("after", "ppl")) in row


@pytest.mark.parametrize("kind", ["prune", "shrink"])
def test_summary_of_a_result_without_a_dense_reference(tmp_path: Path, kind: str) -> None:
    from sparsellm.report.runs import Run, summary

    result = Result(kind=kind, quality={"after": {"ppl": 12.0}}, sparsity={"measured": 0.5})
    row = summary(Run("x", tmp_path, result))
    assert row["sparse_ppl"] == 12.0 and row["dense_ppl"] is None and row["ppl_change"] is None
