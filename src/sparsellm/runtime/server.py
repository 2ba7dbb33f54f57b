"""An OpenAI-compatible HTTP server over the CPU decode runtime (`sparsellm serve`).

Long module: the request schemas, the batching scheduler and the routes share one app's
state and error shapes; read top to bottom they are one piece (split along those three
lines if it grows further).

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (both with ``stream: true`` as
server-sent events in OpenAI's chunk shapes, ending with ``data: [DONE]``),
``/v1/models``, ``/health`` and Prometheus ``/metrics``.

Why one worker thread: `DecodeRuntime` keeps the KV cache and the native Decoder as
mutable state and is not thread-safe, so a single `Scheduler` thread owns it. Request
handlers run on the event loop and only talk to it through queues: a thread-safe inbox
one way, each request's `asyncio.Queue` (fed with ``call_soon_threadsafe``) the other.

Why continuous batching: a decode step reads every weight once whatever the number of
rows, so serving concurrent requests in one `DecodeRuntime.step` multiplies throughput
on a memory-bound CPU. Each request owns one cache row ("slot") from its prefill to its
last token; every loop iteration admits waiting requests into free slots (prefill), then
runs one step over all running slots at their own positions, delivers the tokens and
frees the slots of finished or cancelled requests. Rows never interact in the step, so
a request gets exactly the tokens it would get alone. With a speculative ``draft`` each
running request is a `Lane` (`sparsellm.runtime.speculative`): every iteration each lane's
draft proposes, one step verifies all the lanes' rows together, and each lane keeps its
accepted tokens, so a request still gets exactly its greedy tokens (or, sampling, tokens
from the target's distribution) while requests share the weight reads.

Bad input (malformed JSON, a negative ``max_tokens``, ``n > 1``, an unknown model, a
prompt over the context window) is a 4xx in OpenAI's error shape, never a crash; a
failure inside the runtime fails the requests it was serving with a 500 and the
scheduler keeps going. FastAPI, uvicorn and prometheus-client are imported here only:
`sparsellm serve` imports this module lazily, so ``import sparsellm`` stays light.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

Picker = Callable[[torch.Tensor], int]
"""Maps last-position logits (vocab,) to the next token id."""
SamplerFactory = Callable[[float, float, int], Picker]
"""(temperature, top_p, seed) -> a picker; one per request, so seeds do not interfere."""
"""(ids (1, P), max_new_tokens, temperature=, top_p=, seed=, stop=) -> tokens."""

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


# --- the scheduler -------------------------------------------------------------------


@dataclass(frozen=True)
class Finish:
    """The end of a request's token stream: why it ended and how many tokens it sampled
    (a stop token counts, as in OpenAI's usage, though it is not part of the text)."""

    reason: Literal["stop", "length", "cancelled"]
    tokens: int


@dataclass
class Job:
    """One request as the scheduler sees it. `deliver` is called from the worker thread
    with each token id, then a `Finish` or the exception that ended the request; it must
    be thread-safe. `cancelled` is set by the handler (client gone, stop string seen)
    and read by the worker at its next step."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    deliver: Callable[[int | Finish | BaseException], None]
    cancelled: bool = False
    # owned by the worker thread
    slot: int = -1
    pos: int = 0  # cache position the next fed token goes to
    made: int = 0
    last: int = 0
    pick: Picker | None = None
    lane: Any = None  # its speculative `Lane`, with a draft


@dataclass
class Scheduler:
    """Owns the runtime in one worker thread and serves `Job`s (see the module doc)."""

    rt: Any
    sampler: SamplerFactory
    stop_ids: frozenset[int]
    max_batch: int = 8
    sparse: bool = True
    draft: Any = None  # a speculative `Draft`: requests decode as lanes
    on_batch: Callable[[int], None] = lambda size: None
    inbox: queue.Queue[Job | None] = field(default_factory=queue.Queue)
    waiting: collections.deque[Job] = field(default_factory=collections.deque)
    running: list[Job] = field(default_factory=list)
    peak_batch: int = 0
    thread: threading.Thread | None = field(default=None, init=False)
    drafts: list[Any] = field(default_factory=list, init=False)  # per cache row, with `draft`

    def start(self) -> None:
        self.rt.reset(self.max_batch)  # once: each request then owns one cache row
        # one draft per cache row (shared where its state does not depend on the sequence)
        self.drafts = self.draft.for_rows(self.max_batch) if self.draft is not None else []
        self.thread = threading.Thread(target=self._loop, name="sparsellm-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(None)
        if self.thread is not None:
            self.thread.join()

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def queued(self) -> int:
        """Requests not yet given a slot (approximate: read from another thread)."""
        return len(self.waiting) + self.inbox.qsize()

    def _loop(self) -> None:
        while True:
            block = not self.running and not self.waiting
            try:
                while True:  # drain the inbox, waiting for the first job only when idle
                    job = self.inbox.get(block=block)
                    if job is None:
                        return
                    self.waiting.append(job)
                    block = False
            except queue.Empty:
                pass
            try:
                self._admit()
                self._step()
            except Exception as exc:  # the runtime failed: fail its requests, keep serving
                log.exception("generation failed")
                for job in self.running:
                    job.deliver(exc)
                self.running.clear()

    def _admit(self) -> None:
        """Prefill waiting requests into free slots; a first token may already end one."""
        free = sorted(set(range(self.max_batch)) - {j.slot for j in self.running})
        while self.waiting and free:
            job = self.waiting.popleft()
            if job.cancelled:
                job.deliver(Finish("cancelled", 0))
                continue
            job.slot, job.pos = free.pop(0), len(job.ids)
            ids = torch.tensor([job.ids], dtype=torch.int64)
            try:
                first = self._prefill(job, ids)
            except Exception as exc:  # this prompt failed: the running requests go on
                log.exception("prefill failed")
                job.deliver(exc)
                free.insert(0, job.slot)
                continue
            self.running.append(job)
            if self._emit(job, first):
                self.running.remove(job)

    def _prefill(self, job: Job, ids: torch.Tensor) -> int:
        """Fill the job's cache row with its prompt; its first token."""
        if self.draft is None:
            job.pick = self.sampler(job.temperature, job.top_p, job.seed)
            logits = self.rt.forward(ids, 0, self.sparse, last_only=True, seq=job.slot)
            return job.pick(logits[0, -1])
        from sparsellm.runtime.speculative import Lane

        job.lane = Lane(self.rt, self.drafts[job.slot], job.max_tokens, job.slot,
                        job.temperature, job.top_p, job.seed, self.stop_ids,
                        sparse=self.sparse)  # fmt: skip
        return job.lane.start(ids)

    def _step(self) -> None:
        """One decode step over every running request, each at its own position."""
        for job in [j for j in self.running if j.cancelled]:
            job.deliver(Finish("cancelled", job.made))
            self.running.remove(job)
        if not self.running:
            return
        rows = list(self.running)
        self.peak_batch = max(self.peak_batch, len(rows))
        self.on_batch(len(rows))
        if self.draft is not None:
            self._verify(rows)
            return
        at = torch.tensor([j.pos for j in rows], dtype=torch.int64)
        if self.rt.fusable():
            tokens = torch.tensor([j.last for j in rows], dtype=torch.int64)
            seq = torch.tensor([j.slot for j in rows], dtype=torch.int64)
            logits = self.rt.step(tokens, seq, at, at, self.sparse)
        else:  # no native Decoder: the Python blocks, one row at a time
            logits = torch.cat(
                [
                    self.rt.forward(torch.tensor([[j.last]]), j.pos, self.sparse, seq=j.slot)[0]
                    for j in rows
                ]
            )
        for r, job in enumerate(rows):
            job.pos += 1
            assert job.pick is not None
            if self._emit(job, job.pick(logits[r])):
                self.running.remove(job)

    def _emit(self, job: Job, token: int) -> bool:
        """Deliver one sampled token; True when it ended the request."""
        job.made += 1
        job.last = token
        if token in self.stop_ids:
            job.deliver(Finish("stop", job.made))
            return True
        job.deliver(token)
        if job.made >= job.max_tokens:
            job.deliver(Finish("length", job.made))
            return True
        return False

    def _verify(self, jobs: list[Job]) -> None:
        """One speculative pass for every running request: each lane's draft proposes
        (model drafts in steps taken together, a row per request), one step checks every
        lane's rows (a chain row sees its own sequence's slots up
        to its own; a tree row the ones its lane marks), each lane keeps what it accepts.
        The lanes share one pass's worth of draft rows (16 in all, at least one each):
        every extra row costs compute, and a batch is already past the memory-bound
        regime where a row comes almost free."""
        from sparsellm.runtime.speculative import MAX_ROWS, plan_lanes

        share = max(1, MAX_ROWS // len(jobs) - 1)
        passes = plan_lanes([j.lane for j in jobs], share)
        sizes = [len(p.tokens) for p in passes]
        tokens = torch.tensor([t for p in passes for t in p.tokens], dtype=torch.int64)
        seq = torch.cat(
            [torch.full((n,), p.seq, dtype=torch.int64) for p, n in zip(passes, sizes, strict=True)]
        )
        at = torch.cat([p.at for p in passes])
        rope = torch.cat([p.rope for p in passes])
        visible = None
        if any(p.visible is not None for p in passes):
            visible = torch.zeros(len(tokens), int(at.max()) + 1, dtype=torch.bool)
            r = 0
            for p, n in zip(passes, sizes, strict=True):
                if p.visible is None:
                    for i in range(n):
                        visible[r + i, : int(p.at[i]) + 1] = True
                else:
                    visible[r : r + n, : p.visible.shape[1]] = p.visible
                r += n
        logits = self.rt.step(tokens, seq, at, rope, self.sparse, visible)
        r = 0
        for job, n in zip(jobs, sizes, strict=True):
            for token in job.lane.settle(logits[r : r + n]):
                if self._emit(job, token):
                    self.running.remove(job)
                    break
            r += n


# --- requests and errors -------------------------------------------------------------


class _Body(BaseModel):
    """Fields both endpoints share; unknown fields are ignored, as clients send many."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class APIError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's first complaint as one OpenAI-style 400 (FastAPI would send a 422)."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param)


# --- the app -------------------------------------------------------------------------


@dataclass
class Metrics:
    """Prometheus series of one app, in its own registry (two apps in one process, as in
    tests, must not collide in the global one)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "sparsellm_requests", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("sparsellm_prompt_tokens", "prompt tokens", registry=r)
        self.completion_tokens = Counter(
            "sparsellm_completion_tokens", "sampled tokens", registry=r
        )
        self.cancelled = Counter(
            "sparsellm_cancelled_requests", "generations cut short by the client", registry=r
        )
        self.latency = Histogram(
            "sparsellm_request_latency_seconds",
            "time from request to its last token",
            ["endpoint"],
            registry=r,
        )
        self.ttft = Histogram(
            "sparsellm_time_to_first_token_seconds",
            "time from request to its first token",
            ["endpoint"],
            registry=r,
        )
        self.batch = Histogram(
            "sparsellm_decode_batch_size",
            "requests per decode step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.running = Gauge("sparsellm_running_requests", "requests holding a slot", registry=r)
        self.waiting = Gauge("sparsellm_waiting_requests", "requests waiting", registry=r)


class _CountRequests:
    """Counts requests by endpoint and status. Plain ASGI rather than
    ``@app.middleware``: Starlette's BaseHTTPMiddleware re-wraps every chunk of a
    streamed response, which costs time per token and delays disconnects."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the outermost error handler answers if the app raises

        async def watch(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent now: not an unfinished multi-byte character (the
    decoder shows it as U+FFFD) and not a tail that may grow into a stop string."""
    end = len(text.rstrip("\ufffd"))
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                hold = max(hold, k)
                break
    return end - hold


def create_app(
    rt: Any,
    tokenizer: Any,
    model_name: str,
    *,
    sampler: SamplerFactory,
    stop_ids: frozenset[int],
    max_batch: int = 8,
    sparse: bool = True,
    draft: Any = None,
    context: int | None = None,
) -> FastAPI:
    """The server over `rt` (a `DecodeRuntime`), serving `model_name`.

    `sampler` and `stop_ids` come from the caller (the CLI passes `generate`'s), so the
    server samples exactly as `sparsellm generate` does. With a speculative `draft`
    (`sparsellm.runtime.speculative.build_draft`), running requests decode as lanes
    verified together. `context` is the most tokens a request may span (default
    `rt.max_len`; a speculative server keeps room for a verification pass's draft rows
    beyond it). The scheduler
    thread starts and stops with the app's lifespan; it is ``app.state.scheduler``.
    """
    metrics = Metrics()
    sched = Scheduler(
        rt,
        sampler,
        stop_ids,
        max_batch=max_batch,
        sparse=sparse,
        draft=draft,
        on_batch=metrics.batch.observe,
    )
    metrics.running.set_function(lambda: len(sched.running))
    metrics.waiting.set_function(sched.queued)
    max_len = int(rt.max_len if context is None else min(context, rt.max_len))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sched.start()
        try:
            yield
        finally:
            sched.stop()

    app = FastAPI(title="sparsellm", lifespan=lifespan)
    app.state.scheduler = sched
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return APIError(500, f"internal error: {exc}", kind="server_error").response()

    app.add_middleware(_CountRequests, metrics=metrics)

    def _check(body: _Body, prompt_len: int, max_tokens: int | None) -> tuple[int, list[str]]:
        """Refuse what the server cannot serve; the new-token budget and stop strings."""
        if body.model != model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        room = max_len - prompt_len
        if room < 1 or (max_tokens is not None and max_tokens > room):
            want = prompt_len + (max_tokens or 1)
            raise APIError(
                400,
                f"this model's context window is {max_len} tokens; the request needs "
                f"{want} ({prompt_len} in the prompt)",
                param="messages" if isinstance(body, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: up to 4 non-empty strings", param="stop")
        return (max_tokens if max_tokens is not None else room), stops

    async def _tokens(
        endpoint: str, ids: list[int], body: _Body, budget: int, stops: list[str]
    ) -> AsyncIterator[tuple[str, Finish | None]]:
        """Text deltas of one generation, then ("", Finish); cancels it when abandoned."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[int | Finish | BaseException] = asyncio.Queue()
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        job = Job(
            ids,
            budget,
            body.temperature,
            body.top_p,
            seed,
            deliver=lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item),
        )
        t0 = time.perf_counter()
        sched.submit(job)
        out: list[int] = []
        sent, finish = 0, None
        try:
            while finish is None:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    raise APIError(500, f"generation failed: {item}", kind="server_error")
                if isinstance(item, Finish):
                    finish = item
                else:
                    if not out:
                        metrics.ttft.labels(endpoint).observe(time.perf_counter() - t0)
                    out.append(item)
                text = tokenizer.decode(out, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:  # a stop string: the text ends before it
                    text, finish = text[:cut], Finish("stop", len(out))
                end = len(text) if finish is not None else _safe_end(text, stops)
                if end > sent:
                    yield text[sent:end], None
                    sent = end
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            metrics.prompt_tokens.inc(len(ids))
            metrics.completion_tokens.inc(finish.tokens)
            yield "", finish
        finally:
            job.cancelled = True  # frees the slot after a stop string; no-op once retired
            if finish is None:
                metrics.cancelled.inc()

    async def _respond(
        request: Request,
        stream: bool,
        gen: AsyncIterator[tuple[str, Finish | None]],
        chunk: Callable[[str, Finish | None], dict[str, Any]],
        whole: Callable[[str, Finish], dict[str, Any]],
        usage: Callable[[Finish], dict[str, Any]],
        include_usage: bool,
    ) -> Any:
        if stream:

            async def events() -> AsyncIterator[str]:
                try:
                    async for delta, finish in gen:
                        if delta or finish is not None:
                            yield f"data: {json.dumps(chunk(delta, finish))}\n\n"
                        if finish is not None and include_usage:
                            yield f"data: {json.dumps(usage(finish))}\n\n"
                except APIError as exc:
                    yield f"data: {json.dumps(exc.body())}\n\n"
                finally:
                    await gen.aclose()
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        async def collect() -> tuple[str, Finish]:
            parts, end = [], None
            async for delta, finish in gen:
                parts.append(delta)
                end = finish or end
            assert end is not None
            return "".join(parts), end

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():  # a client that hangs up cancels its generation
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)
            text, finish = task.result()
        finally:
            await gen.aclose()
        return whole(text, finish)

    def _usage(prompt: int, finish: Finish) -> dict[str, int]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": finish.tokens,
            "total_tokens": prompt + finish.tokens,
        }

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (n=1 only)", param="prompt")
            prompt = prompt[0]
        ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "prompt: empty", param="prompt")
        if not isinstance(prompt, str) and not all(0 <= i < len(tokenizer) for i in ids):
            raise APIError(400, "prompt: token ids outside the vocabulary", param="prompt")
        budget, stops = _check(body, len(ids), body.max_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}

        def chunk(delta: str, finish: Finish | None) -> dict[str, Any]:
            reason = None if finish is None else finish.reason
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [choice]}

        def whole(text: str, finish: Finish) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish.reason}
            return {**head, "choices": [choice], "usage": _usage(len(ids), finish)}

        gen = _tokens("/v1/completions", ids, body, budget, stops)
        return await _respond(
            request,
            body.stream,
            gen,
            chunk,
            whole,
            lambda f: {**head, "choices": [], "usage": _usage(len(ids), f)},
            bool((body.stream_options or {}).get("include_usage")),
        )

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest) -> Any:
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        if getattr(tokenizer, "chat_template", None) is None:
            msg = "this model has no chat template: use /v1/completions"
            raise APIError(400, msg, param="messages")
        try:
            enc = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt"
            )
        except Exception as exc:  # no template, or one that rejects these messages
            raise APIError(400, f"messages: {exc}", param="messages") from exc
        ids = (enc if isinstance(enc, torch.Tensor) else enc["input_ids"])[0].tolist()
        budget, stops = _check(body, len(ids), body.max_completion_tokens or body.max_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created}
        head["model"] = model_name
        first = True

        def chunk(delta: str, finish: Finish | None) -> dict[str, Any]:
            nonlocal first
            msg: dict[str, Any] = {"content": delta} if delta else {}
            if first:  # OpenAI's first delta names the role
                msg, first = {"role": "assistant", **msg}, False
            reason = None if finish is None else finish.reason
            choice = {"index": 0, "delta": msg, "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [choice]}

        def whole(text: str, finish: Finish) -> dict[str, Any]:
            msg = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": msg, "logprobs": None, "finish_reason": finish.reason}
            out = {**head, "object": "chat.completion", "choices": [choice]}
            return {**out, "usage": _usage(len(ids), finish)}

        gen = _tokens("/v1/chat/completions", ids, body, budget, stops)
        return await _respond(
            request,
            body.stream,
            gen,
            chunk,
            whole,
            lambda f: {**head, "choices": [], "usage": _usage(len(ids), f)},
            bool((body.stream_options or {}).get("include_usage")),
        )

    def _card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "sparsellm"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return _card()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "running": len(sched.running),
            "waiting": sched.queued(),
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, str) or content is None:
        return content or ""
    parts = [p.get("text", "") for p in content if p.get("type") == "text"]
    if len(parts) != len(content):
        raise APIError(400, "messages: only text content is supported", param="messages")
    return "".join(parts)
