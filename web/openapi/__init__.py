"""The OpenAPI 3.1 description of the HTTP API, as plain data: ``GET /openapi.json`` serves it, ``/docs`` renders it.

Frontend developers generate clients from it, so it says what the code does, not what it should do: every parameter
and request body comes from the route's declaration in ``web/inputs.py`` (the one the route reads its inputs
through), and every error response is the ``errors.AppError.body`` envelope. The rest is here, by what it documents:
``records.py`` (what the routes answer), ``stream.py`` (the event stream), ``responses.py`` (headers, errors) and
``paths.py`` (the operations). ``tests/test_openapi.py`` keeps it true: every route is an operation, every query
parameter and header a route reads is declared, every declared bound is the code's, real responses (errors and SSE
chunks included) validate against these schemas, and a schemathesis run against a live server finds no 5xx and no
undocumented status or body.

Deliberate choices:

- Response objects are closed (``additionalProperties: false``), so a new response field fails the tests until it
  is documented. Request bodies stay open: the service ignores fields it does not know.
- OpenAPI 3.1 has no keyword for the items of an event stream (3.2 adds ``itemSchema``); by the convention that
  3.2 formalises, and that tools such as schemathesis read, the ``text/event-stream`` schema describes one event
  (``StreamEvent``: ``id``, ``event``, ``data``), whose ``data`` is JSON (``contentMediaType``) matching
  ``contentSchema`` ``StreamChunk`` (a ``oneOf`` on ``type``).
- 405 (wrong method) and 500 cannot belong to one operation's list honestly (405 answers a method the path does
  not have); they are components, named in ``info.description``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from web import inputs
from web.openapi import paths, records, responses, stream


DESCRIPTION = """\
The Canvalo assistant's chat backend: conversations, chat turns streamed over Server-Sent Events, and their runs.

**Authentication.** With auth configured (always in production) every /api route needs `Authorization: Bearer
<Supabase access token>` and the `user_id` sent must be the token's `sub`. In development without
SUPABASE_JWT_SECRET or SUPABASE_URL no token is needed and `user_id` is trusted as sent.

**Errors.** Every non-2xx response is `{"error": {code, message, userMessage, suggestedActions, retryable,
retryAfter?, ...}}` (ErrorEnvelope). Any path answers a method it does not have with 405 (Allow header) and an
unexpected failure with 500, in the same envelope; OPTIONS that is not a CORS preflight, with 204 and the same Allow. A 4xx is never retryable except 408, 429 and 499.

**Streams.** POST /api/chat/stream and GET /api/chat/runs/{run_id}/events answer text/event-stream; each event's
data is a StreamChunk: the stream's schema is StreamEvent, one event, whose data is StreamChunk JSON.
"""


@lru_cache(maxsize=4)
def document(version: str) -> dict[str, Any]:
    """The whole document. Cached: it depends only on the code (and ``version``); callers must not mutate it."""
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {"title": "Canvalo chat API", "version": version, "description": DESCRIPTION},
        "servers": [{"url": "/", "description": "The host that served this document."}],
        "tags": [
            {"name": "chat", "description": "Chat turns, their streams and runs."},
            {"name": "conversations"},
            {"name": "actions", "description": "Changes the assistant prepared, confirmed by the user."},
            {"name": "usage", "description": "The caller's model usage (tokens, cost) against their budgets."},
            {"name": "service"},
            {"name": "pages"},
            {"name": "development", "description": "Helpers for trying the service; 404 in production."},
        ],
        "paths": paths.paths(),
        "components": {
            "schemas": {
                **records.schemas(),
                **{route.body_name: route.body_schema() for route in inputs.ROUTES if route.body},
                **responses.error_schemas(),
                **stream.schemas(),
                "OpenAPIDocument": {
                    "type": "object",
                    "required": ["openapi", "info", "paths"],
                    "properties": {"openapi": {"type": "string", "pattern": "^3\\.1\\."}},
                },
            },
            "parameters": {field.component: field.parameter() for route in inputs.ROUTES for field in route.parameters},
            "headers": responses.header_schemas(),
            "responses": responses.for_every_error(responses.responses()),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A Supabase access token. Optional only in development without auth settings.",
                },
                "metricsToken": {"type": "http", "scheme": "bearer", "description": "METRICS_TOKEN, for /metrics."},
            },
        },
    }
