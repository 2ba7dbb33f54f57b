"""Memory and time of pruning, in RAM and streamed, against a formula; and under a hard cap.

What it measures, one run with nothing else on the machine; every run is a fresh child
process (`sparsellm prune`, SparseGPT 50%, the pinned protocol's data), whose peak RSS is
its own VmHWM (`bench/_peak.py`):

1. per model and calibration size: the in-RAM run and the ``--stream`` run, alternated:
   wall seconds, peak RSS, the formula's estimate of each (below) and measured/formula,
   perplexity (dense, sparse) and whether the two outputs are **bit-identical**;
2. the ``--cap-model`` streamed under a memory cgroup limit of ``--cap`` bytes (smaller
   than its fp32 weights), with the streamed run's flags: whether it finished, its peak,
   and whether its weights equal the in-RAM run's of the same calibration;
3. when the ``--cap-model`` comes from a GGUF: its conversion to fp32 safetensors under
   the same cap (seconds, peak);
4. with ``--peer-model``: llm-compressor's SparseGPT (``bench/_llmc_worker.py``, its own venv)
   on the same model and calibration windows: seconds, peak RSS, perplexity.

The formula (`estimate`) counts what each path holds at its peak, from the model's config:
the interpreter with torch, transformers and the tokenizer (measured once per model: a
child that imports sparsellm, tokenizes the protocol's windows and builds the skeleton),
the weights (in RAM: the model, and one dense block at a time for the comparison; streamed:
one block, or the embeddings while capturing, or the head while evaluating), the calibration
activations, the statistics (fp64 XᵀX of each distinct block input) and SparseGPT's
factorisation of the widest one (its fp32 H and one n² buffer), the evaluation's slices. It is a
model, not a fit: the table shows how far each run is from it.

    .venv/bin/python bench/scale.py --models default,qwen0.5b,qwen1.5b --cap-model qwen1.5b \\
        --cap 2G --peer-model qwen1.5b
    .venv/bin/python bench/scale.py --models qwen1.5b --only-convert --cap 2G \\
        --out results/scale-convert
    .venv/bin/python bench/scale.py --models qwen1.5b --shrink obs:0.2 --cap-model qwen1.5b \\
        --cap 2G --out results/scale-shrink        # streamed width pruning, same measures
    .venv/bin/python bench/scale.py --models default --calib 4x128 --eval-windows 2 \\
        --out /tmp/scale-smoke                     # a smoke run, not a result
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import write_result  # noqa: E402

MiB = 1 << 20
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def run_child(
    cmd: list[str], cap: int | None = None, log: Path | None = None, env: dict | None = None
) -> dict[str, Any]:
    """Run the Python script `cmd` (interpreter first) through `bench/_peak.py`; its wall
    seconds, exit code and peak RSS (VmHWM: see `_peak.py` for why not ``ru_maxrss``), and
    the cgroup's peak (page cache included) when capped at `cap` bytes."""
    group = None
    if cap is not None:
        group = CGROUP_V1 / f"sparsellm-scale-{os.getpid()}-{time.monotonic_ns()}"
        try:
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(cap))
        except OSError as exc:
            raise SystemExit(f"cannot create a memory cgroup under {CGROUP_V1}: {exc}") from None
    procs = None if group is None else str(group / "cgroup.procs")

    def enter() -> None:  # in the child, before exec: join the capped group
        if procs is not None:
            Path(procs).write_text(str(os.getpid()))

    with tempfile.NamedTemporaryFile(prefix="peak-", delete=False) as f:
        peak_file = Path(f.name)
    wrapped = [cmd[0], str(HERE / "_peak.py"), str(peak_file), *cmd[1:]]
    with open(log or os.devnull, "w") as out:
        start = time.perf_counter()
        proc = subprocess.run(
            wrapped,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=enter,
            env=None if env is None else {**os.environ, **env},
        )
        seconds = time.perf_counter() - start
    text = peak_file.read_text().strip()
    peak_file.unlink()
    result = {"rc": proc.returncode, "seconds": seconds, "peak_rss": int(text) if text else None}
    if group is not None:
        result["cgroup_peak"] = int((group / "memory.max_usage_in_bytes").read_text())
        group.rmdir()
    return result


def mib(value: int | None) -> int | None:
    return None if value is None else round(value / MiB)


def last_json(log: Path) -> dict[str, Any] | None:
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def same_weights(a: Path, b: Path) -> bool:
    """Every tensor of checkpoint `a` equals `b`'s, read one at a time."""
    import torch

    from sparsellm.models.shards import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    if set(ca.weight_map) != set(cb.weight_map):
        return False
    return all(torch.equal(ca.read([k])[k], cb.read([k])[k]) for k in sorted(ca.weight_map))


