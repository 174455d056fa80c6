"""The OpenAI-compatible HTTP server: FastAPI routes, errors in the OpenAI format.

    POST /v1/completions, /v1/chat/completions   (stream: SSE `data: {...}` ... `data: [DONE]`)
    GET  /v1/models, /health, /metrics

Knows only the Engine API, through AsyncEngine (one engine thread). Error statuses: 400
invalid parameters / prompt over the context (and request-validation errors, 422 in plain
FastAPI), 401 a missing or wrong API key, 404 an unknown model, 413 a body over
max_body_bytes, 429 more requests than max_num_seqs + max_queue in flight, 503 a dead engine.
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
from lightspeed.server.async_engine import AsyncEngine, EngineDeadError
from lightspeed.server.protocol import (ChatCompletionRequest, CompletionRequest, ErrorInfo, ErrorResponse, ModelCard,
                                        ModelList)
from lightspeed.server.structured import compile_constraints

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                413: "RequestTooLargeError", 429: "RateLimitError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    err = ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "Error"), param=param, code=status)
    return ErrorResponse(error=err).model_dump()


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    api_key: str | None = None
    max_queue: int | None = None  # requests waiting beyond max_num_seqs; None: no limit
    num_in_flight: int = 0  # engine requests (n per HTTP request) running or queued; see Job.run
    token_text: serving.TokenText | None = None

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}", "model")

    def admit(self, num: int) -> None:
        if not self.engine.is_alive:
            raise APIError(503, f"the engine loop is not running ({self.engine.error!r}); restart the server")
        if self.max_queue is not None:
            limit = self.engine.engine.config.max_num_seqs + self.max_queue
            if self.num_in_flight + num > limit:
                raise APIError(429, f"the server is at its queue limit ({limit} requests in flight); retry later")


class BodyLimitMiddleware:
    """Pure ASGI: read the whole body first (up to max_bytes), answer 413 past the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks, size = [], 0
        while not too_big:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)  # a disconnect
                break
            size += len(message.get("body", b""))
            too_big = size > self.max_bytes
            chunks.append(message)
            if not message.get("more_body"):
                break
        if too_big:
            resp = error_response(413, f"the request body is over the server's limit of {self.max_bytes} bytes")
            return await resp(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
        replay = [{"type": "http.request", "body": body, "more_body": False}] + \
                 [m for m in chunks if m["type"] != "http.request"]

        async def replay_receive():
            return replay.pop(0) if replay else await receive()  # then wait for the disconnect

        return await self.app(scope, replay_receive, send)


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None, max_queue: int | None = None,
              max_body_bytes: int = 16 << 20) -> FastAPI:
    state = ServerState(engine, model_name, api_key, max_queue)
    state.token_text = serving.TokenText(engine.engine.tokenizer)

    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="lightspeed", lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {"Retry-After": "1"} if e.status == 429 else None
        return error_response(e.status, e.message, e.param, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errs = e.errors()
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}" for err in errs]
        loc = errs[0].get("loc", ()) if errs else ()
        param = str(loc[1]) if len(loc) > 1 else None  # the top-level field
        return error_response(400, "invalid request: " + "; ".join(parts), param or None)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request, e):
        return error_response(503, str(e))

    @app.exception_handler(LightspeedError)
    async def _lightspeed_error(request, e):
        return error_response(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error_response(500, f"internal error: {e!r}")

    def check_api_key(request: Request) -> None:
        if state.api_key:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health():
        if not engine.is_alive:
            return error_response(503, f"the engine loop is not running ({engine.error!r})")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        registry = engine.metrics.registry if engine.metrics is not None else None
        return Response(generate_latest(registry) if registry is not None else b"", media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models():
        return ModelList(data=[ModelCard(id=model_name, max_model_len=state.max_model_len,
                                        vocab_size=engine.engine.model_config.vocab_size)]).model_dump()

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        state.check_model(body.model)
        job = serving.completion_job(state, body)
        return await _respond(state, request, job)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state.check_model(body.model)
        job = serving.chat_job(state, body)
        return await _respond(state, request, job)

    app.include_router(v1)
    return BodyLimitMiddleware(app, max_body_bytes) if max_body_bytes else app


async def _respond(state: ServerState, request: Request, job: serving.Job):
    await compile_constraints(state, job)  # a bad schema / regex: 400 before queueing
    state.admit(len(job.subs))
    stream = job.run(state.engine)
    if job.body.stream:
        return _SSEResponse(job.sse(stream), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
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
    if task not in done:
        return Response(status_code=499)  # nobody is listening
    return JSONResponse(task.result())


class _SSEResponse(StreamingResponse):
    """Closes the event stream however the response ends, so its requests are aborted."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


__all__ = ["APIError", "build_app", "error_body"]
