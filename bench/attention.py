"""Sparse attention and KV-cache compression on the default model, each beside dense SDPA.

Prefill methods: end-to-end prefill time at `--speed-length` (dense and method measured
alternately in one process, medians, ratio), the attention kernel alone on one layer's
real q/k/v (mask estimation + block-sparse compute vs SDPA: where the time goes),
passkey / needle accuracy at `--lengths`, and wiki perplexity on `--ppl-windows`
windows per `--ppl-lengths`.

KV-cache methods: stored K/V bytes after a `--speed-length` prompt vs a dense cache,
decode tokens/s from that context (alternating with dense), passkey / needle accuracy
decoding the answer from the compressed cache, and the perplexity of the last
`--tail` tokens of each wiki window decoded from the compressed cache (a single
forward never touches the cache, so plain perplexity could not differ from dense).

Methods that run past the trained window (``longheads``) are compared with `--truncate N`:
the dense model scored on each prompt's last N tokens.

Prints Markdown tables and writes results/<--name>.json through bench/provenance.py (one
row per method; the per-task details beside them). Smoke run:

    python bench/attention.py --lengths 1024 --samples 1 --speed-length 1024 \
        --ppl-lengths 1024 --ppl-windows 1 --repeats 1 --decode-steps 4 --tail 8
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import write_result  # noqa: E402

from sparsellm.api import sparsify  # noqa: E402
from sparsellm.config import from_spec  # noqa: E402
from sparsellm.data.corpora import resolve_corpus, token_windows  # noqa: E402
from sparsellm.eval.longctx import TASKS, answer_correct, make_samples  # noqa: E402
from sparsellm.eval.perplexity import perplexity  # noqa: E402
from sparsellm.eval.speed import prefill_seconds  # noqa: E402
from sparsellm.integrations.transformers import calibrate, draft_cache, sparse_attention  # noqa: E402
from sparsellm.methods.attention.blocksparse import block_sparse_attention  # noqa: E402
from sparsellm.methods.attention.cache import CompressedLayer  # noqa: E402
from sparsellm.methods.attention.decode import (  # noqa: E402
    cache_nbytes,
    cached_answer_correct,
    cached_tail_nll,
    decode_tokens_per_s,
)
from sparsellm.models.load import load_model  # noqa: E402
from sparsellm.report.markdown import table  # noqa: E402

PREFILL = [
    "full",
    "sink_window:sink=64,window=1024",
    "power:sink=64,window=512",
    "block_topk:blocks=16",
    "hip:blocks=16",
    "vertical_slash:vertical=256,slash=256",
    "flexprefill:gamma=0.9,tau=0.1",
    "minference",
    "moa:density=0.25",
    "anchor:theta=8",
]
KV = [
    "streaming_kv:sink=64,window=1984",
    "snapkv:budget=2048",
    "h2o:budget=2048,recent=1024",
    "think:keep=0.5,budget=2048",
    "quest:budget=2048",
    "actqkv:budget=2048",
    "tidal:budget=2048",
    "double_sparsity:budget=2048,channels=16",
    "speckv:budget=2048",
]


def _is_kv(method: Any) -> bool:
    return method.family == "kv"


def _cache_maker(session: Any, method: Any, draft: Any) -> Any:
    """``make(prompt_ids)`` -> a fresh session cache (SpecKV: scored by the draft first)."""
    if method.needs_draft():
        return lambda ids: session.new_cache(draft_cache(draft, ids, method))
    return lambda ids: session.new_cache()


def _dense_nbytes(cache: Any) -> int:
    """Bytes the model's default cache would hold for the tokens `cache` has seen: every
    token for compressing layers, what is stored for sliding-window ones (already bounded
    by the model itself, so they count the same on both sides)."""
    return sum(
        2
        * layer.values[:, :, :1].numel()
        * (layer.get_seq_length() if isinstance(layer, CompressedLayer) else layer.keys.shape[2])
        * layer.values.element_size()
        for layer in cache.layers
    )


def _accuracy(
    model: Any, samples: list, method: Any | None, draft: Any = None, sizes: list | None = None
) -> dict[str, float]:
    """Accuracy per task@length; KV methods (and their dense reference) decode from a cache.
    For KV methods, (stored, dense) cache bytes after each prompt are appended to `sizes`."""
    hits: dict[str, list[bool]] = {}

    def score(session: Any) -> None:
        for s in samples:
            if method is not None and _is_kv(method):
                cache = _cache_maker(session, method, draft)(torch.tensor([s.prompt]))
                ok = cached_answer_correct(model, s, cache)
                if sizes is not None:
                    sizes.append((cache_nbytes(cache), _dense_nbytes(cache)))
            else:
                ok = answer_correct(model, s)
            hits.setdefault(f"{s.task}@{s.length}", []).append(ok)

    if method is None:
        score(None)
    else:
        with sparse_attention(model, method) as session:
            score(session)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def _ppl(
    model: Any, windows: dict[int, torch.Tensor], method: Any, tail: int, draft: Any = None
) -> dict:
    """Wiki perplexity per length: plain for prefill methods, cached tail for KV methods."""
    with sparse_attention(model, method) as session:
        if not _is_kv(method):
            return {str(n): perplexity(model, w, batch_size=1)["ppl"] for n, w in windows.items()}
        return _tail_ppl(model, windows, tail, _cache_maker(session, method, draft))


def _tail_ppl(model: Any, windows: dict[int, torch.Tensor], tail: int, make_cache: Any) -> dict:
    """Perplexity of each window's last `tail` tokens, decoded one by one from a new cache
    (``make_cache(prompt_ids)``)."""
    out = {}
    for n, w in windows.items():
        nll = sum(cached_tail_nll(model, row, tail, make_cache(row[None, :-tail])) for row in w)
        out[str(n)] = float(torch.tensor(nll / (tail * w.shape[0])).exp())
    return out


def _alternate(fn_dense: Any, fn_method: Any, repeats: int) -> tuple[float, float]:
    fn_dense()  # warm-up
    times: dict[str, list[float]] = {"d": [], "m": []}
    for _ in range(repeats):
        times["d"].append(fn_dense())
        times["m"].append(fn_method())
    return statistics.median(times["d"]), statistics.median(times["m"])


def _prefill_speed(model: Any, method: Any, length: int, repeats: int) -> dict:
    # generate()'s protocol: the LM head runs for the last position only, in both arms
    def sparse() -> float:
        with sparse_attention(model, method):
            return prefill_seconds(model, length, logits_to_keep=1)

    dense_s, sparse_s = _alternate(
        lambda: prefill_seconds(model, length, logits_to_keep=1), sparse, repeats
    )
    return {"dense_s": dense_s, "method_s": sparse_s, "speedup": dense_s / sparse_s}


def _capture_qkv(model: Any, ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Real post-RoPE q/k/v of one layer, recorded by a pass-through attention function."""
    got: dict[str, torch.Tensor] = {}

    def record(module: Any, q: Any, k: Any, v: Any, mask: Any, **kwargs: Any) -> Any:
        if module.layer_idx == layer:
            got.update(q=q, k=k, v=v)
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    AttentionInterface.register("bench_record", record)
    AttentionMaskInterface.register("bench_record", sdpa_mask)
    model.set_attn_implementation("bench_record")
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation("sdpa")
    return got


