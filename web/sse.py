"""Server-Sent Events: a pure-ASGI response that follows a chat run's feed (``services/runs/feeds.py``).

Why not Starlette's ``StreamingResponse``: it neither notices a client that left while nothing is being sent nor
sends keep-alives. This response:

- writes every frame already waiting in one write, without ever waiting for more (frames come pre-encoded from
  the run's event log, ``services/store/run_log.py``: ``id: <seq>`` and one ``data:`` line each);
- sends a ``: ping`` comment whenever nothing else was sent for ``ping_interval`` seconds, so proxies with idle
  timeouts (nginx, ALB, Cloudflare) keep the connection open;
- stops when the client disconnects. That detaches this viewer only: the run goes on generating and saving, and
  the client can resume it (``GET /api/chat/runs/{id}/events`` with ``Last-Event-ID``);
- if the server cancels the request (graceful-shutdown timeout), sends a final retryable ``error`` chunk;
- answers a HEAD with the headers alone, at once, without following the run.

Two tasks per viewer: the request's own task writes, a watcher waits for the disconnect. Stream metrics (open
streams, duration by outcome) are measured here; the run measures time to first token and tokens.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import anyio
from starlette.types import Receive, Scope, Send

from services.metrics import Metrics
from services.store.text import encodable


PING = b": ping\n\n"

# Headers that stop nginx and browsers from buffering or caching the stream. No hop-by-hop headers
# (Connection, Transfer-Encoding): the server owns those, and they are invalid behind HTTP/2 proxies.
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-store"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer this response (nginx docs, X-Accel-Buffering)
    (b"x-content-type-options", b"nosniff"),
]


class Feed(Protocol):
    """Where a viewer's frames come from: a run's feed (``services.runs.feeds.RunFeed``)."""

    outcome: str

    async def next_frames(self, after: int, timeout: float) -> tuple[str, int, bool]:
        """Frames after event ``after`` (waiting up to ``timeout`` for one), the new cursor, and whether the run
        is over with everything sent."""


class EventStreamResponse:
    """One SSE viewer of a run; see the module docstring for what it guarantees."""

    __slots__ = ("_after", "_feed", "_headers", "_ping_interval", "_shutdown_frame")

    def __init__(
        self, feed: Feed, *, after: int, ping_interval: float, shutdown_frame: str,
        headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self._feed = feed
        self._after = after
        self._ping_interval = ping_interval
        self._shutdown_frame = shutdown_frame
        self._headers = SSE_HEADERS + (headers or [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") == "HEAD":
            # A GET's headers and no body (RFC 9110 9.3.2), complete at once: following the run would hold the
            # connection, and any request behind it on the connection, until the run ends, to send nothing.
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        stream_metrics = _StreamMetrics(scope)
        try:
            await self._stream(receive, send, stream_metrics)
        finally:
            stream_metrics.closed()

    async def _stream(self, receive: Receive, send: Send, stream_metrics: _StreamMetrics) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        with anyio.CancelScope() as viewing:
            watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, viewing))
            try:
                await self._deliver(send)
                stream_metrics.outcome = self._feed.outcome
            except asyncio.CancelledError:
                if viewing.cancel_called:
                    raise  # the client left: the scope swallows it
                # Cancelled from outside (the server's graceful-shutdown timeout): tell the client to retry.
                stream_metrics.outcome = "shutdown"
                with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                    farewell = _encoded(self._shutdown_frame)
                    await send({"type": "http.response.body", "body": farewell, "more_body": False})
                # The response is complete and the client told to retry: end as a finished response. Re-raised, the
                # cancellation reaches uvicorn, which logs it as "Exception in ASGI application" with a traceback
                # on every shutdown that had a stream open.
                _uncancel()
                return
            finally:
                watcher.cancel()
        if not viewing.cancelled_caught:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _deliver(self, send: Send) -> None:
        cursor = self._after
        while True:
            text, cursor, over = await self._feed.next_frames(cursor, self._ping_interval)
            if text or not over:
                await send({"type": "http.response.body", "body": _encoded(text) if text else PING, "more_body": True})
            if over:
                return


def _encoded(text: str) -> bytes:
    """``text`` as UTF-8, whatever it holds: a lone surrogate, which no frame should carry but UTF-8 cannot write, goes
    as U+FFFD (``services/store/text.py``) rather than ending the stream in the middle."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return encodable(text).encode()


def _uncancel() -> None:
    """Withdraw the cancellation just handled, so the request's task ends normally (asyncio's rule for a task that
    does not re-raise it)."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


class _StreamMetrics:
    """What one viewer tells the metrics; a no-op when the app has no registry."""

    __slots__ = ("_metrics", "_opened", "outcome")

    def __init__(self, scope: Scope) -> None:
        self._metrics: Metrics | None = scope.get("state", {}).get("metrics")
        self._opened = time.perf_counter()
        self.outcome = "disconnected"  # until the run's end is sent: then the run's status
        if self._metrics is not None:
            self._metrics.open_streams.inc()

    def closed(self) -> None:
        if self._metrics is not None:
            self._metrics.open_streams.inc(amount=-1)
            self._metrics.stream_duration.observe(time.perf_counter() - self._opened, self.outcome)
