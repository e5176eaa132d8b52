"""Server-Sent Events: a pure encoder and a pure-ASGI streaming response.

Why not Starlette's ``StreamingResponse``: it neither closes the body iterator when the client disconnects while a
chunk is being sent (the generator's cleanup then waits for garbage collection) nor sends keep-alives. This
response runs the producer as its own task, so:

- a client disconnect cancels the producer, which unwinds through the chat turn's cleanup (the partial answer is
  saved) and closes the upstream model stream;
- a ``: ping`` comment goes out whenever nothing else was sent for ``ping_interval`` seconds, so proxies with idle
  timeouts (nginx, ALB, Cloudflare) keep the connection open;
- chunks that are already waiting are sent together in one write, and adjacent ``token`` chunks from the same
  agent are merged into one event, without ever waiting for more;
- if the server cancels the request (graceful-shutdown timeout), a final retryable ``error`` chunk is sent.

Stream metrics (open streams, duration by outcome, time to first token, model tokens, error codes) are measured
here, as chunks actually go out, by ``_StreamMetrics``; the registry comes from the lifespan state in the scope.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

from services.metrics import Metrics

logger = logging.getLogger(__name__)

PING = b": ping\n\n"

# Headers that stop nginx and browsers from buffering or caching the stream. No hop-by-hop headers
# (Connection, Transfer-Encoding): the server owns those, and they are invalid behind HTTP/2 proxies.
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-store"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer this response (nginx docs, X-Accel-Buffering)
    (b"x-content-type-options", b"nosniff"),
]


def encode(data: dict[str, Any]) -> bytes:
    """One ``data:`` event. Compact JSON never contains a raw newline, so one ``data:`` line is always enough."""
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def merge_tokens(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge runs of ``token`` chunks from the same agent into one chunk; every other chunk is kept as is."""
    merged: list[dict[str, Any]] = []
    for item in chunks:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and item["type"] == "token"
            and previous["type"] == "token"
            and previous["agent_type"] == item["agent_type"]
        ):
            merged[-1] = {**previous, "content": previous["content"] + item["content"]}
        else:
            merged.append(item)
    return merged


