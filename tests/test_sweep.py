"""Sweeps on a tiny on-disk model: grid, resume, report, and Ray == local."""

import json
import shutil

import pytest

from sparsellm.cli import main
from sparsellm.errors import SparseLLMError
from sparsellm.sweep import Point, grid
from tests.cli import cli_args, last_json


def _sweep(tiny_dir, text_file, out, *extra):
    return cli_args("sweep", tiny_dir, text_file, *extra, out=out)


def test_grid_derives_nm_per_sparsity_and_deduplicates():
    points = grid(["wanda"], [0.3, 0.5, 0.6, 0.7], ["unstructured", "2:4"])
    names = [p.name for p in points]
    assert names[:4] == [f"wanda-unstructured-{s}" for s in ("0.30", "0.50", "0.60", "0.70")]
    assert names[4:] == ["wanda-1of4", "wanda-2of4", "wanda-3of4"]
    assert Point("wanda", "2:4", None).recipe() == [{"method": "wanda", "pattern": "2:4"}]
    with pytest.raises(SparseLLMError, match="unknown method 'nope'"):
        grid(["nope"], [0.5], ["unstructured"])
    with pytest.raises(SparseLLMError, match="sparsity must be in"):
        grid(["wanda"], [1.5], ["unstructured"])


def test_sweep_runs_resumes_and_reports(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "sw"
    args = _sweep(
        tiny_dir,
        text_file,
        out,
        "--methods",
        "magnitude,wanda",
        "--sparsities",
        "0.3,0.6",
        "--json",
    )
    assert main(args) == 0
    first = last_json(capsys)
    assert len(first["points"]) == 8 and first["ran"] == first["points"]
    point = out / "points" / "wanda-unstructured-0.60"
    result = json.loads((point / "report.json").read_text())
    assert result["measured_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert result["dense_ppl"] > 0 and result["kl"] > 0
    assert not list(point.glob("*.safetensors"))  # no weights unless --save-models
    # interrupted sweep: one point missing (and a stale temp dir) -> only it runs again
    shutil.rmtree(point)
    (out / "points" / ".wanda-unstructured-0.60.tmp-x").mkdir()
    assert main(args) == 0
    second = last_json(capsys)
    assert second["ran"] == ["wanda-unstructured-0.60"]
    again = json.loads((point / "report.json").read_text())
    assert again["sparse_ppl"] == pytest.approx(result["sparse_ppl"], rel=1e-6)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "Essential sparsity" in page
    assert "wanda-1of4" in (out / "report.md").read_text()
    # a different protocol in the same directory is refused
    assert main([*args[:-1], "--seed", "1"]) == 2
    assert "different model or protocol" in capsys.readouterr().err


def test_report_command_and_its_errors(tiny_dir, text_file, tmp_path, capsys):
    run = tmp_path / "run"
    prune = [
        "prune",
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
        "4",
    ]
    assert main([*prune, "--method", "wanda", "--out", str(run)]) == 0
    rep = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(rep)]) == 0
    page = (rep / "report.html").read_text()
    assert (rep / "plots" / "layers_run.png").read_bytes()[:4] == b"\x89PNG"
    assert "sha256" in page and "full manifest" in page
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(rep)]) == 2
    assert "has no sparsellm_manifest.json" in capsys.readouterr().err


@pytest.mark.real  # starts a local Ray cluster (~20 s)
def test_ray_executor_matches_local(tiny_dir, text_file, tmp_path, capsys):
    pytest.importorskip("ray")
    common = ["--methods", "wanda", "--sparsities", "0.5", "--patterns", "unstructured"]
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert main(_sweep(tiny_dir, text_file, local, *common)) == 0
    assert main(_sweep(tiny_dir, text_file, remote, *common, "--executor", "ray")) == 0
    name = "points/wanda-unstructured-0.50/report.json"
    a = json.loads((local / name).read_text())
    b = json.loads((remote / name).read_text())
    assert (a["sparse_ppl"], a["kl"]) == (b["sparse_ppl"], b["kl"])
    assert {k: v["sparsity"] for k, v in a["layers"].items()} == {
        k: v["sparsity"] for k, v in b["layers"].items()
    }
