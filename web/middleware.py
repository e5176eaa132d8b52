"""Pure-ASGI middleware (Starlette documents why ``BaseHTTPMiddleware`` must not wrap streaming responses).

``RequestContext`` gives every request an id (a sane ``X-Request-ID`` from the client or proxy is kept, otherwise
one is generated), echoes it, adds security headers to non-streaming responses, and writes one log line per request:
method, route template, status, duration, request id. The query string and body are never logged: they hold user
ids and message text.

It also records each request in the app's metrics (``scope["state"]["metrics"]``, from the lifespan) by route
template, never by raw path, so unknown URLs cannot create unbounded series, and makes that registry the
request's ``services.metrics.current`` for code too deep to be handed it (``with_retry``).

``EnvelopeCORS`` is Starlette's CORS middleware with a refused preflight in the error envelope.

``BodyLimit`` refuses bodies larger than ``max_bytes``, from ``Content-Length`` up front or while reading a
chunked body, with a 413 in the error envelope.

``stack(settings)`` is the three, in order, as the app is built with them.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errors import BadRequest, PayloadTooLarge
from services import metrics as metrics_context
from settings import Settings
from web.openapi.responses import header_schemas

logger = logging.getLogger("canvalo.access")


def stack(settings: Settings) -> list[Middleware]:
    """The app's middleware, outermost first: request id and access log, CORS, body limit."""
    return [
        Middleware(RequestContext),
        Middleware(
            EnvelopeCORS,
            allow_origins=settings.cors_origins,
            # Credentials with a wildcard origin would let any site act as the user; never combine them.
            allow_credentials="*" not in settings.cors_origins,
            # Every method a route may serve (PUT sets a conversation's active leaf), and every response header the
            # API document declares: a browser's script reads a header only when it is exposed.
            allow_methods=sorted(HTTP_METHODS),
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "Last-Event-ID"],
            expose_headers=list(header_schemas()),
        ),
        Middleware(BodyLimit, max_bytes=settings.max_request_bytes),
    ]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch only: with re.match, "$" allows a trailing "\n"

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}

# The methods labelled by name in metrics and the access log (any other is "OTHER"), and those CORS allows: every
# method a route serves must be here (tests/test_hardening.py walks the routes).
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = Headers(scope=scope).get("x-request-id", "")
        request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        state["request_started"] = started  # time to first token is measured from here (web/sse.py)
        metrics = state.get("metrics")
        context = metrics_context.current.set(metrics)
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                if not headers.get("content-type", "").startswith("text/event-stream"):
                    for name, value in SECURITY_HEADERS.items():
                        headers.setdefault(name, value)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            metrics_context.current.reset(context)
            route = getattr(scope.get("route"), "path", "<unmatched>")
            # Any token is a method to h11 and nginx: a client's own would be a new series each, without bound.
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
            duration = time.perf_counter() - started
            if metrics is not None:
                metrics.http_requests.inc(method, route, str(status))
                metrics.http_duration.observe(duration, method, route, str(status))
            logger.info("%s %s %d %.1fms request_id=%s", method, route, status, duration * 1000, request_id)


class EnvelopeCORS(CORSMiddleware):
    """Starlette's CORS middleware, with a refused preflight answered in the error envelope instead of plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers=request_headers)
        if response.status_code != 400:
            return response
        # Starlette's own text ("Disallowed CORS origin, headers") names what was refused and nothing the client sent.
        reason = bytes(response.body).decode()
        error = BadRequest(f"{reason}.", code="CORS_PREFLIGHT_REFUSED", suggested_actions=("Check CORS_ORIGINS",))
        headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        return JSONResponse(error.body(), status_code=400, headers=headers)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = PayloadTooLarge()
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge()
            return message

        await self.app(scope, limited_receive, send)
