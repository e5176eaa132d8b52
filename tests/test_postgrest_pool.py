"""The Supabase store's connection pool, counted on loopback: connections are reused at every concurrency, and a
burst that exhausts the pool (requests cancelled mid-way, an upstream that hangs or resets) leaves no slot behind.

A TCP proxy on 127.0.0.1 stands between the store and the fake PostgREST. It counts the connections the store opens
and those still open, and plays a broken upstream for chosen users: a request naming one of them (every store read
sends ``user_id=eq.<id>``) is never answered, or has its connection reset. Everything is measured as numbers
(connections, slots), never as times; the waits below only bound how long a broken run can take.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpcore
import httpx
import pytest

from app import create_app
from errors import AppError, UpstreamUnavailable
from services.store import Caller, NewRun, RunUpdate, TurnLimits
from services.store.build import build_store
from services.store.postgrest.store import PostgrestStore
from tests.fake_postgrest import FakePostgrest
from tests.pg import RUN_SECRET
from tests.support import make_settings, new_id, serve
from tests.tokens import TEST_JWT_SECRET, TEST_PUBLISHABLE_KEY, bearer, mint

pytestmark = pytest.mark.anyio

POOL = 4  # slots in the pools under test: small, so a burst exhausts them many times over


class Proxy:
    """Forwards each connection to the fake PostgREST; counts them, and breaks the requests of chosen users."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self.accepted = 0  # connections the store opened
        self.open = 0  # connections open now
        self.hang: set[str] = set()  # users whose requests are never answered
        self.reset: set[str] = set()  # users whose requests have their connection reset
        self.held_back = 0  # requests of hanging users received so far
        self._hung: set[asyncio.StreamWriter] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._serving: set[asyncio.Task[Any]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self._writers.add(writer)
        self._serving.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            pumps = [asyncio.ensure_future(self._requests(reader, writer, up_writer)),
                     asyncio.ensure_future(_pipe(up_reader, writer))]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            up_writer.close()
            writer.close()
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self.open -= 1
            self._writers.discard(writer)
            self._serving.discard(asyncio.current_task())  # type: ignore[arg-type]
            writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        upstream: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if any(user.encode() in data for user in self.hang):
                    self.held_back += 1
                    self._hung.add(writer)
                    while await reader.read(65536):  # never answered: held until the store gives up on it
                        pass
                    return
                if any(user.encode() in data for user in self.reset):
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()  # a linger of 0 turns the close into a reset (RST)
                    return
                upstream.write(data)
                await upstream.drain()

    def drop_hung(self) -> None:
        """The hanging upstream gives up: its held connections are reset, and it answers from now on."""
        self.hang.clear()
        for writer in self._hung:
            writer.transport.abort()
        self._hung.clear()

    async def aclose(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._serving, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@asynccontextmanager
async def proxy_to(url: str) -> AsyncIterator[tuple[Proxy, str]]:
    parts = urlsplit(url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 80))
    server = await asyncio.start_server(proxy.serve, "127.0.0.1", 0)
    try:
        yield proxy, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await proxy.aclose()


@pytest.fixture
async def proxied(fake_postgrest: FakePostgrest, supabase_url: str) -> AsyncIterator[tuple[Proxy, str]]:
    async with proxy_to(supabase_url) as pair:
        yield pair


@pytest.fixture
def new_caller(register_user: Callable[[str], None]) -> Callable[[], Caller]:
    def make() -> Caller:
        user = new_id()
        register_user(user)
        return Caller(user, mint(user))

    return make


def store_through(tmp_path: Path, url: str, **environ: str) -> PostgrestStore:
    """The store exactly as the service builds it from its settings."""
    settings = make_settings(tmp_path, STORE="supabase", SUPABASE_URL=url, SUPABASE_RUN_SECRET=RUN_SECRET,
                             SUPABASE_PUBLISHABLE_KEY=TEST_PUBLISHABLE_KEY, SUPABASE_POOL_SIZE=str(POOL),
                             RETRY_BASE_DELAY="0", RETRY_MAX_DELAY="0", **environ)
    store = build_store(settings)
    assert isinstance(store, PostgrestStore)
    return store


def httpcore_pools(store: PostgrestStore) -> list[httpcore.AsyncConnectionPool]:
    """httpx's own pools under the store, one per connection (read only, for their counts)."""
    pools = [client._transport._pool for client in store._rest._connections.clients]  # type: ignore[attr-defined]
    assert all(isinstance(pool, httpcore.AsyncConnectionPool) for pool in pools)
    return pools


def held(store: PostgrestStore) -> int:
    """Slots httpcore counts as taken: connections not idle (in use, connecting, or lost) and requests it tracks."""
    return sum(sum(not connection.is_idle() for connection in pool.connections) + len(pool._requests)
               for pool in httpcore_pools(store))


async def read(store: PostgrestStore, caller: Caller) -> None:
    await store.list_conversations(caller, 10, 0)


# -- reuse --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 10, 100])
async def test_connections_are_reused_at_every_concurrency(
    proxied: tuple[Proxy, str], new_caller: Callable[[], Caller], tmp_path: Path, concurrency: int
) -> None:
    proxy, url = proxied
    store = store_through(tmp_path, url)
    callers = [new_caller() for _ in range(5)]
    requests = 100
    done = 0

    async def worker(number: int) -> None:
        nonlocal done
        for index in range(number, requests, concurrency):
            await read(store, callers[index % len(callers)])
            done += 1

    try:
        async with anyio.create_task_group() as group:
            for number in range(concurrency):
                group.start_soon(worker, number)
    finally:
        await store.aclose()
    assert done == requests
    # Not one connection per request: at most one per slot, however many requests wait for them.
    assert proxy.accepted <= min(concurrency, POOL), proxy.accepted


# -- no wedge -----------------------------------------------------------------------------------------------------


async def test_a_burst_that_exhausts_the_pool_recovers_and_gives_every_slot_back(
    proxied: tuple[Proxy, str], new_caller: Callable[[], Caller], tmp_path: Path
) -> None:
    proxy, url = proxied
    store = store_through(tmp_path, url, SUPABASE_TIMEOUT="1")
    hanging, resetting, caller = new_caller(), new_caller(), new_caller()
    proxy.hang.add(hanging.user_id)
    proxy.reset.add(resetting.user_id)
    outcomes: list[Any] = []

    async def one(who: Caller, scope: anyio.CancelScope) -> None:
        with scope:
            try:
                await read(store, who)
                outcomes.append("served")
            except AppError as exc:
                outcomes.append(exc.code)
            except Exception as exc:  # never: every failure is ours, with a code
                outcomes.append(exc)

    try:
        for _ in range(3):
            # More requests than slots, all at once. Each ordinary one is cancelled after its own number of event
            # loop turns, so cancellations land at every point of a request: queued for a slot, connecting, sending,
            # reading, closing. Half are cancelled as Starlette cancels a handler whose client left (an anyio
            # scope), half as asyncio.timeout or wait_for do (Task.cancel).
            scopes = [anyio.CancelScope() for _ in range(60)]
            tasks = [asyncio.ensure_future(one(caller, scope)) for scope in scopes]
            tasks += [asyncio.ensure_future(one(who, anyio.CancelScope())) for who in (hanging, resetting) * 2]
            for turn in range(30):
                for index in range(turn, len(scopes), 30):
                    if index % 2:
                        scopes[index].cancel()
                    else:
                        tasks[index].cancel()
                await asyncio.sleep(0)
            await asyncio.gather(*tasks, return_exceptions=True)
        assert all(outcome in ("served", "STORE_TIMEOUT", "STORE_UNAVAILABLE", "STORE_BUSY") for outcome in outcomes)
        assert {"STORE_TIMEOUT", "STORE_UNAVAILABLE"} <= set(outcomes)  # the hanging and the resetting upstream

        # Every later request is served, more of them at once than there are slots.
        proxy.hang.clear()
        proxy.reset.clear()
        served = 0

        async def later() -> None:
            nonlocal served
            await read(store, caller)
            served += 1

        async with anyio.create_task_group() as group:
            for _ in range(3 * POOL):
                group.start_soon(later)
        assert served == 3 * POOL, served

        # And every slot comes back: the abandoned requests end by their own timeouts.
        with anyio.move_on_after(10):
            while held(store) or proxy.open > POOL:
                await asyncio.sleep(0.02)
        assert held(store) == 0, httpcore_pools(store)
        assert proxy.open <= POOL, proxy.open
        assert store._rest._connections.in_use == 0
    finally:
        await store.aclose()


# -- the envelope -------------------------------------------------------------------------------------------------


async def test_a_full_pool_is_a_retryable_503_store_busy_and_the_service_recovers(
    proxied: tuple[Proxy, str], register_user: Callable[[str], None], tmp_path: Path
) -> None:
    proxy, url = proxied
    settings = make_settings(tmp_path, STORE="supabase", SUPABASE_URL=url, SUPABASE_RUN_SECRET=RUN_SECRET,
                             SUPABASE_PUBLISHABLE_KEY=TEST_PUBLISHABLE_KEY, SUPABASE_JWT_SECRET=TEST_JWT_SECRET,
                             SUPABASE_POOL_SIZE="1", SUPABASE_POOL_TIMEOUT="0.2")
    hanging, waiting = new_id(), new_id()
    for user in (hanging, waiting):
        register_user(user)
    proxy.hang.add(hanging)

    def listing(client: httpx.AsyncClient, user: str) -> Any:
        headers = bearer(mint(user, TEST_JWT_SECRET, issuer=f"{url}/auth/v1"))
        return client.get("/api/conversations", params={"user_id": user}, headers=headers)

    with contextlib.ExitStack() as stack:
        # Started from a thread: the proxy runs on this test's event loop, which must keep turning meanwhile.
        live = await anyio.to_thread.run_sync(stack.enter_context, serve(create_app(settings)))
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
            held = asyncio.ensure_future(listing(client, hanging))
            with anyio.fail_after(10):
                while not proxy.held_back:  # the hanging request now holds the only slot
                    await asyncio.sleep(0.01)
            busy = await listing(client, waiting)
            proxy.drop_hung()  # the read is retried on a new connection (a GET is safe to repeat) and served
            first = await held
            later = await listing(client, waiting)
        await anyio.to_thread.run_sync(stack.close)

    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "STORE_BUSY" and busy.json()["error"]["retryable"] is True
    assert first.status_code == later.status_code == 200


async def test_flushes_have_a_connection_of_their_own_so_a_full_pool_holds_up_no_answer(
    proxied: tuple[Proxy, str], new_caller: Callable[[], Caller], tmp_path: Path
) -> None:
    """Every slot of the pool held (by requests that hang), a user's request is a STORE_BUSY, and the worker's flush,
    which carries every streaming answer, still goes through on the connection kept for flushes."""
    proxy, url = proxied
    store = store_through(tmp_path, url, SUPABASE_POOL_TIMEOUT="0.3")
    await store.open()
    caller, stuck = new_caller(), new_caller()
    holders: list[asyncio.Future[None]] = []
    try:
        begun = await store.begin_run(caller, NewRun(new_id(), "hi", "hi"), TurnLimits(30, 3600), 10)
        assert begun.run is not None
        proxy.hang.add(stuck.user_id)
        holders = [asyncio.ensure_future(read(store, stuck)) for _ in range(POOL)]
        with anyio.fail_after(10):
            while proxy.held_back < POOL:
                await asyncio.sleep(0.01)
        with pytest.raises(UpstreamUnavailable) as busy:
            await read(store, caller)
        assert busy.value.code == "STORE_BUSY"
        update = RunUpdate(caller, begun.run.id, begun.run.assistant_message_id, heartbeat=True)
        assert (await store.flush_runs([update]))[begun.run.id].applied
    finally:
        proxy.drop_hung()
        await asyncio.gather(*holders, return_exceptions=True)
        await store.aclose()


# -- cost -----------------------------------------------------------------------------------------------------------


class ImportSearches:
    """A meta path finder that only records the modules Python searches for: an import of a module already loaded
    never reaches it, so anything it records is an import searched on the path again (a failed import is searched
    every time, each search a handful of stat calls)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        self.names.append(name)
        return None


async def test_store_requests_search_for_no_module(
    fake_postgrest: FakePostgrest, supabase_url: str, new_caller: Callable[[], Caller], tmp_path: Path
) -> None:
    # httpcore imports sniffio inside every lock, event and shield it creates (several per request); without
    # sniffio installed (requirements.txt pins it), each of those imports failed after searching the whole path,
    # about 50 us each, about 5% of the service's CPU in a 500-stream burst on the production store.
    store = store_through(tmp_path, supabase_url)
    caller = new_caller()
    searches = ImportSearches()
    try:
        await read(store, caller)  # anything imported lazily on a first request is imported here
        sys.meta_path.insert(0, searches)
        try:
            for _ in range(5):
                await read(store, caller)
        finally:
            sys.meta_path.remove(searches)
    finally:
        await store.aclose()
    assert searches.names == []