def baseline_rss(src: Path, n: int, seq: int, windows: int, work: Path) -> tuple[int, int]:
    """What every run holds besides weights, activations and statistics: a child imports
    sparsellm's CLI, loads `src`'s tokenizer, cuts the protocol's windows and builds the
    skeleton. Returns (its peak RSS, tokenizing included; its RSS once that is done)."""
    code = (
        "import re, sparsellm.cli, sparsellm.methods.weights.stream\n"
        "from pathlib import Path\n"
        "from sparsellm.pipeline import Protocol\n"
        "from sparsellm.streaming import prepare_streamed\n"
        "from sparsellm.models.shards import skeleton\n"
        f"p = Protocol(nsamples={n}, seqlen={seq}, eval_windows={windows})\n"
        f"prep = prepare_streamed({str(src)!r}, p)\n"
        f"skeleton({str(src)!r})\n"
        "status = Path('/proc/self/status').read_text()\n"
        "print('rss', int(re.search(r'VmRSS:\\s+(\\d+)', status).group(1)) * 1024)\n"
    )
    log, script = work / f"baseline-{src.name}.log", work / f"baseline-{src.name}.py"
    script.write_text(code)
    peak = run_child([sys.executable, str(script)], log=log)["peak_rss"]
    after = int(next(ln for ln in log.read_text().splitlines() if ln.startswith("rss ")).split()[1])
    return peak, after


