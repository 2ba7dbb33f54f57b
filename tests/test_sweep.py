"""Sweeps on a tiny on-disk model: grid, resume, report, and Ray == local."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sparsellm.cli import main
from sparsellm.errors import SparseLLMError
from sparsellm.pipeline import Protocol
from sparsellm.sweep import Point, default_cpus_per_point, grid, open_sweep, run_local
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


def test_default_cpus_per_point_fits_the_smallest_alive_node():
    def node(cpus, alive=True):
        return {"Alive": alive, "Resources": {"CPU": cpus} if cpus is not None else {}}

    # the old default asked for the cluster's 4 + 8 CPUs: no node could run a point
    assert default_cpus_per_point([node(4), node(8), node(2, alive=False)]) == 4
    assert default_cpus_per_point([node(0), node(6)]) == 6  # a CPU-less head runs nothing
    assert default_cpus_per_point([node(None)]) == 1
    assert default_cpus_per_point([]) == 1


def test_sweep_overwrite_refuses_a_dir_that_is_not_a_sweep(tmp_path):
    points = grid(["magnitude"], [0.5], ["unstructured"])
    out = tmp_path / "sw"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SparseLLMError, match="not a sparsellm output"):
        open_sweep(out, "m", Protocol(), points, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    assert open_sweep(out, "m", Protocol(), points, overwrite=False) == points
    (out / "points" / "magnitude-unstructured-0.50").mkdir(parents=True)
    (out / "points" / "magnitude-unstructured-0.50" / "sparsellm_manifest.json").write_text("{}")
    assert open_sweep(out, "m", Protocol(), points, overwrite=False) == []
    assert open_sweep(out, "m", Protocol(), points, overwrite=True) == points  # a sweep: wiped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The Ray driver runs in its own process so that a point Ray can never schedule (the old
# default asked for the whole cluster's CPUs, more than either node has) fails on the
# timeout instead of hanging the test. It waits for both nodes before sweeping.
_RAY_DRIVER = """
import sys, time
from pathlib import Path
import ray
from sparsellm.pipeline import Protocol
from sparsellm.sweep import grid, open_sweep, run_ray
out, model, text, address = sys.argv[1:]
ray.init(address=address, log_to_driver=False)
while sum(n["Alive"] for n in ray.nodes()) < 2:
    time.sleep(1)
ray.shutdown()
protocol = Protocol(calib=text, eval=text, nsamples=4, seqlen=64, eval_windows=4)
points = grid(["magnitude", "wanda"], [0.5], ["unstructured"])
todo = open_sweep(Path(out), model, protocol, points, overwrite=False)
run_ray(Path(out), model, protocol, todo, address, save_models=True)
"""


def _ray_env() -> dict[str, str]:
    """The environment of every process of the test cluster: token auth, its own token.

    Ray 2.60's `ray start --head` turns token auth on when ~/.ray/auth_token exists (any
    local `ray.init()` writes one) while `ray.init(address)` does not, so the mode is set
    explicitly, with a fresh token, for the nodes and the driver alike.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN_PATH"}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _ray_node(
    ray_cli: str, temp_dir: str, env: dict[str, str], log: Path, *args: str
) -> subprocess.Popen:
    """One `ray start --block` node: SIGTERM to this process stops exactly its processes.

    Its own --temp-dir keeps the cluster private: a bare `ray.init()` elsewhere on this
    machine (another test run) finds clusters through /tmp/ray, not through it.
    """
    node = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1"]
    cmd = [ray_cli, "start", *node, "--temp-dir", temp_dir, "--disable-usage-stats", *args]
    with log.open("w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


@pytest.mark.real  # starts a two-node Ray cluster on the loopback address (~1 min)
def test_ray_on_two_nodes_saves_models_and_matches_local(tiny_dir, text_file, tmp_path):
    pytest.importorskip("ray")
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    local, remote = tmp_path / "local", tmp_path / "ray"
    env = _ray_env()
    nodes = []
    try:
        head = ["--head", "--port", str(port), "--include-dashboard=false"]
        nodes.append(_ray_node(ray_cli, temp_dir, env, tmp_path / "head.log", *head))
        deadline = time.monotonic() + 120
        while not Path(temp_dir, "ray_current_cluster").is_file():  # head is up
            assert nodes[0].poll() is None, (tmp_path / "head.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not start in 120 s"
            time.sleep(1)
        worker = ["--address", address]
        nodes.append(_ray_node(ray_cli, temp_dir, env, tmp_path / "worker.log", *worker))
        driver = [sys.executable, "-c", _RAY_DRIVER, str(remote), str(tiny_dir), str(text_file)]
        subprocess.run([*driver, address], env=env, check=True, timeout=300)
    finally:
        for node in reversed(nodes):
            node.terminate()
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
    protocol = Protocol(
        calib=str(text_file), eval=str(text_file), nsamples=4, seqlen=64, eval_windows=4
    )
    points = grid(["magnitude", "wanda"], [0.5], ["unstructured"])
    todo = open_sweep(local, str(tiny_dir), protocol, points, overwrite=False)
    run_local(local, str(tiny_dir), protocol, todo, save_models=True)
    for point in points:
        a, b = (d / "points" / point.name for d in (local, remote))
        ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
        assert (ra["sparse_ppl"], ra["kl"]) == (rb["sparse_ppl"], rb["kl"])
        assert ra["sweep_point"] == rb["sweep_point"] == point.name
        wa, wb = (load_file(d / "model.safetensors") for d in (a, b))
        assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
        assert (b / "config.json").is_file()
