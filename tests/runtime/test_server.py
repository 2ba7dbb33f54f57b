"""`sparsellm serve`'s app, on a tiny model behind a real loopback socket, spoken to with
the official `openai` client: answers equal the runtime's own greedy decode, streams
concatenate to the whole answer, batching changes nothing, bad input is a 4xx in
OpenAI's error shape, and a client that hangs up frees its slot."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx2")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from sparsellm.cli import main  # noqa: E402
from sparsellm.cli.generate import sampler  # noqa: E402
from sparsellm.models.tiny import byte_tokenizer, tiny_model  # noqa: E402
from sparsellm.runtime.decode import DecodeRuntime  # noqa: E402
from sparsellm.runtime.server import Finish, Job, Scheduler, create_app  # noqa: E402

NAME = "tiny"
MAX_LEN = 128
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass
class Served:
    base: str
    client: Any
    scheduler: Scheduler
    model: torch.nn.Module
    tokenizer: Any
    knobs: dict[str, Any]  # "delay": seconds added to each decode step; "fail": raise in it


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    model = tiny_model("llama", seed=0)
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    rt = DecodeRuntime(model, max_len=MAX_LEN, fmt="fp32")
    # a slower step: requests overlap in the batching test, a cancel lands mid-stream
    knobs: dict[str, Any] = {"delay": 0.002, "fail": False}
    step = rt.step

    def slow_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        time.sleep(knobs["delay"])
        if knobs["fail"]:
            raise RuntimeError("injected failure")
        return step(*args, **kwargs)

    rt.step = slow_step
    # no stop ids: a random model's text ends only at max_tokens, so lengths are known
    app = create_app(rt, tok, NAME, sampler=sampler, stop_ids=frozenset(), max_batch=4)
    with _running(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=30)
        yield Served(base, client, app.state.scheduler, model, tok, knobs)


@contextmanager
def _running(app: Any) -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _hf_greedy(s: Served, prompt: str, new: int) -> str:
    ids = s.tokenizer(prompt, return_tensors="pt").input_ids
    out = s.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False
    )
    return s.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _complete(s: Served, prompt: str, n: int, **kw: Any) -> str:
    r = s.client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, **kw)
    return r.choices[0].text


def test_completion_is_greedy_decode_and_streams_the_same_text(served: Served) -> None:
    r = served.client.completions.create(model=NAME, prompt="The cat", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == NAME
    assert r.choices[0].text == _hf_greedy(served, "The cat", 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 12, 19)
    chunks = list(
        served.client.completions.create(
            model=NAME,
            prompt="The cat",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_stop_strings_end_the_text_before_them(served: Served) -> None:
    text = _complete(served, "hello", 24)
    stop = next(text[i : i + 2] for i in range(1, len(text)) if text[i : i + 2].isalnum())
    r = served.client.completions.create(
        model=NAME, prompt="hello", max_tokens=24, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = served.client.completions.create(
        model=NAME, prompt="hello", max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_seeded_sampling_repeats(served: Served) -> None:
    a, b, c = (
        served.client.completions.create(
            model=NAME, prompt="dice", max_tokens=16, temperature=1.0, top_p=0.9, seed=s
        )
        .choices[0]
        .text
        for s in (7, 7, 8)
    )
    assert a == b != c


def test_chat_applies_the_template_and_streams(served: Served) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = served.client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0
    )
    rendered = "system: be brief\nuser: hi\nassistant: "
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _complete(served, rendered, 10)
    assert r.usage.prompt_tokens == len(rendered) and r.usage.completion_tokens == 10
    chunks = list(
        served.client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_health_and_metrics(served: Served) -> None:
    assert [m.id for m in served.client.models.list().data] == [NAME]
    assert served.client.models.retrieve(NAME).id == NAME
    health = httpx.get(f"{served.base}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    _complete(served, "count me", 3)
    text = httpx.get(f"{served.base}/metrics").text
    for series in (
        'sparsellm_requests_total{endpoint="/v1/completions",status="200"}',
        "sparsellm_prompt_tokens_total",
        "sparsellm_completion_tokens_total",
        "sparsellm_request_latency_seconds_bucket",
        "sparsellm_time_to_first_token_seconds_bucket",
        "sparsellm_decode_batch_size_bucket",
        "sparsellm_running_requests",
    ):
        assert series in text, series


COMPLETION = {"model": NAME, "prompt": "hello", "max_tokens": 4}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {**COMPLETION, "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "model": "gpt-9"}, 404, "model"),
        ("/v1/completions", {**COMPLETION, "prompt": "x" * 200}, 400, "prompt"),
        ("/v1/completions", {**COMPLETION, "max_tokens": MAX_LEN}, 400, "prompt"),
        ("/v1/completions", {**COMPLETION, "n": 2}, 400, "n"),
        ("/v1/completions", {**COMPLETION, "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, 999]}, 400, "prompt"),
        ("/v1/completions", {"model": NAME}, 400, "prompt"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "model": "other"}, 404, "model"),
        ("/v1/nowhere", COMPLETION, 404, None),
    ],
)
def test_bad_requests_get_openai_errors(
    served: Served, path: str, body: Any, status: int, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        served.base + path, content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert httpx.get(f"{served.base}/health").status_code == 200


def test_the_openai_client_sees_typed_errors(served: Served) -> None:
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model=NAME, prompt="a", max_tokens=2, n=2)
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="nope", messages=[{"role": "user"}])


def test_concurrent_requests_batch_without_changing_answers(served: Served) -> None:
    prompts = [("a", 20), ("two words", 9), ("a somewhat longer prompt", 16), ("x", 3)] * 2
    alone = [_complete(served, p, n) for p, n in prompts]
    served.scheduler.peak_batch = 0
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda pn: _complete(served, *pn), prompts))
    assert together == alone
    assert served.scheduler.peak_batch > 1  # they did share decode steps (at most 4)


def test_a_client_that_hangs_up_frees_its_slot(served: Served) -> None:
    """A closed stream, and a plain request whose client times out, stop their generation."""
    served.knobs["delay"] = 0.05  # 100 steps would take 5 s: the cancel must cut it short

    def wait_idle(t0: float) -> None:
        while served.scheduler.running:
            assert time.monotonic() - t0 < 3, "a request whose client left kept its slot"
            time.sleep(0.02)

    try:
        t0 = time.monotonic()
        stream = served.client.completions.create(
            model=NAME, prompt="long", max_tokens=100, temperature=0, stream=True
        )
        for i, _ in enumerate(stream):
            if i == 1:
                break
        stream.close()
        wait_idle(t0)
        t0 = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            body = {"model": NAME, "prompt": "long", "max_tokens": 100}
            httpx.post(f"{served.base}/v1/completions", json=body, timeout=0.5)
        wait_idle(t0)
    finally:
        served.knobs["delay"] = 0.002
    metrics = httpx.get(f"{served.base}/metrics").text
    assert "sparsellm_cancelled_requests_total 2.0" in metrics
    assert len(_complete(served, "after", 5)) > 0


def test_a_runtime_failure_answers_500_and_the_server_goes_on(served: Served) -> None:
    served.knobs["fail"] = True
    try:
        with pytest.raises(openai.InternalServerError):
            _complete(served, "boom", 4)
    finally:
        served.knobs["fail"] = False
    assert not served.scheduler.running
    assert len(_complete(served, "fine", 4)) > 0


def test_the_scheduler_ends_a_request_at_a_stop_token() -> None:
    """A stop token ends the request with reason "stop" and is counted, not delivered."""
    rt = DecodeRuntime(tiny_model("llama", seed=1), max_len=32, fmt="fp32")
    ids = [72, 105, 33]
    greedy = rt.generate(torch.tensor([ids]), 6, sparse=True)["tokens"][0, 3:].tolist()
    stop = greedy[3]
    k = greedy.index(stop)
    sched = Scheduler(rt, sampler, frozenset({stop}), max_batch=2)
    got: queue.Queue[Any] = queue.Queue()
    sched.start()
    try:
        sched.submit(Job(ids, 10, 0.0, 1.0, 0, deliver=got.put))
        items = [got.get(timeout=10) for _ in range(k + 1)]
    finally:
        sched.stop()
    assert items == [*greedy[:k], Finish("stop", k + 1)]


def test_cli_refuses_bad_flags_before_loading(capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--model", "no/such/dir", "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


def test_cli_serves_a_saved_model(tiny_dir: Path) -> None:
    """`sparsellm serve` end to end in its own process: load, bind, answer, shut down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = "import sys; from sparsellm.cli import main; sys.exit(main())"
    args = ["serve", "--model", str(tiny_dir), "--port", str(port), "--max-batch", "2"]
    proc = subprocess.Popen([sys.executable, "-c", cmd, *args], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = client.completions.create(model=str(tiny_dir), prompt="hi", max_tokens=3, seed=0)
        assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="chat template"):
            client.chat.completions.create(
                model=str(tiny_dir), messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit code is -15
    assert "Application shutdown complete" in err.decode(), err.decode()[-2000:]


@pytest.mark.parametrize(
    "spec", ["lookup", "ngram", "token-recycling", "self:int8", "self:int8+lookup"]
)
def test_a_speculative_server_batches_and_answers_as_the_model_alone(
    served: Served, spec: str
) -> None:
    """With a draft (lossless greedy), concurrent requests decode as lanes verified in one
    pass (chains and trees side by side) and each answer equals the plain server's."""
    speculative = pytest.importorskip("sparsellm.runtime.speculative")
    model = tiny_model("llama", seed=0)
    rt = DecodeRuntime(model, max_len=MAX_LEN, fmt="fp32")
    draft = speculative.build_draft(spec, rt, SimpleNamespace(model=model, tokenizer=None))
    app = create_app(
        rt,
        served.tokenizer,
        NAME,
        sampler=sampler,
        stop_ids=frozenset(),
        max_batch=4,
        draft=draft,
        context=MAX_LEN - speculative.MAX_ROWS,
    )
    prompts = [("abcabcabc", 12), ("two words", 6), ("xyzxyzxyzxyz", 20), ("hello", 9)] * 2
    with _running(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(
                pool.map(
                    lambda pn: (
                        client.completions.create(
                            model=NAME, prompt=pn[0], max_tokens=pn[1], temperature=0
                        )
                        .choices[0]
                        .text
                    ),
                    prompts,
                )
            )
        with pytest.raises(openai.BadRequestError, match="context window"):
            client.completions.create(model=NAME, prompt="x" * (MAX_LEN - 10), max_tokens=4)
    assert got == [_complete(served, p, n) for p, n in prompts]
    assert app.state.scheduler.peak_batch > 1  # requests shared verification passes
