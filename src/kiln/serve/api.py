"""`kiln serve`: an OpenAI-compatible HTTP API (FastAPI on uvicorn) over the continuous-batching
engine: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (streaming as server-sent
events, `usage` counts), `/health` and Prometheus `/metrics`.

Every limit is checked before work starts and every violation gets OpenAI's JSON error shape
(`{"error": {"message", "type", "param", "code"}}`) with 400/401/404/408/413/429, never a crash:
body size, JSON nesting depth, unknown fields and wrong types, prompt tokens, `max_tokens`,
`n × max_tokens`, the queue, requests in flight per API key. Off loopback an API key is
required (compared in constant time). A request's head and body must arrive within
`serve.read_timeout_s`, so idle and trickling connections cannot pile up. A client that leaves
mid-request frees its rows of the batch at the next step. The requested model name is only
ever compared with the served one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from kiln.config import Config, ServeConfig
from kiln.data.chat import check_messages
from kiln.errors import KilnError
from kiln.infer.engine import SamplingParams, Sequence
from kiln.infer.generate import Engine
from kiln.serve import bind, resolve_api_key
from kiln.serve.scheduler import QueueFull, Scheduler
from kiln.train.parallel import use_compile

MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 200
MAX_LOGPROBS = 20  # top_logprobs per token (OpenAI's chat limit; its completions take 5)


# ---- errors ----------------------------------------------------------------------------------
class ApiError(Exception):
    """An OpenAI-style error response."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        # After a refused body the rest of it may still be on the way: close rather than read it.
        headers = {"connection": "close"} if self.status in (408, 413) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---- request schemas (the OpenAI API's, strict: unknown fields and wrong types are refused) --
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # harmless: kiln's chunks carry no obfuscation padding


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # OpenAI fields that change nothing for a local model: accepted and ignored
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # accepted at their neutral values only
    presence_penalty: float | None = Field(None, ge=0, le=0)
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    # extensions (as other OpenAI-compatible servers spell them)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    best_of: Literal[1] | None = None
    suffix: None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: None = None
    tool_choice: None = None
    parallel_tool_calls: bool | None = None  # harmless: no tools are ever called
    modalities: list[Literal["text"]] | None = None
    response_format: dict[str, Literal["text"]] | None = None


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS)))
    if err["type"] == "extra_forbidden":
        return f"unknown field '{loc}'; see the OpenAI API reference for the fields this endpoint takes", loc
    if err["type"] in ("less_than_equal", "greater_than_equal") and err.get("ctx", {}).get("le") == 0:
        return f"'{loc}' is not supported by this server; leave it out", loc
    if err["type"] in ("literal_error", "none_required", "too_long") and loc.split(".")[0] in _NEUTRAL_ONLY:
        return f"'{loc}' is not supported by this server; leave it out", loc
    return f"'{loc}': {err['msg']}", loc


_UNION_TAGS = {"str", "int", "list", "float", "bool", "dict"}
_NEUTRAL_ONLY = {"best_of", "suffix", "top_logprobs", "tools", "tool_choice", "logit_bias",
                 "response_format", "modalities"}


# ---- request body ----------------------------------------------------------------------------
def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
        else:
            deepest = max(deepest, d)
            continue
        deepest = max(deepest, d + 1)
    return deepest


