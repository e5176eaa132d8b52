"""Connections for the requests to an HTTP upstream: a fixed number of clients of one connection each, and each one
always comes back.

Why httpx's pool is not left to count them itself: httpcore 1.0.9 (the last release, used by httpx 0.28.1) loses a
connection slot for good when a request is cancelled while queued just as a fresh connection opens for it
(encode/httpcore#1093, anyio cancellation too, as Starlette cancels a handler whose client left), just after
connecting (#1099), or while its response is being closed (#1115), each reproduced on loopback; its shields are anyio
cancel scopes, which ``Task.cancel()``, ``asyncio.timeout`` and ``wait_for`` go through. Once ``max_connections``
are lost every request waits out the pool timeout, and the worker is wedged until it restarts. Two rules keep our
requests out of reach:

1. The connections are counted by us (``Connections``): a request enters httpx only once it holds a client of its
   own, so it never queues inside httpcore. Waiting for one is bounded: past ``wait`` seconds, ``PoolBusy``.
2. No cancellation reaches httpx: each exchange runs in a task of its own, which the caller awaits shielded. A caller
   that is cancelled stops waiting at once; its exchange ends by the client's own timeouts, gives its client back, and
   its connection, read to the end, stays open for the next request instead of being dropped.

Why a client of one connection each, not one client of ``size`` connections: httpcore walks every connection of its
pool on each request and each response (``is_idle``, ``has_expired`` -> a socket readability check), so with 50
kept-alive connections that walk was 31% of the service's CPU at 500 streams (bench/RESULTS.md). A client of one walks
one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

# Idle connections are closed after this long: well under the idle timeouts of the servers in front of PostgREST
# (nginx closes idle keep-alive connections after 75 s by default), so a request is seldom sent on a connection the
# server is closing at that moment (and a replayable one that is, is retried: services/store/postgrest/client.py).
KEEPALIVE_EXPIRY = 5.0


class PoolBusy(Exception):
    """Every connection stayed taken for the whole wait."""


# The limits of each client ``Connections`` makes: its one connection, kept alive between requests (with fewer
# keep-alive connections than connections, httpcore closes one as each response ends, so a request opens a new one).
ONE_CONNECTION = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=KEEPALIVE_EXPIRY)


class Connections:
    """``size`` clients of one connection each (``make``), handed out one per exchange under the two rules above."""

    def __init__(self, size: int, wait: float, make: Callable[[], httpx.AsyncClient]) -> None:
        if size < 1 or wait <= 0:
            raise ValueError("a pool needs at least one connection and a positive wait")
        self.size = size
        self._wait = wait
        self.clients = [make() for _ in range(size)]
        # Last in, first out: the connection used last is the one most likely still open, and the others may idle out.
        self._free: asyncio.LifoQueue[httpx.AsyncClient] = asyncio.LifoQueue()
        for client in self.clients:
            self._free.put_nowait(client)
        self._exchanges: set[asyncio.Task[Any]] = set()

    @property
    def in_use(self) -> int:
        """Clients taken now, by exchanges under way (including those whose callers stopped waiting)."""
        return len(self._exchanges)

    async def run(self, exchange: Callable[[httpx.AsyncClient], Coroutine[Any, Any, T]]) -> T:
        """Await ``exchange(client)`` on a free client; raises ``PoolBusy`` when none frees up within the wait."""
        try:
            async with asyncio.timeout(self._wait):
                client = await self._free.get()  # (a cancelled or timed-out get takes nothing: asyncio's queues)
        except TimeoutError:
            raise PoolBusy(f"all {self.size} connections in use") from None
        task = asyncio.get_running_loop().create_task(exchange(client))
        self._exchanges.add(task)
        task.add_done_callback(lambda done: self._release(done, client))
        return await asyncio.shield(task)

    def _release(self, task: asyncio.Task[Any], client: httpx.AsyncClient) -> None:
        self._exchanges.discard(task)
        self._free.put_nowait(client)

    async def aclose(self) -> None:
        """Shutdown: exchanges nobody waits for any more are cancelled, then every client is closed."""
        for task in list(self._exchanges):
            task.cancel()
        await asyncio.gather(*self._exchanges, return_exceptions=True)
        for client in self.clients:
            await client.aclose()
