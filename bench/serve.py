"""Throughput and latency of `sparsellm serve` under concurrent clients, and its errors.

What it measures, in one run with nothing else on the machine:

1. the server (``sparsellm serve --model M --max-batch <largest concurrency>``, started as
   a subprocess on a free loopback port) answers ``--requests`` streamed, greedy
   completions of ``--max-tokens`` tokens (prompts: paragraphs of the bundled wiki corpus)
   from each number of concurrent clients in ``--concurrency`` (threads sharing one
   official `openai` client, each taking the next request as soon as its last ended):
   aggregate completion tok/s, p50 / p99 time to first token and request latency, and the
   ratio of each level's tok/s to the first level's (continuous batching's gain);
2. 50 malformed requests (bad JSON, negative max_tokens, an unknown model, a prompt over
   the context window, n=2), counted as 4xx or anything else, then whether /health still
   answers.

With ``--draft D`` a second server (``sparsellm serve --draft D``) runs beside the plain
one, both up for the whole run, and every concurrency level goes to the plain server then
to the speculative one (its rows are labelled ``draft``): what speculative decoding adds
on top of batching, same run, same prompts; the answers of the two must be equal (greedy,
lossless), and the bench counts those that are not.

    .venv/bin/python bench/serve.py --model default
    .venv/bin/python bench/serve.py --model default --draft lookup --requests 100
    .venv/bin/python bench/serve.py --requests 8 --max-tokens 8 --concurrency 1,2 \\
        --out /tmp/serve-smoke                         # a smoke run, not a result
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import write_result  # noqa: E402

from sparsellm.data.corpora import read_text, resolve_corpus  # noqa: E402
from sparsellm.report.markdown import table  # noqa: E402

MODEL_NAME_UNKNOWN = "no-such-model"
MALFORMED = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int) -> list[str]:
    """`n` prompts: the first wiki paragraphs of at least 200 characters, cut to ~200 at a
    word boundary (a few dozen tokens: the bench is about decode, not prefill)."""
    paras = [p.strip() for p in read_text(resolve_corpus("wiki")).split("\n")]
    out = [p[:200].rsplit(" ", 1)[0] for p in paras if len(p) >= 200]
    return list(itertools.islice(itertools.cycle(out), n))


def start_server(
    model: str, port: int, max_batch: int, log: Path, draft: str | None = None
) -> subprocess.Popen:
    """`sparsellm serve` in the background; returns once /health answers."""
    cmd = [
        str(Path(sys.executable).with_name("sparsellm")),
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        *(["--draft", draft] if draft else []),
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600  # the first load of a GGUF de-quantises it
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not answer /health within 600 s")


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no samples)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: time to first token, latency, tokens, text."""
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    text = []
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            text.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens,
            "text": "".join(text)}  # fmt: skip