class OpenStreams:
    """Counts streams in flight so shutdown can wait for their cleanup (saving partial answers) to finish.

    uvicorn cancels streams still open when its graceful-shutdown timeout expires and then, without waiting for
    them, runs the lifespan shutdown that closes the store; the lifespan calls ``drain`` first.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = anyio.Event()
        self._idle.set()

    def opened(self) -> None:
        self.count += 1
        if self._idle.is_set():
            self._idle = anyio.Event()

    def closed(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self._idle.wait()
        if self.count:
            logger.warning("%d streams still open at shutdown", self.count)


class EventStreamResponse:
    """One SSE response; see the module docstring for what it guarantees.

    Three tasks per stream and nothing else long-lived: the request's own task writes (batches, pings, the final
    chunk), a producer task iterates ``chunks`` into a deque, and a watcher task waits for the disconnect. They are
    plain asyncio tasks, not an anyio task group: a task group's bookkeeping (a ``TaskHandle`` with its own cancel
    scope and ``Event`` per child, a memory object stream, a cancel scope per wait) cost about 12 KB per open stream
    (tracemalloc, 500 streams). The producer still runs inside one anyio ``CancelScope``, so stopping it is an anyio
    cancellation that respects the shielded cleanup below it (saving the partial answer, closing the upstream).
    """

    __slots__ = (
        "_chunks",
        "_done",
        "_headers",
        "_observed",
        "_ping_interval",
        "_queue",
        "_scope",
        "_shutdown_chunk",
        "_tracker",
        "_waiter",
    )

    def __init__(
        self,
        chunks: AsyncIterator[dict[str, Any]],
        *,
        ping_interval: float,
        shutdown_chunk: dict[str, Any],
        tracker: OpenStreams,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self._chunks = chunks
        self._ping_interval = ping_interval
        self._shutdown_chunk = shutdown_chunk
        self._tracker = tracker
        self._headers = SSE_HEADERS + (headers or [])
        # The producer appends, the writer takes everything waiting. The buffer is unbounded on purpose: the
        # producer is paced by the model, and a slow client must not stall the upstream read (which would trip the
        # model's idle timeout). A turn's text is bounded by max_tokens.
        self._queue: deque[dict[str, Any]] = deque()
        self._done = False  # the producer finished (or was stopped): nothing more will be queued
        self._waiter: asyncio.Future[None] | None = None  # set while the writer waits for chunks
        self._scope: anyio.CancelScope | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._observed = _StreamMetrics(scope)
        self._tracker.opened()
        try:
            await self._stream(receive, send)
        finally:
            self._tracker.closed()
            self._observed.closed()

    async def _stream(self, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        loop = asyncio.get_running_loop()
        self._scope = anyio.CancelScope()
        producer = loop.create_task(self._produce(self._scope))
        watcher = loop.create_task(self._cancel_on_disconnect(receive))
        try:
            await self._deliver(send)
        except asyncio.CancelledError:
            # Cancelled from outside (the server's graceful-shutdown timeout): stop the producer, let its cleanup
            # save the partial answer, then tell the client to retry.
            self._observed.outcome = "shutdown"
            with anyio.CancelScope(shield=True):
                await self._stop(producer, watcher)
                with anyio.move_on_after(1):
                    await send({"type": "http.response.body", "body": encode(self._shutdown_chunk), "more_body": False})
            raise
        await self._stop(producer, watcher)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stop(self, producer: asyncio.Task[None], watcher: asyncio.Task[None]) -> None:
        """End both helper tasks; returns once the producer's cleanup (saving, closing the upstream) is over."""
        assert self._scope is not None
        self._scope.cancel()
        watcher.cancel()
        await asyncio.wait((producer, watcher))
        if not producer.cancelled() and producer.exception() is not None:
            raise producer.exception()  # type: ignore[misc]  # a bug below the chat layer; let it reach the server

    async def _produce(self, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                try:
                    async for item in self._chunks:
                        self._queue.append(item)
                        self._wake()
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._chunks.aclose()  # type: ignore[attr-defined]
        finally:
            self._done = True
            self._wake()

    async def _cancel_on_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                assert self._scope is not None
                self._scope.cancel()
                return

    async def _deliver(self, send: Send) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            body = b"".join(encode(item) for item in merge_tokens(batch)) if batch else PING
            self._observed.sent(batch)
            await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _next_batch(self) -> list[dict[str, Any]] | None:
        """Every chunk already waiting, [] when ``ping_interval`` passed with nothing to send, None at the end."""
        if not self._queue:
            if self._done:
                return None
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(self._ping_interval, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._queue:
                return None if self._done else []
        batch = list(self._queue)
        self._queue.clear()
        return batch

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)


class _StreamMetrics:
    """What one stream tells the metrics as its chunks go out; a no-op when the app has no registry."""

    __slots__ = ("_first_token_seen", "_metrics", "_opened", "_started", "outcome")

    def __init__(self, scope: Scope) -> None:
        state = scope.get("state", {})
        self._metrics: Metrics | None = state.get("metrics")
        self._started = state.get("request_started", time.perf_counter())
        self._opened = time.perf_counter()
        self._first_token_seen = False
        self.outcome = "disconnected"  # until a terminal chunk is sent
        if self._metrics is not None:
            self._metrics.open_streams.inc()

    def sent(self, batch: list[dict[str, Any]]) -> None:
        if self._metrics is None:
            return
        for item in batch:
            if item["type"] == "token" and not self._first_token_seen:
                self._first_token_seen = True
                self._metrics.first_token.observe(time.perf_counter() - self._started)
            elif item["type"] == "complete":
                self.outcome = "complete"
                usage = item.get("usage") or {}
                self._metrics.llm_tokens.inc("input", amount=usage.get("input_tokens") or 0)
                self._metrics.llm_tokens.inc("output", amount=usage.get("output_tokens") or 0)
            elif item["type"] == "error":
                self.outcome = "error"
                self._metrics.llm_errors.inc(str(item.get("code") or "UNKNOWN"))

    def closed(self) -> None:
        if self._metrics is not None:
            self._metrics.open_streams.inc(amount=-1)
            self._metrics.stream_duration.observe(time.perf_counter() - self._opened, self.outcome)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