def _kernel_time(method: Any, qkv: dict[str, torch.Tensor], layer: int) -> dict:
    """One layer's attention alone: SDPA vs (mask estimation + block-sparse compute)."""
    q, k, v = qkv["q"], qkv["k"], qkv["v"]

    def sdpa() -> float:
        s = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return time.perf_counter() - s

    est: list[float] = []

    def sparse() -> float:
        s = time.perf_counter()
        if method.attend(q, k, v, q.shape[-1] ** -0.5, layer) is None:  # its own kernel
            mask = method.prefill_mask(q, k, layer)
            est.append(time.perf_counter() - s)
            block_sparse_attention(q, k, v, mask, method.block)
        return time.perf_counter() - s

    dense_s, sparse_s = _alternate(sdpa, sparse, 3)
    estimate = statistics.median(est) if est else None
    return {"sdpa_s": dense_s, "method_s": sparse_s, "estimate_s": estimate}


def _kv_speed(model: Any, method: Any, context: int, steps: int, repeats: int) -> dict:
    """KV bytes after a `context` prompt vs dense, and decode tok/s (alternating)."""
    with sparse_attention(model, method) as session:
        cache = session.new_cache()
        decode_tokens_per_s(model, context, 1, cache)
        kv_bytes = cache_nbytes(cache)
        dense_cache = DynamicCache(config=model.config)  # the model's own default cache
        decode_tokens_per_s(model, context, 1, dense_cache)
        dense_bytes = cache_nbytes(dense_cache)
        sizes = {"kv_bytes": kv_bytes, "dense_kv_bytes": dense_bytes}
        sizes["kv_ratio"] = dense_bytes / kv_bytes

        def timed(make: Any) -> Any:
            return lambda: 1.0 / decode_tokens_per_s(model, context, steps, make())

        d, m = _alternate(
            timed(lambda: DynamicCache(config=model.config)), timed(session.new_cache), repeats
        )
    return {**sizes, "dense_tok_s": 1 / d, "method_tok_s": 1 / m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="default",
        help="model source (default: bundled SmolLM2-135M; e.g. a Gemma-3 .gguf that retrieves)",
    )
    ap.add_argument("--methods", default=";".join(PREFILL + KV), help="';'-separated specs")
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument(
        "--tasks", default="passkey,needle", help="long-context tasks (comma-separated)"
    )
    ap.add_argument("--speed-length", type=int, default=8192)
    ap.add_argument("--ppl-lengths", default="4096,8192")
    ap.add_argument(
        "--ppl-windows", type=int, default=2, help="wiki windows per length (0: no perplexity)"
    )
    ap.add_argument("--tail", type=int, default=128, help="decoded tokens per window (KV ppl)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--kernel-layer", type=int, default=15)
    ap.add_argument(
        "--quality-only",
        action="store_true",
        help="skip every timing (prefill, kernel, decode tok/s); KV bytes are still measured",
    )
    ap.add_argument(
        "--speed-only",
        action="store_true",
        help="only the timings and KV bytes (no accuracy, no perplexity): an idle-machine run",
    )
    ap.add_argument(
        "--calib-length", type=int, default=4096, help="MInference / MoA / Double Sparsity tokens"
    )
    ap.add_argument(
        "--draft", default="wanda:0.5", help="SpecKV draft: METHOD:SPARSITY of a pruned copy"
    )
    ap.add_argument(
        "--skip-dense",
        action="store_true",
        help="no dense accuracy/perplexity rows (already measured by another run)",
    )
    ap.add_argument(
        "--truncate",
        type=int,
        default=0,
        help="also score the dense model on each prompt's last N tokens (the baseline of "
        "methods that run past the trained window)",
    )
    ap.add_argument("--name", default="attention-default", help="result name under results/")
    args = ap.parse_args()
    if args.speed_only and args.quality_only:
        ap.error("--speed-only and --quality-only exclude each other")
    torch.manual_seed(0)
    specs = [s for s in args.methods.split(";") if s.strip()]
    # fail on a bad spec before loading
    methods = {s: from_spec(s, family=("prefill", "kv")) for s in specs}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        ap.error(f"unknown task(s) {', '.join(sorted(unknown))}; valid: {', '.join(TASKS)}")
    model, tok = load_model(args.model)
    model.eval()
    methods = {s: m if _is_kv(m) else m.bind(model.config) for s, m in methods.items()}
    calib = token_windows(tok, resolve_corpus("c4"), 1, args.calib_length)
    draft = None
    for spec, method in methods.items():  # calibrate once, outside every timing
        if method.needs_calibration():
            methods[spec] = calibrate(model, calib, method)
        elif _is_kv(method) and method.needs_draft() and draft is None and not args.speed_only:
            draft = _draft(model, tok, args.draft)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    samples = [s for task in tasks for s in make_samples(tok, task, lengths, args.samples)]
    wiki = resolve_corpus("wiki")
    windows = {
        int(n): token_windows(tok, wiki, args.ppl_windows, int(n))
        for n in args.ppl_lengths.split(",")
        if args.ppl_windows > 0
    }
    with torch.no_grad():
        speed_ids = token_windows(tok, wiki, 1, args.speed_length)
        timed_prefill = not args.quality_only and not all(map(_is_kv, methods.values()))
        # the kernel timing's q/k/v: one full forward, only when a prefill method is timed
        qkv = _capture_qkv(model, speed_ids, args.kernel_layer) if timed_prefill else None
        dense: dict[str, Any] = {"accuracy": {}, "ppl": {}, "tail_ppl": {}}
        if not args.speed_only and not args.skip_dense:
            dense = {
                "accuracy": _accuracy(model, samples, None),
                "ppl": {
                    str(n): perplexity(model, w, batch_size=1)["ppl"] for n, w in windows.items()
                },
                "tail_ppl": _tail_ppl(
                    model, windows, args.tail, lambda ids: DynamicCache(config=model.config)
                ),
            }
        results: dict[str, Any] = {"dense": dense, "methods": {}, "args": vars(args)}
        if args.truncate and not args.speed_only:
            cut = [dataclasses.replace(s, prompt=s.prompt[-args.truncate :]) for s in samples]
            results["truncated"] = _accuracy(model, cut, None)
        for spec, method in methods.items():
            entry: dict[str, Any] = {"kind": "kv" if _is_kv(method) else "prefill"}
            sizes: list[tuple[int, int]] = []
            entry["accuracy"], entry["ppl"] = {}, {}
            if not args.speed_only:
                entry["accuracy"] = _accuracy(model, samples, method, draft, sizes)
                entry["ppl"] = _ppl(model, windows, method, args.tail, draft)
            if _is_kv(method) and (args.quality_only or method.needs_draft()):
                if sizes:  # bytes of the caches that answered the longest prompts
                    stored, full = sizes[-1]
                    entry.update(kv_bytes=stored, dense_kv_bytes=full, kv_ratio=full / stored)
            elif _is_kv(method):
                entry.update(
                    _kv_speed(model, method, args.speed_length, args.decode_steps, args.repeats)
                )
            elif not args.quality_only:
                entry["prefill"] = _prefill_speed(model, method, args.speed_length, args.repeats)
                entry["kernel"] = _kernel_time(method, qkv, args.kernel_layer)
            results["methods"][spec] = entry
            _write(args.name, results, tasks, lengths)  # a long run keeps what it did
            print(f"done {spec}", flush=True)
    _print(results, tasks, lengths)
    print(f"wrote {_write(args.name, results, tasks, lengths)}")


