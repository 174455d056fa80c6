"""ASGI middleware of the server: a request-body size limit (413)."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from lightspeed.server.protocol import error_body


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
            resp = JSONResponse(error_body(413, f"the request body is over the server's limit of {self.max_bytes} bytes"),
                                status_code=413)
            return await resp(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
        replay = [{"type": "http.request", "body": body, "more_body": False}] + \
                 [m for m in chunks if m["type"] != "http.request"]

        async def replay_receive():
            return replay.pop(0) if replay else await receive()  # then wait for the disconnect

        return await self.app(scope, replay_receive, send)