async def read_json(request: Request, sv: ServeConfig) -> dict:
    """The request's JSON object, read within the body size and time limits."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > sv.max_body_bytes):
        raise ApiError(413, f"the request body is larger than this server's limit of {sv.max_body_bytes} bytes "
                            "(serve.max_body_bytes)", code="request_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(sv.read_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > sv.max_body_bytes:
                    raise ApiError(413, f"the request body is larger than this server's limit of "
                                        f"{sv.max_body_bytes} bytes (serve.max_body_bytes)", code="request_too_large")
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body", code="client_disconnected") from None
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {sv.read_timeout_s:g} s "
                            "(serve.read_timeout_s)", code="request_timeout") from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        detail = str(e).splitlines()[0][:200] if isinstance(e, ValueError) else "nested too deeply"
        raise ApiError(400, f"the request body is not valid JSON ({detail}); send one JSON object",
                       code="invalid_json") from None
    if json_depth(data) > sv.max_json_depth:
        raise ApiError(400, f"the request body nests deeper than {sv.max_json_depth} levels (serve.max_json_depth)",
                       code="invalid_json")
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


# ---- the app ---------------------------------------------------------------------------------
class ServeState:
    """What the handlers share: the engine, its scheduler, the limits, and the HTTP counters."""

    def __init__(self, engine: Engine | Callable[[], Engine], sv: ServeConfig, model_name: str, api_key: str) -> None:
        self.sv, self.model_name, self.api_key = sv, model_name, api_key
        self._engine = engine  # or the function that loads it, on the scheduler's thread (`start`)
        self.created = int(time.time())
        self.scheduler: Scheduler | None = None
        self.in_flight: dict[str, int] = {}  # requests in flight per API key (or client address)
        self.requests: dict[int, int] = {}  # responses by status code
        self.active_requests = 0

    def start(self) -> None:
        """Start the scheduler; given a loader, the model is loaded on the scheduler's thread."""
        self.scheduler = Scheduler(self._engine, self.sv.max_batch, self.sv.max_queue,
                                   compile=lambda engine: use_compile(self.sv.compile, engine.device),
                                   prefix_cache_mb=self.sv.prefix_cache_mb)
        self.engine = self.scheduler.engine
        self.context = self.engine.context
        self.max_prompt = min(self.sv.max_prompt_tokens or self.context - 1, self.context - 1)

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()

    def identity(self, request: Request) -> str:
        """Who is asking: the checked API key, or (no key configured) the client's address."""
        if not self.api_key:
            return "addr:" + (request.client.host if request.client else "?")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        return "key"

    @contextlib.contextmanager
    def slot(self, who: str):
        """Count a request in flight for `who`, refusing one past `serve.max_streams_per_key`."""
        if self.in_flight.get(who, 0) >= self.sv.max_streams_per_key:
            raise ApiError(429, f"too many requests in flight for this key ({self.sv.max_streams_per_key} allowed, "
                                "serve.max_streams_per_key); wait for one to finish", code="rate_limit_exceeded")
        self.in_flight[who] = self.in_flight.get(who, 0) + 1
        self.active_requests += 1
        try:
            yield
        finally:
            self.active_requests -= 1
            self.in_flight[who] -= 1
            if not self.in_flight[who]:
                del self.in_flight[who]

    def metrics_text(self) -> str:
        lines = self.scheduler.metrics() if self.scheduler else []
        lines += ["# HELP kiln_http_requests_in_flight HTTP generation requests being served.",
                  "# TYPE kiln_http_requests_in_flight gauge", f"kiln_http_requests_in_flight {self.active_requests}",
                  "# HELP kiln_http_responses_total HTTP responses, by status code.",
                  "# TYPE kiln_http_responses_total counter"]
        lines += [f'kiln_http_responses_total{{code="{c}"}} {n}' for c, n in sorted(self.requests.items())]
        return "\n".join(lines) + "\n"


def _usage(prompt_tokens: int, seqs: list[Sequence]) -> dict:
    done = sum(len(s.tokens) for s in seqs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}