def _draft(model: Any, tok: Any, spec: str) -> Any:
    """SpecKV's draft: a copy of `model` pruned by METHOD to SPARSITY on 16 c4 windows."""
    import copy

    name, _, sparsity = spec.partition(":")
    draft = copy.deepcopy(model)
    calib = token_windows(tok, resolve_corpus("c4"), 16, 512)
    sparsify(draft, [{"method": name, "sparsity": float(sparsity or 0.5)}], calib)
    return draft


def _write(name: str, results: dict, tasks: list[str], lengths: tuple[int, ...]) -> Path:
    """results/<name>.json: one row per method (both tables' columns), details beside."""
    kinds = {e["kind"] for e in results["methods"].values()}
    tables = zip(("prefill", "kv"), _tables(results, tasks, lengths), strict=True)
    rows = [
        {"table": kind, **dict(zip(head, row, strict=True))}
        for kind, (head, body) in tables
        if kind in kinds
        for row in body
    ]
    return write_result(name, {"rows": rows, "details": results})


def _print(results: dict, tasks: list[str], lengths: tuple[int, ...]) -> None:
    for head, body in _tables(results, tasks, lengths):
        print(table(head, body))
        print()


def _tables(results: dict, tasks: list[str], lengths: tuple[int, ...]) -> list[tuple]:
    """(head, rows) of the prefill table and of the KV table (a missing value is None)."""
    dense = results["dense"]
    cols = [f"{t}@{n}" for t in tasks for n in lengths]
    args = results["args"]
    ppl_keys = [n for n in args["ppl_lengths"].split(",") if args["ppl_windows"] > 0]
    head = ["method", "prefill speedup", "attn kernel ×", *cols, *(f"ppl@{n}" for n in ppl_keys)]
    rows = [
        [
            "dense sdpa",
            1.0,
            1.0,
            *(dense["accuracy"].get(c) for c in cols),
            *(dense["ppl"].get(n) for n in ppl_keys),
        ]
    ]
    kv_head = ["method", "KV bytes ×smaller", "decode tok/s", "dense tok/s", *cols]
    kv_head += [f"tail ppl@{n}" for n in ppl_keys]
    kv_rows = [["dense cache", 1.0, None, None, *(dense["accuracy"].get(c) for c in cols)]]
    kv_rows[0] += [dense["tail_ppl"].get(n) for n in ppl_keys]
    if "truncated" in results:
        cut = f"dense, last {args['truncate']} tokens"
        rows.append([cut, None, None, *(results["truncated"].get(c) for c in cols)])
        rows[-1] += [None] * len(ppl_keys)
    for spec, e in results["methods"].items():
        acc = [e["accuracy"].get(c) for c in cols]
        ppl = [e["ppl"].get(n) for n in ppl_keys]
        if e["kind"] == "kv":
            tok_s = [e.get("method_tok_s"), e.get("dense_tok_s")]  # absent: --quality-only
            kv_rows.append([spec, e.get("kv_ratio"), *tok_s, *acc, *ppl])
        else:
            kern = e.get("kernel")
            ratio = kern["sdpa_s"] / kern["method_s"] if kern else None
            speedup = e["prefill"]["speedup"] if "prefill" in e else None
            rows.append([spec, speedup, ratio, *acc, *ppl])
    return [(head, rows), (kv_head, kv_rows)]


if __name__ == "__main__":
    main()
