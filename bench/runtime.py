"""Decode speed of every weight format on our CPU runtime, against llama.cpp and HF.

What it measures, per model, in one run with nothing else on the machine:

1. the machine's read bandwidth: summing a 1 GiB fp32 buffer (far larger than L3) with
   the bench's thread count, best of 5;
2. for each configuration (dense fp32 / bf16 / int8 / int4, Wanda-pruned 50% / 70% / 2:4
   exported sparse-int8 or sparse-bf16, 50% sparse-int8 + TEAL 40%), the bytes a decode
   step reads, decode tok/s (128 greedy tokens after a 16-token prompt, median of the
   alternated rounds), achieved GB/s and % of the measured bandwidth; HF `generate` fp32;
   llama.cpp (llama-cpp-python in bench/.venv-llamacpp, same thread count) on the Q8_0
   GGUF we export of the same dense and 50%-pruned weights and on the bundled GGUF;
3. prefill tok/s at 512 (and 2048 with --long-prefill) for our formats;
4. quality on the pinned protocol's corpus (wiki, --windows windows of 512): ppl and the
   mean token KL to the dense fp32 model, of exactly the weights each format stores
   (dequantized, in fp32), and "decode ppl" / "decode KL to dense" of the same windows
   read by our decode kernels (16 tokens per verification-style pass, each row's bits
   those of plain decoding): where the CPU has AVX-512 VNNI the int8 kinds multiply
   int8-quantized activations (and so do int4's tiles), which the dequantized model does
   not show. There, int8, int4 and 50% sparse-int8 also decode with fp32 activations
   ("..., fp32 activations" rows, alternated with the rest).

Setup once: python3 -m venv bench/.venv-llamacpp &&
CMAKE_ARGS="-DGGML_NATIVE=ON" bench/.venv-llamacpp/bin/pip install llama-cpp-python
(where -march=native turns on instructions the VM does not allow, e.g. AMX, and the
worker dies with "Illegal instruction": -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
-DGGML_AVX512_VBMI=ON)

    .venv/bin/python bench/runtime.py --model default
    .venv/bin/python bench/runtime.py --model qwen0.5b --windows 4
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import write_result  # noqa: E402

import sparsellm as sl  # noqa: E402
from sparsellm.data.corpora import resolve_corpus, token_windows  # noqa: E402
from sparsellm.eval.kl import next_token_logits  # noqa: E402
from sparsellm.eval.speed import alternate_medians  # noqa: E402
from sparsellm.export.gguf import write_gguf_q8_0  # noqa: E402
from sparsellm.formats import choose_kind, pack, unpack  # noqa: E402
from sparsellm.models.adapters import block_linears, get_blocks  # noqa: E402
from sparsellm.models.load import resolve_source  # noqa: E402
from sparsellm.runtime.decode import DecodeRuntime  # noqa: E402
from sparsellm.runtime.kernels import native_kernel  # noqa: E402

LLAMA_PY = HERE / ".venv-llamacpp" / "bin" / "python"
NEW_TOKENS = 128
PROMPT = 16


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a sum) of a buffer much larger than the caches."""
    buf = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best


