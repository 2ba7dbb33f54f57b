"""bench/provenance.py writes result JSON; bench/render_results.py renders it to Markdown.

The committed results/ pages must always match their JSON, so the last test runs the
renderer's `--check` on the repository itself.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str) -> ModuleType:
    """Import a bench script by path (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


provenance = _load("provenance")
render = _load("render_results")

ROWS = [
    {"method": "wanda", "sparsity": 0.5, "ppl": 31.234567},
    {"method": "sparsegpt", "sparsity": 0.5, "ppl": 28.9, "note": "a|b"},
]


def test_write_result_records_provenance(tmp_path: Path) -> None:
    argv = [str(BENCH / "recipes.py"), "--only", "admm-50"]
    path = provenance.write_result("recipes", {"rows": ROWS}, argv, out_dir=tmp_path)
    assert path == tmp_path / "recipes.json"
    record = json.loads(path.read_text())
    assert list(record) == [
        "command", "commit", "cpu", "threads", "date", "versions", "data"
    ]  # fmt: skip
    assert record["command"] == "python bench/recipes.py --only admm-50"
    assert set(record["commit"]) == {"sha", "dirty"}
    assert set(record["cpu"]) >= {"model", "flags"}
    assert set(record["cpu"]["flags"]) <= set(provenance.RELEVANT_FLAGS)
    assert record["versions"]["python"]
    assert record["date"].endswith("+00:00")
    assert record["data"] == {"rows": ROWS}
    assert [p.name for p in tmp_path.iterdir()] == ["recipes.json"]  # no temp file left


@pytest.mark.parametrize("payload", [{}, {"rows": [1, 2]}, {"rows": {"a": 1}}])
def test_write_result_rejects_payloads_without_rows(tmp_path: Path, payload: dict) -> None:
    with pytest.raises(ValueError, match="rows"):
        provenance.write_result("x", payload, ["x"], out_dir=tmp_path)


def test_write_result_rejects_path_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="result name"):
        provenance.write_result("../x", {"rows": []}, ["x"], out_dir=tmp_path)


def _record() -> dict:
    return {
        "command": "python bench/recipes.py --only admm-50",
        "commit": {"sha": "0123456789abcdef", "dirty": True},
        "cpu": {"model": "Test CPU", "flags": ["avx2", "avx512f"], "logical_cores": 2},
        "threads": 2,
        "date": "2025-01-01T00:00:00+00:00",
        "versions": {"python": "3.12.0", "torch": "2.13.0"},
        "data": {"rows": ROWS, "spread": {"ppl": "±0.1"}, "protocol": {"seqlen": 512}},
    }


def test_render_json_to_markdown(tmp_path: Path) -> None:
    (tmp_path / "recipes.json").write_text(json.dumps(_record()))
    assert render.main(["--dir", str(tmp_path)]) == 0
    page = (tmp_path / "recipes.md").read_text()
    assert "python bench/recipes.py --only admm-50" in page
    assert "`0123456789ab` (uncommitted changes)" in page
    assert "Test CPU (2 logical cores; flags: avx2, avx512f)" in page
    # columns: union of keys, first-seen order; floats to 4 significant digits; | escaped
    assert "| method | sparsity | ppl | note |" in page
    assert "| wanda | 0.5 | 31.23 |  |" in page
    assert "| sparsegpt | 0.5 | 28.9 | a\\|b |" in page
    assert "- ppl: ±0.1" in page
    assert '"seqlen": 512' in page
    index = (tmp_path / "README.md").read_text()
    assert "[recipes](recipes.md)" in index
    # deterministic: a second render changes nothing and --check passes
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert render.main(["--dir", str(tmp_path)]) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before
    assert render.main(["--dir", str(tmp_path), "--check"]) == 0


def test_check_flags_stale_missing_and_orphan_pages(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_record()))
    assert render.main(["--dir", str(tmp_path), "--check"]) == 1  # a.md missing
    render.main(["--dir", str(tmp_path)])
    record = _record()
    record["data"]["rows"][0]["ppl"] = 99.0
    (tmp_path / "a.json").write_text(json.dumps(record))
    assert render.main(["--dir", str(tmp_path), "--check"]) == 1  # a.md stale
    render.main(["--dir", str(tmp_path)])
    (tmp_path / "a.json").unlink()
    assert render.main(["--dir", str(tmp_path), "--check"]) == 1  # a.md orphaned
    render.main(["--dir", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_float_cells() -> None:
    assert render.fmt(0.123456) == "0.1235"
    assert render.fmt(169.34) == "169.3"
    assert render.fmt(12345.6) == "12346"
    assert render.fmt(None) == ""
    assert render.fmt(float("inf")) == "inf"


def test_committed_results_are_rendered() -> None:
    """results/*.md in the repository match their JSON (rerun the renderer if not)."""
    assert render.main(["--check"]) == 0


def test_cpu_line_gives_the_l3_size_when_known() -> None:
    cpu = {"model": "X", "flags": ["avx2"], "logical_cores": 2}
    assert render.describe_cpu(cpu) == "X (2 logical cores; flags: avx2)"
    cpu["l3_cache_bytes"] = 300 * 2**20
    assert render.describe_cpu(cpu) == "X (2 logical cores; L3 300 MiB; flags: avx2)"
