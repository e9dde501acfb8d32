"""`peftkit serve`: an OpenAI-compatible HTTP API over one base model and its adapters.

The request's `model` picks the adapter (its name) or the base model (its served name), as in
vLLM's multi-LoRA serving. Adapters are loaded at start-up from one configured directory only; a
client can name an adapter but never a path. Unknown names get a 404, an oversized body a 413, a
full queue a 503 with Retry-After, and invalid fields a 400 naming the field. Every check runs, and
every prompt of a request is admitted to the queue, before any of it generates; a client that
disconnects has its rows cancelled (dropped from the queue, or stopped at the next token).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from peftkit.adapters.adapter_set import BASE, AdapterSet
from peftkit.adapters.generation import Completion, SamplingOptions
from peftkit.data.tool_calls import has_reasoning
from peftkit.serving import protocol as p
from peftkit.serving.engine import Engine, EngineBusy, EngineClosed, RequestTooLarge
from peftkit.serving.engine import Request as EngineRequest
from peftkit.serving.security import SecurityMiddleware, ServeSecurity, docs_routes, encode_chat
from peftkit.serving.tools import ToolPlan, plan_tools


class ServeLimits(BaseModel):
    """How much `peftkit serve` accepts (the CLI's serve flags are these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_queue: int = Field(default=64, gt=0)
    """Requests waiting beyond the running batch; more get 503 'server busy'."""
    max_batch: int = Field(default=16, gt=0)
    """Rows generated together in one batch."""
    batch_wait_s: float = Field(default=0.02, ge=0)
    """How long the first request of a batch waits for others to join it."""
    max_body_bytes: int = Field(default=1_000_000, gt=0)
    max_prompt_tokens: int = Field(default=4096, gt=0)
    max_new_tokens: int = Field(default=1024, gt=0)
    """Largest max_tokens a request may ask for."""
    default_max_tokens: int = Field(default=256, gt=0)
    """max_tokens of a request that gives none."""


def create_app(
    adapters: AdapterSet,
    limits: ServeLimits,
    base_name: str,
    security: ServeSecurity | None = None,
) -> FastAPI:
    """The FastAPI app; the engine starts with it and, on shutdown, finishes queued requests.
    `security` (serving/security.py) guards every route; default: no key, no Host check."""
    security = security or ServeSecurity()
    engine = Engine(adapters, limits.max_queue, limits.max_batch, limits.batch_wait_s)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="peftkit serve", lifespan=lifespan, **docs_routes(security))
    app.add_middleware(SecurityMiddleware, security=security)
    app.state.engine = engine

    @app.exception_handler(p.ApiError)
    async def _api_error(request: Request, error: p.ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    def resolve(model: str) -> str | None:
        if model in (base_name, BASE):
            return None
        if model in adapters.adapters:
            return model
        raise p.ApiError(
            404,
            f"The model `{model}` does not exist. Served: {', '.join([base_name, *adapters.names])}",
            "NotFoundError",
            "model_not_found",
        )

    def options(req: p.GenerationRequest, prompt_tokens: int) -> SamplingOptions:
        if prompt_tokens > limits.max_prompt_tokens:
            raise p.ApiError(
                400,
                f"the prompt has {prompt_tokens} tokens; this server accepts at most "
                f"{limits.max_prompt_tokens}",
                "invalid_request_error",
                "context_length_exceeded",
            )
        wanted = req.token_limit or limits.default_max_tokens
        if wanted > limits.max_new_tokens:
            raise p.ApiError(
                400,
                f"max_tokens {wanted} is above this server's limit of {limits.max_new_tokens}",
                "invalid_request_error",
            )
        return SamplingOptions(
            max_new_tokens=wanted, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "waiting": engine.waiting, "stats": vars(engine.stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        def card(name: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "peftkit",
                "root": base_name,
                "parent": parent,
                # what a chat request without a system turn gets (peftkit's own field)
                "default_system_prompt": adapters.system_prompt(name if parent else None),
            }

        return {
            "object": "list",
            "data": [card(base_name, None)] + [card(n, base_name) for n in adapters.names],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse(p.ChatRequest, await _read_json(request, limits.max_body_bytes))
        adapter = resolve(req.model)
        try:
            messages = (
                adapters.with_system(req.chat(), adapter) if req.default_system else req.chat()
            )
            tools = req.active_tools
            mode = security.special_tokens_in_content
            ids = _nonempty(encode_chat(adapters, messages, adapter, mode, tools), "messages")
            template = adapters.chat_template(adapter)
            rendered = (
                adapters.render(messages, adapter, tools)
                if tools or has_reasoning(template)
                else ""
            )
            plan, prefill = plan_tools(req, template, rendered, adapters.tokenizer)
        except ValueError as e:  # a client error (an image part, ...), not a server one
            raise p.ApiError(400, str(e), "invalid_request_error") from None
        except TemplateError as e:  # the template refuses the messages (roles, tool turns)
            raise p.ApiError(
                400,
                f"messages: the chat template of `{req.model}` cannot render them: {e}",
                "invalid_request_error",
            ) from None
        ids += prefill
        opts = options(req, len(ids))
        rid = p.new_id("chatcmpl")
        # submitted before the response starts, so a full queue is still a 503
        pending = _submit(engine, [ids], adapter, opts, req.stream, req.seed)
        if req.stream:
            return _sse(_stream_chat(pending.events[0], rid, req, plan), pending)
        (completion,) = await _results(pending, request)
        return p.chat_response(rid, req.model, completion, plan.reply(completion.text))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(p.CompletionRequest, await _read_json(request, limits.max_body_bytes))
        adapter = resolve(req.model)
        try:
            encoded = [_nonempty(adapters.encode(t, adapter), "prompt") for t in req.prompts()]
        except ValueError as e:
            raise p.ApiError(400, str(e), "invalid_request_error") from None
        opts = options(req, max(len(ids) for ids in encoded))
        rid = p.new_id("cmpl")
        if req.stream and len(encoded) != 1:
            raise p.ApiError(
                400, "stream: only one prompt per streamed request", "invalid_request_error"
            )
        pending = _submit(engine, encoded, adapter, opts, req.stream, req.seed)
        if req.stream:
            return _sse(_stream_completion(pending.events[0], rid, req), pending)
        return p.completion_response(rid, req.model, await _results(pending, request))

    return app


def _nonempty(ids: list[int], field: str) -> list[int]:
    """A prompt with no tokens has nothing to continue from (and would poison a batch)."""
    if not ids:
        raise ValueError(f"{field}: the prompt is empty")
    return ids


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise p.ApiError(413, f"request body over {limit} bytes", "invalid_request_error")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise p.ApiError(413, f"request body over {limit} bytes", "invalid_request_error")
    try:
        return json.loads(body)
    except ValueError:
        raise p.ApiError(
            400, "the request body is not valid JSON", "invalid_request_error"
        ) from None


def _parse(model: type[BaseModel], body: Any):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise p.ApiError(400, problems, "invalid_request_error") from None


@dataclass
class _Pending:
    """The engine requests of one HTTP request (one per prompt) and their event queues."""

    requests: list[EngineRequest]
    events: list[asyncio.Queue]

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()


def _submit(
    engine: Engine,
    prompts: list[list[int]],
    adapter: str | None,
    opts: SamplingOptions,
    stream: bool,
    seed: int | None = None,
) -> _Pending:
    """Queue every prompt of a request, or none (then raise the 503 or 400)."""
    loop = asyncio.get_running_loop()
    pending = _Pending([], [])
    for ids in prompts:
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, value: Any, events: asyncio.Queue = events) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        pending.requests.append(EngineRequest(ids, adapter, opts, emit, stream, seed))
        pending.events.append(events)
    try:
        engine.submit(*pending.requests)
    except (EngineBusy, EngineClosed) as e:
        raise p.ApiError(503, str(e), "server_busy", "server_busy") from None
    except RequestTooLarge as e:
        raise p.ApiError(400, str(e), "invalid_request_error") from None
    return pending


async def _results(pending: _Pending, request: Request) -> list[Completion]:
    """Every prompt's completion, in order; cancels them all if the client disconnects first."""

    async def first(events: asyncio.Queue) -> Completion:
        kind, value = await events.get()
        if kind == "error":
            raise p.ApiError(500, value, "internal_error")
        return value

    answers = asyncio.ensure_future(asyncio.gather(*(first(e) for e in pending.events)))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answers, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answers.done():  # the client went away (or the handler was cancelled)
            pending.cancel()
            answers.cancel()
    if answers.cancelled():
        raise p.ApiError(499, "the client closed the connection", "client_closed_request")
    return answers.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(events: asyncio.Queue) -> AsyncIterator[tuple[str, Any]]:
    while True:
        kind, value = await events.get()
        yield kind, value
        if kind in ("done", "error"):
            return


async def _stream_chat(
    events: asyncio.Queue, rid: str, req: p.ChatRequest, plan: ToolPlan
) -> AsyncIterator[dict[str, Any]]:
    """Content and reasoning deltas as they are generated; a call (held back from its opener
    on) as `tool_calls` deltas once the answer is complete, one per call."""
    yield p.chat_chunk(rid, req.model, {"role": "assistant", "content": ""})
    stream = plan.stream()
    async for kind, value in _events(events):
        if kind == "text":
            for delta in stream.feed(value):
                yield p.chat_chunk(rid, req.model, delta)
        elif kind == "error":
            yield {"error": {"message": value, "type": "internal_error"}}
        else:
            deltas = stream.finish()
            calls = [c for d in deltas for c in d.get("tool_calls", [])]
            try:
                kept = {c["index"] for c in plan.allowed(calls)}
            except p.ApiError as e:
                yield e.body()
                return
            for delta in deltas:
                if "tool_calls" not in delta or delta["tool_calls"][0]["index"] in kept:
                    yield p.chat_chunk(rid, req.model, delta)
            finish = "tool_calls" if kept else value.finish_reason
            yield p.chat_chunk(rid, req.model, {}, finish)
            if req.include_usage:
                yield p.usage_chunk(rid, req.model, "chat.completion.chunk", value)


async def _stream_completion(
    events: asyncio.Queue, rid: str, req: p.CompletionRequest
) -> AsyncIterator[dict[str, Any]]:
    async for kind, value in _events(events):
        if kind == "text":
            yield p.completion_chunk(rid, req.model, value)
        elif kind == "error":
            yield {"error": {"message": value, "type": "internal_error"}}
        else:
            yield p.completion_chunk(rid, req.model, "", value.finish_reason)
            if req.include_usage:
                yield p.usage_chunk(rid, req.model, "text_completion", value)


def _sse(chunks: AsyncIterator[dict[str, Any]], pending: _Pending) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`. A client that goes away
    mid-stream (the response is cancelled) has its rows cancelled."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            pending.cancel()  # a no-op once the rows are done

    return StreamingResponse(body(), media_type="text/event-stream")