class LlamaCpp:
    """A llama.cpp worker process over one GGUF (see _llamacpp_worker.py)."""

    def __init__(self, gguf: Path, threads: int) -> None:
        worker = HERE / "_llamacpp_worker.py"
        self.proc = subprocess.Popen(
            [str(LLAMA_PY), str(worker), str(gguf), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = json.loads(self.proc.stdout.readline())
        self.bytes = gguf.stat().st_size

    def ask(self, cmd: str) -> dict[str, Any]:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def dequantized(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """A copy of `model` holding exactly the weights `fmt` stores (block linears + head)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for block in get_blocks(out):
            for lin in block_linears(block).values():
                lin.weight.copy_(unpack(pack(lin.weight, choose_kind(fmt, lin.weight))))
        head = out.get_output_embeddings()
        head.weight.copy_(unpack(pack(head.weight, choose_kind(fmt, head.weight, head=True))))
    return out


@torch.no_grad()
def decode_logits(rt: DecodeRuntime, ids: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """Next-token logits (L - 1, vocab) of one window (1, L) through the decode kernels,
    `rows` tokens per pass: row r sees the slots up to its own, as in a speculative
    verification pass, and gets the bits it would get decoded alone."""
    n_ids = ids.shape[1]
    rt.reset(1)
    out = []
    for c in range(0, n_ids - 1, rows):
        n = min(rows, n_ids - 1 - c)
        slots = torch.arange(c, c + n)
        visible = torch.ones(n, c + n, dtype=torch.bool).tril(c)
        seq = torch.zeros(n, dtype=torch.int64)
        out.append(rt.step(ids[0, c : c + n], seq, slots, slots, True, visible))
    return torch.cat(out)


@torch.no_grad()
def quality(
    dense_lp: list[torch.Tensor], model: torch.nn.Module | DecodeRuntime, windows: torch.Tensor
) -> dict:
    """ppl of `model` (a torch model, or a runtime read by its decode kernels) and mean
    token KL(dense || model) over `windows`."""
    nll = kl = 0.0
    tokens = 0
    for lp_d, ids in zip(dense_lp, windows.split(1), strict=True):
        logits = (
            decode_logits(model, ids)
            if isinstance(model, DecodeRuntime)
            else next_token_logits(model, ids)
        )
        lp = F.log_softmax(logits, dim=-1)
        targets = ids[:, 1:].reshape(-1)
        nll -= lp.gather(1, targets[:, None]).double().sum().item()
        kl += F.kl_div(lp, lp_d, log_target=True, reduction="sum").double().item()
        tokens += targets.numel()
    return {"ppl": float(torch.tensor(nll / tokens).exp()), "kl": kl / tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--windows", type=int, default=8, help="quality windows of 512 (wiki)")
    ap.add_argument("--calib", type=int, default=16, help="c4 calibration windows of 512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-prefill", action="store_true", help="also time 2048-token prefill")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--name", default=None, help="result name (default runtime-<model>)")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s ({threads} threads)", file=sys.stderr)

    loaded = sl.load_model(args.model)
    dense, tok = loaded.model, loaded.tokenizer
    calib = token_windows(tok, resolve_corpus("c4"), args.calib, 512)
    windows = token_windows(tok, resolve_corpus("wiki"), args.windows, 512)
    models = {"dense": dense}
    for key, spec in (("50%", "wanda:sparsity=0.5"), ("70%", "wanda:sparsity=0.7"),
                      ("2:4", "wanda:sparsity=0.5,pattern=2:4")):  # fmt: skip
        models[key] = copy.deepcopy(dense)
        sl.sparsify(models[key], spec, calib)
    models["50%+teal"] = copy.deepcopy(models["50%"])
    # TEAL's thresholds are quantiles of activations: a few windows pin them (and its
    # calibration costs ~7 s per block on 2 cores, so 4 windows, not --calib)
    sl.sparsify(models["50%+teal"], "teal:sparsity=0.4", calib[:4])

    configs = [  # (row name, model key, format, bytes-saving baseline)
        ("ours fp32", "dense", "fp32"),
        ("ours bf16", "dense", "bf16"),
        ("ours int8", "dense", "int8"),
        ("ours int4 g128", "dense", "int4"),
        ("50% sparse-bf16", "50%", "sparse-bf16"),
        ("50% sparse-int8", "50%", "sparse-int8"),
        ("70% sparse-int8", "70%", "sparse-int8"),
        ("2:4 sparse-int8", "2:4", "sparse-int8"),
        ("50% sparse-int8 + TEAL 40%", "50%+teal", "sparse-int8"),
    ]
    runtimes = {
        name: DecodeRuntime(models[key], max_len=2048 + 16, fmt=fmt) for name, key, fmt in configs
    }
    runtimes_bytes = {k: rt.weight_bytes() for k, rt in runtimes.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dense.config.vocab_size, (1, PROMPT), generator=g)
    skipped: dict[str, float | None] = {}

    float_rts: dict[str, DecodeRuntime] = {}

    def ours(name: str) -> float:
        out = (runtimes.get(name) or float_rts[name]).generate(ids, NEW_TOKENS, sparse=True)
        skipped[name] = out["skipped_fraction"]
        return out["decode_s"]

    def hf() -> float:
        def run(n: int) -> float:
            t = time.perf_counter()
            dense.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip
            return time.perf_counter() - t

        return run(NEW_TOKENS) - run(1)  # the NEW_TOKENS - 1 decode steps

    jobs = {name: (lambda n=name: ours(n)) for name in runtimes}
    ext = native_kernel()
    isa = ext.isa()
    # On VNNI CPUs int8 kinds and int4 multiply int8 activations from tiles: the same weights
    # with fp32 activations (the float kernels, over the row layout: runtimes built with
    # them in use), alternated with the rest, show what that buys.
    if isa == "avx512vnni":
        for name, key, fmt in configs:
            if name not in ("ours int8", "ours int4 g128", "50% sparse-int8"):
                continue
            row = f"{name}, fp32 activations"
            ext.set_isa("avx512")
            try:
                float_rts[row] = DecodeRuntime(models[key], max_len=2048 + 16, fmt=fmt)
            finally:
                ext.set_isa(isa)
            runtimes_bytes[row] = float_rts[row].weight_bytes()

            def floats(n: str = row) -> float:
                ext.set_isa("avx512")
                try:
                    return ours(n)
                finally:
                    ext.set_isa(isa)

            jobs[row] = floats
    jobs["HF generate fp32"] = hf
    workers: dict[str, LlamaCpp] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    if not args.no_llamacpp:
        kind, template = resolve_source(args.model)
        assert kind == "gguf", "llama.cpp rows need a GGUF-sourced model"
        for key, label in (("dense", "dense"), ("50%", "50%")):
            path = tmp / f"{key.strip('%')}-q8_0.gguf"
            write_gguf_q8_0(models[key], template, path)
            workers[f"llama.cpp Q8_0 ({label}, our export)"] = LlamaCpp(path, threads)
        workers[f"llama.cpp {Path(template).name} (bundled)"] = LlamaCpp(Path(template), threads)
        for name, w in workers.items():
            jobs[name] = lambda w=w: w.ask(f"decode {NEW_TOKENS}")["decode_s"]
    decode = alternate_medians(jobs, repeats=args.repeats)
    float_rts.clear()  # timed only: their packed copies would crowd qwen0.5b's quality step

    lengths = (512, 2048) if args.long_prefill else (512,)
    prefill: dict[str, dict[int, float]] = {name: {} for name in runtimes}
    for n in lengths:
        x = torch.randint(0, dense.config.vocab_size, (1, n), generator=g)

        def pre(rt: DecodeRuntime, x: torch.Tensor = x) -> float:
            rt.reset(1)
            t = time.perf_counter()
            rt.forward(x, 0, sparse=True, last_only=True)
            return time.perf_counter() - t

        med = alternate_medians({k: (lambda r=rt: pre(r)) for k, rt in runtimes.items()},
                                repeats=2 if n <= 512 else 1)  # fmt: skip
        for k, s in med.items():
            prefill[k][n] = n / s
    for w in workers.values():
        w.close()

    with torch.no_grad():
        dense_lp = [F.log_softmax(next_token_logits(dense, w), dim=-1) for w in windows.split(1)]
    qual = {"HF generate fp32": quality(dense_lp, dense, windows)}
    decode_qual = {}
    for name, key, fmt in configs:
        decode_qual[name] = quality(dense_lp, runtimes[name], windows)
        runtimes[name] = None  # free the packed copy before making a dequantized one
        qual[name] = quality(dense_lp, dequantized(models[key], fmt), windows)

    steps = NEW_TOKENS - 1
    base = {k: steps / decode[k] for k in ("ours fp32", "ours int8")}
    q8 = next((k for k in workers if "Q8_0 (dense" in k), None)
    rows = []
    for name in jobs:
        tok_s = steps / decode[name]
        if name in workers:
            nbytes = workers[name].bytes
        elif name == "HF generate fp32":
            nbytes = 4 * sum(p.numel() for p in dense.parameters())
        else:
            nbytes = runtimes_bytes[name]
        row = {
            "config": name,
            "MB/token": round(nbytes / 1e6, 1),
            "decode tok/s": round(tok_s, 1),
            "GB/s": round(tok_s * nbytes / 1e9, 1),
            "% bandwidth": round(100 * tok_s * nbytes / bandwidth, 0),
            "inputs skipped": None if skipped.get(name) is None else round(skipped[name], 3),
            "x ours fp32": round(tok_s / base["ours fp32"], 2),
            "x ours int8": round(tok_s / base["ours int8"], 2),
            "x llama.cpp Q8_0": round(tok_s * decode[q8] / steps, 2) if q8 else None,
        }
        for n in lengths:
            row[f"prefill {n} tok/s"] = round(prefill[name][n], 1) if name in prefill else None
        if name in qual:
            row["ppl"] = round(qual[name]["ppl"], 3)
            row["KL to dense"] = round(qual[name]["kl"], 4)
        if name in decode_qual:
            row["decode ppl"] = round(decode_qual[name]["ppl"], 3)
            row["decode KL to dense"] = round(decode_qual[name]["kl"], 4)
        rows.append(row)
    write_result(
        args.name or f"runtime-{args.model}",
        {
            "rows": rows,
            "read_bandwidth_GBps": round(bandwidth / 1e9, 2),
            "kernels": isa,
            "model": args.model,
            "new_tokens": NEW_TOKENS,
            "prompt_tokens": PROMPT,
            "quality": f"wiki, {args.windows} windows of 512 tokens; calibration c4 "
            f"{args.calib} x 512 (Wanda), 4 x 512 (TEAL 40%)",
            "llama_cpp": {k: w.info.get("version") for k, w in workers.items()},
            "spread": "decode: median of alternated rounds; see --repeats",
        },
    )


if __name__ == "__main__":
    main()