class Generation:
    """One request's sequences, their text arriving from the engine's thread. Events wait in a
    list, and the event loop is woken for them at most once per `serve.stream_interval_ms` (the
    first token and a sequence's end at once): whatever arrived meanwhile goes out in one write.
    The loop shares the cores with decoding, and a wake-up and a socket write per token cost a
    small model's decode a measurable share of its speed (`bench/serve.py`)."""

    def __init__(self, state: ServeState, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._pending: list[tuple[int, str, str | None, str | None]] = []
        self._lock = threading.Lock()
        self._woken = False  # a wake-up is on its way and the loop has not taken the events yet
        self._last_wake = float("-inf")
        self._interval = state.sv.stream_interval_ms / 1000
        self.prompt_tokens = sum(len(p) for p in prompts)
        per_prompt = len(params) // len(prompts)
        self.seqs = [Sequence(prompts[i // per_prompt], p, state.engine.tokenizer, self._listen, tag=i)
                     for i, p in enumerate(params)]

    def _listen(self, seq: Sequence, text: str) -> None:  # on the engine's thread
        now = time.monotonic()
        with self._lock:
            self._pending.append((seq.tag, text, seq.finish_reason, seq.error))
            if self._woken or (seq.finish_reason is None and now - self._last_wake < self._interval):
                return  # on its way, or goes with a later token's wake-up (or the sequence's end)
            self._woken, self._last_wake = True, now
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(self._arrived.set)

    def submit(self) -> None:
        try:
            self.state.scheduler.submit(self.seqs)
        except QueueFull as e:
            raise ApiError(429, f"{e}; retry later", code="rate_limit_exceeded") from None

    def cancel(self) -> None:
        self.state.scheduler.cancel([s for s in self.seqs if s.finish_reason is None])

    async def stream(self) -> AsyncIterator[list[tuple[int, str, str | None]]]:
        """Lists of (choice index, text, finish reason or None), as many as came since the last
        list, until every choice ends."""
        left = len(self.seqs)
        while left:
            await self._arrived.wait()
            self._arrived.clear()
            with self._lock:
                events, self._pending, self._woken = self._pending, [], False
            for _, _, reason, error in events:
                if reason == "error":
                    raise ApiError(500, error or "generation failed", code="server_error")
                left -= reason is not None
            yield [(index, text, reason) for index, text, reason, _ in events]


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """A server-sent-events response that stops the generation the moment the client leaves,
    and always releases what the request holds (`on_close`)."""

    def __init__(self, events: AsyncIterator[str], on_close) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            async for event in self.body_iterator:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(watch())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await self.body_iterator.aclose()
            self.on_close()


class StatusCounter:
    """ASGI middleware counting responses by status code for /metrics."""

    def __init__(self, app, counts: dict[int, int]) -> None:
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.counts[message["status"]] = self.counts.get(message["status"], 0) + 1
            await send(message)

        await self.app(scope, receive, counted)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def build_app(engine: Engine | Callable[[], Engine], sv: ServeConfig, model_name: str, api_key: str = "") -> FastAPI:
    """The FastAPI app; its lifespan starts the engine's scheduler (unless `app.state.kiln.start()`
    already has) and stops it. `engine` may be a function that loads it (`ServeState`)."""
    state = ServeState(engine, sv, model_name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.scheduler is None:
            state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="kiln", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.kiln = state

    app.add_middleware(StatusCounter, counts=state.requests)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug costs one request a 500, never the server
        return ApiError(500, f"internal error ({type(e).__name__}); see the server's log", code="server_error").response()

    @app.exception_handler(404)
    async def not_found(request: Request, e):
        return ApiError(404, f"no route {request.method} {request.url.path[:100]}; see /v1/models, "
                             "/v1/completions, /v1/chat/completions", code="not_found").response()

    @app.exception_handler(405)
    async def wrong_method(request: Request, e):
        return ApiError(405, f"{request.method} is not allowed on {request.url.path[:100]}",
                        code="method_not_allowed").response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        state.identity(request)
        return PlainTextResponse(state.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        state.identity(request)
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        state.identity(request)
        _check_model(state, name)
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, state, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, state, chat=True)

    return app


def _model_card(state: ServeState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "kiln",
            "context_length": state.context}


def _check_model(state: ServeState, name: str) -> None:
    if name != state.model_name:
        shown = name if len(name) <= 100 else name[:100] + "…"
        raise ApiError(404, f"the model '{shown}' does not exist; this server serves '{state.model_name}' "
                            "(see /v1/models)", param="model", code="model_not_found")


def _prompts(state: ServeState, req, chat: bool) -> list[list[int]]:
    """Token ids of each prompt (tokenizing runs off the event loop)."""
    eng = state.engine
    if chat:
        messages = [{"role": m.role,  # `developer` becomes `system` in check_messages
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in req.messages]
        try:  # rendered as the model was trained to read it: kiln's format or its own chat template
            return [eng.chat_format.prompt_ids(check_messages(messages, "messages"))]
        except KilnError as e:
            raise ApiError(400, str(e), param="messages") from None
    prompt = req.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "'prompt' is empty; send text or token ids", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    vocab = eng.tokenizer.get_vocab_size()
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(eng.encode_prompt(p))
        elif not p or any(not 0 <= t < vocab for t in p):
            raise ApiError(400, f"a token-id prompt must be non-empty ids in 0..{vocab - 1}", param="prompt")
        else:
            out.append(list(p))
    return out


def _params(state: ServeState, req, chat: bool, prompts: list[list[int]]) -> list[SamplingParams]:
    """Sampling settings for every choice, after every limit check."""
    sv = state.sv
    n = req.n or 1
    if len(prompts) * n > sv.max_n:
        raise ApiError(400, f"{len(prompts)} prompt(s) × n={n} choices is more than this server's limit of "
                            f"{sv.max_n} (serve.max_n)", param="n")
    longest = max(len(p) for p in prompts)
    if longest > state.max_prompt:
        raise ApiError(400, f"the prompt is {longest} tokens; this server takes at most {state.max_prompt} "
                            f"(the model's context is {state.context} tokens); shorten it",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    asked = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
    if asked is None:  # OpenAI's defaults: 16 for completions, as many as fit for chat
        asked = min(sv.max_new_tokens, state.context - longest) if chat else min(16, sv.max_new_tokens)
    if asked < (0 if not chat and req.echo else 1):  # echo with max_tokens 0 scores the prompt alone
        raise ApiError(400, f"'{param}' = {asked} must be at least 1" + ("" if chat else " (or 0 with 'echo')"),
                       param=param)
    if asked > sv.max_new_tokens:
        raise ApiError(400, f"'{param}' = {asked} is more than this server's limit of {sv.max_new_tokens} "
                            "(serve.max_new_tokens)", param=param)
    if asked * n * len(prompts) > sv.max_total_tokens:
        raise ApiError(400, f"{param} × n × prompts = {asked * n * len(prompts)} tokens is more than this "
                            f"server's limit of {sv.max_total_tokens} per request (serve.max_total_tokens)", param=param)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings of at most "
                            f"{MAX_STOP_CHARS} characters", param="stop")
    temperature = 1.0 if req.temperature is None else req.temperature
    # token healing (serve.heal): text prompts of completions only; token ids, chat and scored
    # (logprobs / echo) prompts are taken as sent
    healed = [sv.heal and not chat and req.logprobs is None and t is not None for t in request_prompts(req, prompts)]
    return [SamplingParams(max_new_tokens=asked, temperature=temperature, top_k=req.top_k or 0,
                           top_p=1.0 if req.top_p is None else req.top_p,
                           repetition_penalty=req.repetition_penalty or 1.0,
                           seed=None if req.seed is None else f"{req.seed}/{i}", stop=tuple(stop),
                           heal=healed[i // n])
            for i in range(n * len(prompts))]


async def _serve(request: Request, state: ServeState, chat: bool):
    who = state.identity(request)
    with contextlib.ExitStack() as hold:
        hold.enter_context(state.slot(who))
        data = await read_json(request, state.sv)
        try:
            req = (ChatRequest if chat else CompletionRequest).model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise ApiError(400, message, param=param) from None
        _check_model(state, req.model)
        top = _logprob_options(req, chat)
        prompts = await asyncio.to_thread(_prompts, state, req, chat)
        params = _params(state, req, chat, prompts)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if params[0].max_new_tokens == 0:  # echo with max_tokens 0: the prompt's log-probabilities only
            gen = Generation(state, prompts, params)
            for s in gen.seqs:
                s.finish_reason = "length"
            return await _respond(state, gen, rid, chat, req, top, request_prompts(req, prompts))
        gen = Generation(state, prompts, params)
        gen.submit()
        hold.callback(gen.cancel)  # whatever happens from here on, nothing keeps generating for nobody
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(_events(state, gen, rid, chat, include_usage), hold.pop_all().close)
        return await _collect(request, state, gen, rid, chat, req, top, request_prompts(req, prompts))


async def _collect(request: Request, state: ServeState, gen: Generation, rid: str, chat: bool, req, top: int | None,
                   texts: list[str | None]) -> dict:
    """The whole response, unless the client leaves first (then the generation stops)."""
    async def run() -> None:
        async for _ in gen.stream():
            pass

    work, leave = asyncio.ensure_future(run()), asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait([work, leave], return_when=asyncio.FIRST_COMPLETED)
    finally:
        leave.cancel()
    if not work.done():
        work.cancel()
        return JSONResponse({}, status_code=499)  # nobody will read it
    work.result()
    return await _respond(state, gen, rid, chat, req, top, texts)


async def _respond(state: ServeState, gen: Generation, rid: str, chat: bool, req, top: int | None,
                   texts: list[str | None]) -> dict:
    created = int(time.time())
    logprobs: list[dict | None] = [None] * len(gen.seqs)
    if top is not None:
        logprobs = await asyncio.to_thread(_logprobs, state, gen, chat, top, bool(not chat and req.echo), texts)
    if chat:
        choices = [{"index": s.tag, "message": {"role": "assistant", "content": s.text},
                    "logprobs": lp, "finish_reason": s.finish_reason} for s, lp in zip(gen.seqs, logprobs)]
    else:
        per_prompt = len(gen.seqs) // len(texts)
        choices = [{"index": s.tag, "text": (_echo_text(state, s, texts[s.tag // per_prompt]) if req.echo else "")
                    + s.text, "logprobs": lp, "finish_reason": s.finish_reason} for s, lp in zip(gen.seqs, logprobs)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": state.model_name, "choices": choices, "usage": _usage(gen.prompt_tokens, gen.seqs)}


async def _events(state: ServeState, gen: Generation, rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": rid, "object": kind, "created": created, "model": state.model_name, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return _sse(body)

    def choice(index: int, text: str | None, reason: str | None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}

    try:
        if chat:
            yield chunk([choice(s.tag, None, None, role=True) for s in gen.seqs])
        async for events in gen.stream():  # what arrived together is written together
            if pieces := "".join(chunk([choice(index, text, reason)]) for index, text, reason in events
                                 if text or reason):
                yield pieces
        if include_usage:
            yield chunk([], _usage(gen.prompt_tokens, gen.seqs))
    except ApiError as e:  # headers are gone: the error travels as an event, as OpenAI's does
        yield _sse(e.body())
    yield "data: [DONE]\n\n"


# ---- log-probabilities ---------------------------------------------------------------------
def _logprob_options(req, chat: bool) -> int | None:
    """How many top alternatives to report per token, or None for no `logprobs` at all."""
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
    else:
        top = req.logprobs
        if req.echo and top is None:
            raise ApiError(400, "'echo' is supported with 'logprobs' (the prompt's log-probabilities); "
                                "send 'logprobs': 0 or more", param="echo")
    if req.stream and top is not None:
        raise ApiError(400, "'logprobs' / 'echo' are not supported with 'stream'; send stream: false",
                       param="logprobs")
    return top


def request_prompts(req, prompts: list[list[int]]) -> list[str | None]:
    """Each prompt as sent when it was text (what `echo` returns), None for token ids."""
    if not isinstance(req, CompletionRequest):
        return [None] * len(prompts)
    sent = [req.prompt] if isinstance(req.prompt, str) or all(isinstance(p, int) for p in req.prompt) else req.prompt
    return [p if isinstance(p, str) else None for p in sent]


def _decode(tokenizer, ids: list[int], special: bool) -> str:
    return tokenizer.decode(ids, skip_special_tokens=not special)


def _echo_text(state: ServeState, seq: Sequence, text: str | None) -> str:
    return text if text is not None else _decode(state.engine.tokenizer, seq.prompt, False)


def _logprobs(state: ServeState, gen: Generation, chat: bool, top: int, echo: bool,
              texts: list[str | None]) -> list[dict]:
    """Each choice's log-probabilities under the model (before temperature, top_p, top_k and
    penalties), from one forward pass over prompt + output: OpenAI's chat shape (`content`, the
    output's tokens) or its legacy completions shape (`tokens`, `token_logprobs`, `top_logprobs`,
    `text_offset`; with `echo` the prompt's tokens first, the very first one without a log-probability)."""
    import torch

    eng = state.engine
    tok, vocab = eng.tokenizer, eng.tokenizer.get_vocab_size()
    per_prompt = len(gen.seqs) // len(texts)
    out = []
    for seq in gen.seqs:
        made = list(seq.tokens)
        if seq.ended_by == "stop":  # a stop string: only the tokens that the returned text came from
            while made and len(_decode(tok, made[:-1], False)) >= len(seq.text):
                made.pop()
        ids = seq.prompt + made
        first = 1 if echo else len(seq.prompt)

        def score(ids=ids, first=first) -> tuple[list[float], list[list[float]], list[list[int]]]:
            with torch.inference_mode():
                logits = eng.model(torch.tensor([ids], device=eng.device))[0, :-1, :vocab].float()
                rows = torch.log_softmax(logits, -1)[first - 1:]
                chosen = rows.gather(-1, torch.tensor(ids[first:], device=rows.device)[:, None])[:, 0].tolist()
                if not top:
                    return chosen, [[]] * len(chosen), [[]] * len(chosen)
                best = rows.topk(top, -1)
                return chosen, best.values.tolist(), best.indices.tolist()

        # on the engine's thread, between steps: one thread pool in the process (kiln.serve.scheduler)
        chosen, best_p, best_i = state.scheduler.call(score).result()
        scored = ids[first:]
        if echo:
            scored, chosen, best_p, best_i = ids, [None, *chosen], [[], *best_p], [[], *best_i]
        pieces = [_decode(tok, [t], True) for t in scored]
        if chat:
            out.append({"content": [{"token": p, "logprob": lp, "bytes": list(p.encode()),
                                     "top_logprobs": [{"token": (q := _decode(tok, [i], True)), "logprob": v,
                                                       "bytes": list(q.encode())} for i, v in zip(bi, bp)]}
                                    for p, lp, bi, bp in zip(pieces, chosen, best_i, best_p)], "refusal": None})
            continue
        offset = 0 if echo else len(_echo_text(state, seq, texts[seq.tag // per_prompt]))
        offsets = []
        for t in scored:
            offsets.append(offset)
            offset += len(_decode(tok, [t], False))
        tops: list[dict | None] = []
        for bi, bp in zip(best_i, best_p):
            alts: dict[str, float] = {}
            for i, v in zip(bi, bp):
                alts.setdefault(_decode(tok, [i], True), v)
            tops.append(alts if bi else None)
        if top == 0:
            tops = [None] * len(tops)
        out.append({"tokens": pieces, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets})
    return out


# ---- the HTTP server -------------------------------------------------------------------------
class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head: a connection that sends
    nothing, or trickles its request line and headers, is closed `head_timeout_s` after it opened
    or after its last response, so idle and slow connections cannot pile up."""

    head_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._expire)

    def _disarm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a whole request head arrived; the app limits the body's time itself

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the signal that stopped it: a graceful stop exits 0."""

    @contextlib.contextmanager
    def capture_signals(self):
        import signal

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        saved = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def listen(host: str, port: int) -> socket.socket:
    sock = bind(host, port, "serve")
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Server:
    """A running API server: `Server(engine, sv, name).start()` serves from a thread (tests,
    benchmarks); `run()` serves in this thread until SIGINT/SIGTERM (`kiln serve`)."""

    def __init__(self, engine: Engine | Callable[[], Engine], sv: ServeConfig, model_name: str,
                 api_key: str | None = None) -> None:
        self.sv = sv
        self.api_key = resolve_api_key(sv) if api_key is None else api_key
        self.app = build_app(engine, sv, model_name, self.api_key)
        self.sock = listen(sv.host, sv.port)
        self.port = self.sock.getsockname()[1]
        protocol = type("GuardedH11", (GuardedH11Protocol,), {"head_timeout_s": sv.read_timeout_s})
        config = uvicorn.Config(self.app, http=protocol, lifespan="on", log_level="warning", access_log=False,
                                limit_concurrency=sv.max_connections, timeout_keep_alive=max(1, int(sv.read_timeout_s)),
                                timeout_graceful_shutdown=sv.shutdown_timeout_s)
        self.server = _Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.sv.host}]" if ":" in self.sv.host else self.sv.host
        return f"http://{host}:{self.port}"

    @property
    def state(self) -> ServeState:
        return self.app.state.kiln

    def run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 60.0) -> Server:
        self._thread = threading.Thread(target=self.run, name="kiln-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise KilnError("the API server did not start; see the log above")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.sv.shutdown_timeout_s + 10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_serve(cfg: Config) -> None:
    sv = cfg.serve
    key = resolve_api_key(sv)  # before loading anything: a refused exposure costs nothing
    name = sv.model_name or Path(cfg.out).resolve().name
    # The model is loaded on the engine's own thread, the one that steps it (kiln.serve.scheduler:
    # one OpenMP pool in the process); started here, so a load that fails is one line, not a traceback.
    def load() -> Engine:
        engine = Engine.from_run(cfg.out, cfg.device, sv.dtype)
        if sv.draft:
            engine.add_draft(sv.draft, sv.draft_tokens)
        return engine

    server = Server(load, sv, name, key)
    server.state.start()
    engine = server.state.engine
    draft = f", drafts by {sv.draft} ({sv.draft_tokens} a round)" if engine.draft is not None else ""
    print(f"kiln serve: model '{name}' on {server.url}/v1 ({engine.device}, batch of {sv.max_batch}{draft}, "
          f"{'API key required' if key else 'no API key'}); Ctrl-C stops", flush=True)
    server.run()
    print("kiln serve: stopped", flush=True)