def estimate(
    config: Any,
    params: int,
    stored_head: bool,
    base: tuple[int, int],
    n: int,
    seq: int,
    windows: int,
    batch: int,
    streamed: bool,
) -> dict[str, int]:
    """Bytes each phase of a SparseGPT prune holds at its peak (see the module docstring)."""
    d, f, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // heads
    layers = config.num_hidden_layers
    outer = vocab * d * (2 if stored_head else 1)
    block = (params - outer) // layers
    acts = n * seq * d * 4
    ins = [d, heads * hd, d, f]  # q/k/v, o, gate/up, down
    stats = 8 * sum(i * i for i in ins)  # fp64 XᵀX, all four while the block is observed
    solve = 2 * 4 * f * f  # the widest fp32 H and the buffer `inverse_hessian_factor` uses
    forward = batch * seq * (3 * f + 4 * d) * 4 + batch * heads * seq * seq * 4
    slices = 5 * (1 << 24) * 4  # both models' log-probabilities, logits, two KL temporaries
    evaluation = 2 * windows * seq * d * 4 + slices
    if streamed:
        phases = {
            "capture": vocab * d * 4 + acts + forward,
            "blocks": 4 * block + acts + max(stats + forward, stats - 8 * f * f + solve),
            "evaluate": vocab * d * 4 + evaluation,
        }
    else:
        phases = {
            # one model: the dense side of the comparison is read block by block from the
            # source checkpoint (`sparsellm.pipeline.compare_to_checkpoint`), not copied
            "calibrate": 4 * params + acts + max(stats + forward, stats - 8 * f * f + solve),
            "evaluate": 4 * params + 4 * block + evaluation + batch * seq * d * 4,
        }
    totals = {"prepare": base[0], **{k: base[1] + v for k, v in phases.items()}}
    phase = max(totals, key=totals.get)
    return {"bytes": totals[phase], "phase": phase}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="default,qwen0.5b,qwen1.5b")
    ap.add_argument("--calib", default="8x512,32x512", help="calibration sizes, NxSEQLEN,...")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--modes", default="ram,stream", help="which runs per model and size: ram, stream"
    )
    ap.add_argument("--cap-model", default=None, help="model to stream under --cap")
    ap.add_argument("--cap", default="2G", help="memory cap of the capped run (e.g. 2G)")
    ap.add_argument(
        "--one-size", default="qwen1.5b", help="models run at the first --calib size only"
    )
    ap.add_argument(
        "--peer-model", default=None, help="also run llm-compressor's SparseGPT on this model"
    )
    ap.add_argument(
        "--only-convert",
        action="store_true",
        help="only convert each GGUF model to fp32 safetensors under --cap (no pruning)",
    )
    ap.add_argument(
        "--shrink",
        default=None,
        metavar="METHOD:RATIO",
        help="measure `sparsellm shrink --method METHOD --ratio RATIO` (a block-local width "
        "method, e.g. obs:0.2) instead of SparseGPT 50%%; no formula column",
    )
    ap.add_argument("--out", type=Path, default=None, help="result path (default results/)")
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig

    from sparsellm.cli.prune import parse_size
    from sparsellm.models.load import convert_gguf, resolve_source
    from sparsellm.models.shards import Checkpoint, fp32_bytes

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.calib.split(",")]
    cap = parse_size(args.cap)
    cli = [sys.executable, str(Path(sys.executable).parent / "sparsellm")]
    if args.shrink:
        method, ratio = args.shrink.split(":")
        cli += ["shrink", "--method", method, "--ratio", ratio]
    else:
        cli += ["prune", "--method", "sparsegpt"]
    rows: list[dict[str, Any]] = []
    peers: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="sparsellm-scale-"))
    for name in args.models.split(","):
        kind, where = resolve_source(name)
        if args.only_convert:
            if kind == "gguf":
                rows.append(convert_capped(name, Path(where), cap, args.cap, work))
                print(json.dumps(rows[-1]))
            continue
        src = convert_gguf(where) if kind == "gguf" else Path(where)
        config = AutoConfig.from_pretrained(src)
        ckpt = Checkpoint(src)
        params = fp32_bytes(ckpt) // 4
        stored_head = any(k.endswith("lm_head.weight") for k in ckpt.weight_map)
        n0, seq0 = sizes[0]
        base = baseline_rss(src, n0, seq0, args.eval_windows, work)
        print(f"{name}: {params / 1e9:.2f}B parameters, baseline RSS {base} bytes")
        outputs: dict[tuple, Path] = {}
        for n, seq in sizes[:1] if name in args.one_size.split(",") else sizes:
            common = ["--model", str(src), "--nsamples", str(n), "--seqlen", str(seq)]
            common += ["--eval-windows", str(args.eval_windows)]
            common += ["--batch-size", str(args.batch_size), "--json", "--overwrite"]
            for mode in args.modes.split(","):
                out = work / f"{name}-{n}x{seq}-{mode}"
                log = work / f"{out.name}.log"
                extra = ["--stream", "--max-memory", "1G"] if mode == "stream" else []
                measured = run_child([*cli, *common, "--out", str(out), *extra], log=log)
                result = last_json(log) if measured["rc"] == 0 else None
                if result is None:
                    print(log.read_text()[-3000:], file=sys.stderr)
                    raise SystemExit(f"{name} {mode} failed (rc {measured['rc']})")
                outputs[(n, seq, mode)] = out
                est = estimate(
                    config,
                    params,
                    stored_head,
                    base,
                    n,
                    seq,
                    args.eval_windows,
                    args.batch_size,
                    mode == "stream",
                )
                if args.shrink:  # the formula counts SparseGPT's statistics
                    est = {"bytes": None, "phase": None}
                row = {
                    "model": name,
                    "calib": f"{n}x{seq}",
                    "mode": "in RAM" if mode == "ram" else "streamed",
                    "fp32 weights MiB": round(4 * params / MiB),
                    "seconds": round(measured["seconds"], 1),
                    "sparsify s": round(
                        result["timings"].get("sparsify_s") or result["timings"]["shrink_s"], 1
                    ),
                    "peak RSS MiB": round(measured["peak_rss"] / MiB),
                    "formula MiB": mib(est["bytes"]),
                    "formula phase": est["phase"],
                    "measured / formula": est["bytes"]
                    and round(measured["peak_rss"] / est["bytes"], 2),
                    "peak / fp32 weights": round(measured["peak_rss"] / (4 * params), 2),
                    "dense ppl": result["quality"]["before"].get("ppl"),
                    "sparse ppl": result["quality"]["after"].get("ppl"),
                    "sparsity": result["sparsity"]["measured"],
                }
                if mode == "stream" and (n, seq, "ram") in outputs:
                    row["identical to in RAM"] = same_weights(outputs[(n, seq, "ram")], out)
                    ram_row = rows[-1]
                    row["time vs in RAM"] = round(measured["seconds"] / ram_row["seconds"], 2)
                rows.append(row)
                print(json.dumps(row))
        if name == args.cap_model and kind == "gguf":
            rows.append(convert_capped(name, Path(where), cap, args.cap, work))
            print(json.dumps(rows[-1]))
        if name == args.cap_model:
            n, seq = sizes[0]
            out = work / f"{name}-capped"
            log = work / f"{out.name}.log"
            common = ["--model", str(src), "--nsamples", str(n), "--seqlen", str(seq)]
            common += [
                "--eval-windows",
                str(args.eval_windows),
                "--batch-size",
                str(args.batch_size),
                "--json",
                "--stream",
                "--max-memory",
                "1G",
            ]
            measured = run_child([*cli, *common, "--out", str(out)], cap=cap, log=log)
            result = last_json(log) if measured["rc"] == 0 else None
            row = {
                "model": name,
                "calib": f"{n}x{seq}",
                "mode": f"streamed, capped at {args.cap}",
                "fp32 weights MiB": round(4 * params / MiB),
                "seconds": round(measured["seconds"], 1),
                "peak RSS MiB": mib(measured["peak_rss"]),
                "cgroup peak MiB": round(measured["cgroup_peak"] / MiB),
                "finished": measured["rc"] == 0,
                "exit code": measured["rc"],
                "sparse ppl": result["quality"]["after"].get("ppl") if result else None,
                "identical to in RAM": same_weights(outputs[(n, seq, "ram")], out)
                if result
                else False,
            }
            if not result:
                print(log.read_text()[-3000:], file=sys.stderr)
            rows.append(row)
            print(json.dumps(row))
        if name == args.peer_model:
            peers.append(run_llmc(name, src, sizes[0], args.eval_windows, work))
            print(json.dumps(peers[-1]))
    payload = {
        "rows": rows,
        "llmcompressor": peers,
        "method": (f"shrink {args.shrink}" if args.shrink else "sparsegpt, 50% unstructured")
        + ", calibration c4, evaluation wiki (fp32)",
        "formula": "see bench/scale.py: estimate()",
        "threads": torch.get_num_threads(),
    }
    name = args.out.name if args.out else "scale"
    path = write_result(name, payload, out_dir=args.out.parent if args.out else None)
    print(f"wrote {path}")


