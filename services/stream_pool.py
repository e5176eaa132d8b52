"""An httpx transport whose connection pool costs O(1) per request, for thousands of concurrent Bedrock streams.

Why: httpcore's ``AsyncConnectionPool`` (1.0.9) re-examines every connection on each request and on each response
close, and for every idle connection counts all of them again (``_assign_requests_to_connections``). Its cost per
request grows with the open connections and, once some are idle, with their square. Every open chat stream holds
one Bedrock connection, so at 1,000 concurrent streams that bookkeeping took 70% of a worker's CPU (py-spy, bench/)
and streams timed out waiting for their first event.

What: Bedrock is one origin and each stream holds its connection until the response is closed, so a pool needs no
queue and no cap: ``StreamPool`` hands out the most recently idle keep-alive connection (a stack) or opens a new
``httpcore.AsyncHTTPConnection``, and takes it back when the response stream is closed. Connections idle past
``keepalive_expiry`` are closed when they reach the bottom of the stack. ``stream_transport`` puts it inside httpx's
own ``AsyncHTTPTransport``, which keeps mapping httpcore's exceptions to httpx's (``httpx.TransportError``, ...).
"""

from __future__ import annotations

import collections
import ssl
from collections.abc import AsyncIterator

import anyio
import httpcore
import httpx


# The key, in the httpx response's ``extensions``, of the raw body stream. Reading it directly skips four layers of
# async generators per chunk (httpx's aiter_bytes, aiter_raw, BoundAsyncStream and the transport's exception-mapping
# wrapper); the reader then maps httpcore's exceptions itself. Closing still goes through ``httpx.Response.aclose``.
BODY_EXTENSION = "canvalo.body"


class StreamPool:
    """The ``httpcore`` pool interface (``handle_async_request``, ``aclose``) over a stack of idle connections."""

    def __init__(self, ssl_context: ssl.SSLContext, keepalive_expiry: float) -> None:
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._backend = httpcore.AnyIOBackend()
        self._idle: collections.deque[httpcore.AsyncHTTPConnection] = collections.deque()

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        connection = await self._checkout(request.url.origin)
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await connection.aclose()
            raise
        body = _ReleasingStream(response.stream, connection, self)  # type: ignore[arg-type]
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=body,  # type: ignore[arg-type]
            # The body again under our own key, so a reader can skip httpx's per-chunk layers (see BODY_EXTENSION).
            extensions={**response.extensions, BODY_EXTENSION: body},
        )

    async def _checkout(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely to have been closed
            if connection.is_idle() and connection.can_handle_request(origin) and not connection.has_expired():
                return connection
            await connection.aclose()
        return httpcore.AsyncHTTPConnection(
            origin=origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            network_backend=self._backend,
        )

    async def release(self, connection: httpcore.AsyncHTTPConnection) -> None:
        """Called when a response stream is closed: keep the connection if it can serve another request."""
        if connection.is_idle():
            self._idle.append(connection)
        elif not connection.is_closed():
            await connection.aclose()
        while self._idle and self._idle[0].has_expired():  # the oldest idle connections sit at the bottom
            await self._idle.popleft().aclose()

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().aclose()


class _ReleasingStream:
    """A response body that gives its connection back to the pool once it is closed."""

    __slots__ = ("_closed", "_connection", "_pool", "_stream")

    def __init__(self, stream: AsyncIterator[bytes], connection: httpcore.AsyncHTTPConnection, pool: StreamPool) -> None:
        self._stream = stream
        self._connection = connection
        self._pool = pool
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        # httpcore's own iterator, not an async generator wrapping it: one layer less per chunk read.
        return self._stream.__aiter__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._stream.aclose()  # type: ignore[attr-defined]
            finally:
                await self._pool.release(self._connection)


def stream_transport(keepalive_expiry: float) -> httpx.AsyncHTTPTransport:
    """httpx's transport (request mapping, exception mapping) over a ``StreamPool`` instead of httpcore's pool."""
    ssl_context = httpx.create_ssl_context()
    transport = httpx.AsyncHTTPTransport(verify=ssl_context)
    # httpx has no public hook for the pool; ``_pool`` is the one attribute its handle_async_request and aclose use
    # (httpx 0.28.1, pinned in requirements.txt).
    transport._pool = StreamPool(ssl_context, keepalive_expiry)  # type: ignore[assignment]
    return transport
