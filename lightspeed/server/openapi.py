"""The server's OpenAPI schema as the server answers: errors are 400 (not FastAPI's 422) in
the OpenAI error format, every status a route can give is listed, /health is JSON."""
from __future__ import annotations

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from lightspeed.server.protocol import ErrorResponse

_ERRORS = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model or route",
           413: "Request body over the limit", 429: "Queue limit reached (see Retry-After)",
           500: "The engine failed while running the request",
           503: "The engine is restarting or the server is shutting down (see Retry-After)"}


# one server-sent event: `data:` a JSON chunk (or an error in the OpenAI format), then `data: [DONE]`
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}


class Health(BaseModel):
    status: str  # ok | restarting | dead | stopped | draining
    reason: str | None = None
    model: str
    num_restarts: int
    num_requests_in_flight: int


def _json(ref: str) -> dict:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _add_model(schemas: dict, model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema


def document_errors(app) -> None:
    """Replace app.openapi with a schema that lists the server's real error responses."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        _add_model(schemas, ErrorResponse)
        _add_model(schemas, Health)
        for path, ops in schema["paths"].items():
            for op in ops.values():
                responses = op["responses"]
                responses.pop("422", None)
                if path == "/health":
                    responses["200"] = {"description": "Serving", "content": _json("Health")}
                    responses["503"] = {"description": "Not serving (see Retry-After)", "content": _json("Health")}
                    continue
                codes = [c for c in _ERRORS if path.startswith("/v1/") and (c != 413 or "requestBody" in op)
                         and (c in (401, 404) or "requestBody" in op)]
                for code in codes:
                    responses.setdefault(str(code), {"description": _ERRORS[code], "content": _json("ErrorResponse")})
                if "requestBody" in op and "200" in responses:  # stream: true answers an event stream
                    responses["200"]["content"]["text/event-stream"] = {"schema": _SSE_EVENT}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