def convert_capped(name: str, gguf: Path, cap: int, cap_text: str, work: Path) -> dict:
    """The GGUF → fp32 safetensors conversion (`convert_gguf`, tensor by tensor) into a
    fresh cache under the memory cap (its equality with transformers' whole-model load is
    a unit test: tests/models/test_gguf_stream.py)."""
    script = work / "convert.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom sparsellm.models.load import convert_gguf\n"
        "print('converted', convert_gguf(Path(sys.argv[1])))\n"
    )
    cache = work / "gguf-cache"
    log = work / f"{name}-convert.log"
    measured = run_child(
        [sys.executable, str(script), str(gguf)],
        cap=cap,
        log=log,
        env={"SPARSELLM_CACHE": str(cache)},
    )
    if measured["rc"] != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
    return {
        "model": name,
        "mode": f"GGUF to fp32 safetensors, capped at {cap_text}",
        "seconds": round(measured["seconds"], 1),
        "peak RSS MiB": mib(measured["peak_rss"]),
        "cgroup peak MiB": round(measured["cgroup_peak"] / MiB),
        # peak RSS counts the pages of the memory-mapped GGUF it has read: clean file
        # pages the kernel drops under the cap, not memory the conversion holds
        "GGUF file MiB": mib(gguf.stat().st_size),
        "finished": measured["rc"] == 0,
        "exit code": measured["rc"],
    }


def run_llmc(name: str, src: Path, size: tuple[int, int], windows: int, work: Path) -> dict:
    """llm-compressor's SparseGPT 50% on the same windows: seconds, peak RSS, ppl."""
    import torch
    from transformers import AutoTokenizer
    from vs_llmcompressor import llmc_python

    from sparsellm.data.corpora import resolve_corpus, token_windows

    tok = AutoTokenizer.from_pretrained(src)
    n, seq = size
    files = {"calib": work / f"{name}-calib.pt", "eval": work / f"{name}-eval.pt"}
    torch.save(token_windows(tok, resolve_corpus("c4"), n, seq), files["calib"])
    torch.save(token_windows(tok, resolve_corpus("wiki"), windows, seq), files["eval"])
    out = work / f"{name}-llmc.json"
    cmd = [llmc_python(), str(HERE / "_llmc_worker.py"), "--model", str(src)]
    cmd += ["--calib", str(files["calib"]), "--eval", str(files["eval"])]
    cmd += ["--method", "sparsegpt", "--sparsity", "0.5", "--pattern", "unstructured"]
    cmd += ["--out", str(out)]
    measured = run_child(cmd, log=work / f"{name}-llmc.log")
    peer = json.loads(out.read_text()) if measured["rc"] == 0 else {}
    return {
        "model": name,
        "calib": f"{n}x{seq}",
        "seconds (process)": round(measured["seconds"], 1),
        "peak RSS MiB": mib(measured["peak_rss"]),
        "exit code": measured["rc"],
        **{k: peer.get(k) for k in ("prune_seconds", "sparse_ppl", "measured_sparsity")},
    }


if __name__ == "__main__":
    main()
