"""The OpenAI-compatible HTTP server: FastAPI routes, errors in the OpenAI format.

    POST /v1/completions, /v1/chat/completions   (stream: SSE `data: {...}` ... `data: [DONE]`)
    GET  /v1/models, /health (JSON state), /metrics

Knows only the EngineClient interface (server/engine_client.py). Error statuses: 400
invalid parameters / prompt over the context / more choices (prompts x n) than
max_choices_per_request (request-validation errors too: 422 in plain FastAPI), 401 a
missing or wrong API key, 404 an unknown model, 405 a wrong method (with Allow), 413 a body
over max_body_bytes, 429 more choices in flight than max_num_seqs + max_queue, 500 the
engine failed while running the request, 503 (with Retry-After) the engine restarting or
the server shutting down.
"""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightspeed.errors import LightspeedError
from lightspeed.server import serving
from lightspeed.server.engine_client import EngineClient, EngineUnavailableError, RequestFailedError
from lightspeed.server.middleware import BodyLimitMiddleware
from lightspeed.server.openapi import document_errors
from lightspeed.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                        CompletionResponse, ModelCard, ModelList, error_body)
from lightspeed.server.structured import compile_constraints


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


@dataclass
class ServerState:
    engine: EngineClient
    model_name: str
    api_key: str | None = None
    max_queue: int | None = None  # choices waiting beyond max_num_seqs; None: no limit
    max_choices_per_request: int = 64  # prompts x n of one request
    num_in_flight: int = 0  # choices (engine requests) admitted and not yet finished; see admit / Job.release
    token_text: serving.TokenText | None = None
    is_draining: bool = False  # shutting down: no new requests

    @property
    def info(self):
        return self.engine.info

    @property
    def tokenizer(self):
        return self.engine.info.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.info.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}", "model")

    def admit(self, num: int) -> None:
        """Count `num` choices in, or refuse; check and count with no await between (atomic)."""
        if self.is_draining:
            raise EngineUnavailableError("the server is shutting down; retry on another replica", 30)
        self.engine.check_available()
        if num > self.max_choices_per_request:
            raise APIError(400, f"this request asks for {num} choices (prompts x n), more than the server's limit of "
                                f"{self.max_choices_per_request} per request; send fewer prompts or a smaller n", "n")
        if self.max_queue is not None:
            limit = self.info.max_num_seqs + self.max_queue
            if self.num_in_flight + num > limit:
                raise APIError(429, f"the server is at its queue limit ({self.num_in_flight} of {limit} choices in "
                                    "flight); retry later", headers={"Retry-After": "1"})
        self.num_in_flight += num

    def start_drain(self, timeout_s: float) -> None:
        """Shutting down: refuse new requests; end those still running after timeout_s."""
        self.is_draining = True
        error = EngineUnavailableError(f"the server shut down before this request finished ({timeout_s:g} s allowed)")
        asyncio.get_running_loop().call_later(timeout_s, self.engine.fail_all, error)


def build_app(engine: EngineClient, model_name: str, api_key: str | None = None, max_queue: int | None = None,
              max_body_bytes: int = 16 << 20, max_choices_per_request: int = 64, protect_metrics: bool = False):
    state = ServerState(engine, model_name, api_key, max_queue, max_choices_per_request)
    state.token_text = serving.TokenText(engine.info.tokenizer)

    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="lightspeed", lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else e.headers
        return error_response(e.status, e.message, e.param, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errs = e.errors()
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}" for err in errs]
        loc = errs[0].get("loc", ()) if errs else ()
        param = str(loc[1]) if len(loc) > 1 else None  # the top-level field
        return error_response(400, "invalid request: " + "; ".join(parts), param or None)

    @app.exception_handler(EngineUnavailableError)
    async def _unavailable(request, e: EngineUnavailableError):
        return error_response(503, str(e), headers={"Retry-After": str(e.retry_after_s)})

    @app.exception_handler(RequestFailedError)
    async def _failed(request, e):
        return error_response(500, str(e))

    @app.exception_handler(LightspeedError)
    async def _lightspeed_error(request, e):
        return error_response(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error_response(500, f"internal error: {e!r}")

    async def check_api_key(request: Request) -> None:  # NOTE: async: FastAPI runs a plain def in a thread
        if state.api_key:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health():
        """The engine's state as JSON: 200 when serving, 503 (with Retry-After) otherwise."""
        body = engine.health()
        if state.is_draining:
            body["status"] = "draining"
        if body["status"] == "ok":
            return body
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics", dependencies=[Depends(check_api_key)] if protect_metrics else [])
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        registry = engine.metrics.registry if engine.metrics is not None else None
        return Response(generate_latest(registry) if registry is not None else b"", media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=model_name, max_model_len=state.max_model_len,
                                        vocab_size=state.info.vocab_size)]).model_dump()

    @v1.post("/completions", responses={200: {"model": CompletionResponse}})
    async def completions(body: CompletionRequest, request: Request):
        state.check_model(body.model)
        return await _respond(state, request, await _prepare(state, body, serving.completion_job))

    @v1.post("/chat/completions", responses={200: {"model": ChatCompletionResponse}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state.check_model(body.model)
        return await _respond(state, request, await _prepare(state, body, serving.chat_job))

    app.include_router(v1)
    document_errors(app)
    return BodyLimitMiddleware(app, max_body_bytes) if max_body_bytes else app


# NOTE: a prompt this short tokenizes in tens of microseconds, less than a hop to a worker
# thread costs the event loop, which bounds the server when hundreds of requests arrive at once
# (H200, c=512: 98% busy); with the async API-key check, 447 -> 525 requests/s on a 2-core CPU
# (bench/results/http-request-rate-cpu.json)
INLINE_TOKENIZE_CHARS = 4096


async def _prepare(state: ServerState, body, build) -> serving.Job:
    """Admit the request's choices, then tokenize (in a worker thread unless the prompt is
    short) and compile its grammar (off the event loop): a bad schema or regex is a 400 before
    anything is queued."""
    num = body.num_choices()
    state.admit(num)
    try:
        if num == 1 and body.num_chars() <= INLINE_TOKENIZE_CHARS and isinstance(getattr(body, "prompt", ""), str):
            job = build(state, body)
        else:
            job = await asyncio.to_thread(build, state, body)
        await compile_constraints(state, job)
    except BaseException:
        state.num_in_flight -= num
        raise
    job.num_reserved = num
    return job


async def _respond(state: ServerState, request: Request, job: serving.Job):
    stream = job.run(state.engine)
    if job.body.stream:
        return _SSEResponse(job, job.sse(stream), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    # NOTE: a client that disconnects while waiting for a whole response aborts it too
    task = asyncio.ensure_future(job.collect(stream))
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        job.release()
    if task not in done:
        return Response(status_code=499)  # nobody is listening
    return JSONResponse(task.result())


class _SSEResponse(StreamingResponse):
    """Closes the event stream however the response ends, so its requests are aborted and
    its choices released (also when the stream never started)."""

    def __init__(self, job: serving.Job, *args, **kw):
        super().__init__(*args, **kw)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.job.release()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


__all__ = ["APIError", "build_app", "error_body"]
