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

import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
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
        sender, receiver = anyio.create_memory_object_stream[dict[str, Any]](max_buffer_size=math.inf)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._produce, sender)
                group.start_soon(_cancel_on_disconnect, receive, group)
                await self._deliver(receiver, send)
                group.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            # Cancelled from outside (the server's graceful-shutdown timeout): tell the client to retry.
            self._observed.outcome = "shutdown"
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await send({"type": "http.response.body", "body": encode(self._shutdown_chunk), "more_body": False})
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _produce(self, sender: MemoryObjectSendStream[dict[str, Any]]) -> None:
        # The buffer is unbounded on purpose: the producer is paced by the model, and a slow client must not stall
        # the upstream read (which would trip the model's idle timeout). A turn's text is bounded by max_tokens.
        async with sender:
            try:
                async for item in self._chunks:
                    sender.send_nowait(item)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._chunks.aclose()  # type: ignore[attr-defined]

    async def _deliver(self, receiver: MemoryObjectReceiveStream[dict[str, Any]], send: Send) -> None:
        async with receiver:
            while True:
                try:
                    batch = await self._next_batch(receiver)
                except anyio.EndOfStream:
                    return
                body = b"".join(encode(item) for item in merge_tokens(batch)) if batch else PING
                self._observed.sent(batch)
                await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _next_batch(self, receiver: MemoryObjectReceiveStream[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every chunk already waiting, or [] when ``ping_interval`` passed with nothing to send."""
        with anyio.move_on_after(self._ping_interval):
            return [await receiver.receive(), *_drain(receiver)]
        return []


class _StreamMetrics:
    """What one stream tells the metrics as its chunks go out; a no-op when the app has no registry."""

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


def _drain(receiver: MemoryObjectReceiveStream[dict[str, Any]]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    while True:
        try:
            items.append(receiver.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return items


async def _cancel_on_disconnect(receive: Receive, group: TaskGroup) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            group.cancel_scope.cancel()
            return