def load_level(
    client: openai.OpenAI, model: str, texts: list[str], max_tokens: int, clients: int,
    answers: dict[int, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """All `texts` through `clients` concurrent clients (a bounded closed loop); each
    answer's text lands in `answers` by prompt index."""
    todo = iter(enumerate(texts))
    lock = threading.Lock()
    done: list[dict] = []
    errors: list[str] = []
    answers = {} if answers is None else answers

    def worker() -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            try:
                r = one_request(client, model, item[1], max_tokens)
            except Exception as exc:  # counted, the bench goes on
                errors.append(repr(exc))
                continue
            with lock:
                done.append(r)
                answers[item[0]] = r["text"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    lat = [r["latency"] for r in done]
    ms = lambda x: None if x is None else round(1000 * x, 1)  # noqa: E731
    return {
        "clients": clients,
        "requests": len(texts),
        "errors": len(errors),
        "completion tokens": tokens,
        "wall s": round(wall, 2),
        "tok/s": round(tokens / wall, 2),
        "ttft p50 ms": ms(percentile(ttft, 50)),
        "ttft p99 ms": ms(percentile(ttft, 99)),
        "latency p50 ms": ms(percentile(lat, 50)),
        "latency p99 ms": ms(percentile(lat, 99)),
    }


def malformed(base: str, model: str, n: int) -> dict[str, int]:
    """`n` bad requests of five kinds: how many got a 4xx and how many anything else."""
    good = {"model": model, "prompt": "hello", "max_tokens": 4}
    kinds = [
        b'{"model": "' + model.encode() + b'", "prompt": ',  # truncated JSON
        json.dumps({**good, "max_tokens": -5}).encode(),
        json.dumps({**good, "model": MODEL_NAME_UNKNOWN}).encode(),
        json.dumps({**good, "prompt": "hello " * 20000}).encode(),  # over any context here
        json.dumps({**good, "n": 2}).encode(),
    ]
    counts = {"4xx": 0, "other": 0}
    with httpx.Client(timeout=60) as http:
        for body in itertools.islice(itertools.cycle(kinds), n):
            try:
                r = http.post(
                    f"{base}/v1/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                ok = 400 <= r.status_code < 500 and set(r.json().get("error", {})) == {
                    "message",
                    "type",
                    "param",
                    "code",
                }
            except Exception:
                ok = False
            counts["4xx" if ok else "other"] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="what `sparsellm serve --model` gets")
    ap.add_argument("--requests", type=int, default=200, help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    ap.add_argument("--concurrency", default="1,4,8", help="client counts, comma-separated")
    ap.add_argument(
        "--draft", default=None, metavar="D",
        help="also run `sparsellm serve --draft D` beside the plain server, level by level",
    )  # fmt: skip
    ap.add_argument(
        "--out", default=None, help="result path without .json (default results/serve-MODEL)"
    )
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out or HERE.parent / "results" / f"serve-{Path(args.model).name}")
    servers = {"plain": None, **({"draft": args.draft} if args.draft else {})}

    with tempfile.TemporaryDirectory() as tmp:
        procs: dict[str, subprocess.Popen] = {}
        bases: dict[str, str] = {}
        try:
            for label, draft in servers.items():
                port = free_port()
                bases[label] = f"http://127.0.0.1:{port}"
                log = Path(tmp) / f"server-{label}.log"
                procs[label] = start_server(args.model, port, max(levels), log, draft)
            clients = {
                label: openai.OpenAI(base_url=f"{b}/v1", api_key="none", max_retries=0, timeout=600)
                for label, b in bases.items()
            }
            texts = prompts(args.requests)
            for c in clients.values():
                one_request(c, args.model, texts[0], 2)  # warm-up: kernels, allocator
            rows: list[dict[str, Any]] = []
            answers: dict[tuple[str, int], dict[int, str]] = {}
            for level in levels:
                for label, c in clients.items():
                    got = answers[label, level] = {}
                    row = {"server": label, **load_level(c, args.model, texts, args.max_tokens,
                                                         level, got)}  # fmt: skip
                    rows.append(row)
            first = {r["server"]: r["tok/s"] for r in rows if r["clients"] == levels[0]}
            for row in rows:
                row["x first level tok/s"] = round(row["tok/s"] / first[row["server"]], 2)
                if args.draft:
                    same = [r for r in rows if r["clients"] == row["clients"]]
                    plain = next(r for r in same if r["server"] == "plain")
                    row["x plain tok/s"] = round(row["tok/s"] / plain["tok/s"], 2)
            bad = malformed(bases["plain"], args.model, MALFORMED)
            healthy = httpx.get(f"{bases['plain']}/health", timeout=10).status_code == 200
            extra: dict[str, Any] = {}
            if args.draft:
                differ = sum(
                    answers["draft", lv].get(i) != text
                    for lv in levels
                    for i, text in answers["plain", lv].items()
                )
                bad_d = malformed(bases["draft"], args.model, MALFORMED)
                ok_d = httpx.get(f"{bases['draft']}/health", timeout=10).status_code == 200
                extra = {
                    "draft": args.draft,
                    "draft answers differing from plain": differ,
                    "malformed, draft server": {"sent": MALFORMED, **bad_d, "health_after": ok_d},
                }
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=30)

    if not args.draft:
        for row in rows:
            del row["server"]
    print(table(list(rows[0]), [list(r.values()) for r in rows]))
    health = "ok" if healthy else "FAILED"
    print(f"\nmalformed: {bad['4xx']} answered 4xx, {bad['other']} otherwise; /health: {health}")
    if args.draft:
        differ, bad_d = (
            extra["draft answers differing from plain"],
            extra["malformed, draft server"],
        )
        print(f"speculative answers differing from the plain server's: {differ}; "
              f"malformed to it: {bad_d}")  # fmt: skip
    last = [r for r in rows if r["clients"] == levels[-1]]
    path = write_result(
        out.name,
        {
            "rows": rows,
            "model": args.model,
            "max_tokens": args.max_tokens,
            "sampling": "greedy, streamed completions",
            "prompts": "wiki paragraphs cut to ~200 characters",
            "malformed": {"sent": MALFORMED, **bad, "health_after": healthy},
            **extra,
            "scaling": f"{levels[-1]} vs {levels[0]} clients: "
            + ", ".join(
                f"{r.get('server', 'plain')} {r['x first level tok/s']:.2f}x" for r in last
            ),
        },
        out_dir=out.parent,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
