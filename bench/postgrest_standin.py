"""The PostgREST stand-in as a process of its own, for the benchmark's production target.

What: serves ``tests/fake_postgrest.FakePostgrest`` (PostgREST's HTTP protocol over a real PostgreSQL database, with
the real migrations and row-level security) with uvicorn on 127.0.0.1, and prints
``PORT <n> CONTROL <m> SERVER <loop+parser>`` once both ports listen. It counts what the service asks of it, as
PostgREST would see it on the wire: every TCP connection accepted (and the most open at once), and every request with
its route (``begin`` is ``rpc/agent_run_begin``, ``flush`` is ``rpc/agent_runs_flush``, anything else is ``other``),
path, start, duration and, for a flush, the number of runs it carried. The control port answers one line per
connection: ``STATS`` (the counts, one JSON line) or ``RESET`` (forget the requests and the connections accepted so
far; open ones stay open and count as open).

Why a control port apart from the served one: the harness reading the counts must not itself be counted.
Why a schema cache and a pool of 10 database connections (``FakePostgrest(schema_cache=True, db_pool=10)``): PostgREST
resolves functions from a schema cache, never per request, and holds a bounded pool (its default ``db-pool`` is 10);
without them the stand-in queried the catalog on every call and ran up to 50 sessions at once on one core, costs that
PostgREST does not have and that would be counted against the service.
Why ``TCP_NODELAY``: PostgREST's server (Warp) sets it, and without it every keep-alive response would wait ~40 ms
for a delayed acknowledgement (web/tcp.py), which PostgREST does not cost.
Why uvloop and httptools when they can be imported (``bench/.standin-packages``, which ``bench/run.py`` installs from
``bench/requirements-standin.txt`` and which only this process has on its path): PostgREST is compiled (Haskell,
Warp), and every millisecond the stand-in spends in a pure-Python event loop and HTTP parser is taken from the core it
shares with PostgreSQL and the load generator, so it is counted against the service. Measured: about 30% less of the
stand-in's CPU per begin (1,000 begins 20 at a time, the stand-in and PostgreSQL pinned to one core, three runs of
each interleaved: 1.49-1.77 ms with asyncio and h11, 1.08-1.26 ms with uvloop and httptools; bench/RESULTS.md).
Without them it runs on asyncio and h11, as in the tests, and the report says which it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn  # noqa: E402

from tests.fake_postgrest import FakePostgrest  # noqa: E402
from tests.pg import Cluster  # noqa: E402

try:
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as HttpProtocol
except ImportError:
    uvloop = None  # type: ignore[assignment]
    from uvicorn.protocols.http.h11_impl import H11Protocol as HttpProtocol  # type: ignore[assignment]

SERVER = "uvloop+httptools" if uvloop else "asyncio+h11"

ROUTES = {"/rest/v1/rpc/agent_run_begin": "begin", "/rest/v1/rpc/agent_runs_flush": "flush"}
# One per update in an agent_runs_flush body (services/postgrest.py ``_update_json``); hex keys never contain it,
# and a "run_id" would also match the metadata of a run's end.
UPDATE_MARK = b'"write_key"'

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class Counts:
    accepted: int = 0
    open: int = 0
    max_open: int = 0
    # (route, path, started, seconds, runs): perf_counter is CLOCK_MONOTONIC on Linux, the harness's clock too
    requests: list[tuple[str, str, float, float, int]] = field(default_factory=list)

    def reset(self) -> None:
        self.accepted, self.max_open = 0, self.open
        self.requests = []

    def as_json(self) -> bytes:
        keys = ("accepted", "open", "max_open", "requests")
        return json.dumps({key: getattr(self, key) for key in keys}).encode() + b"\n"


COUNTS = Counts()


class CountingProtocol(HttpProtocol):
    """Counts the connections uvicorn accepts, and turns Nagle off on each; one instance per connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        COUNTS.accepted += 1
        COUNTS.open += 1
        COUNTS.max_open = max(COUNTS.max_open, COUNTS.open)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        COUNTS.open -= 1
        super().connection_lost(exc)


class Timed:
    """Pure ASGI: each request's route, start and duration to the end of its response, and a flush's run count."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = ROUTES.get(path, "other")
        started = time.perf_counter()
        runs = 0

        async def counting_receive() -> Message:
            nonlocal runs
            message = await receive()
            if route == "flush" and message["type"] == "http.request":
                runs += message.get("body", b"").count(UPDATE_MARK)  # a mark split across chunks is not counted
            return message

        async def timing_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                COUNTS.requests.append((route, path, started, time.perf_counter() - started, runs))

        await self.app(scope, counting_receive, timing_send)


async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    command = (await reader.readline()).strip()
    if command == b"RESET":
        COUNTS.reset()
        writer.write(b"OK\n")
    else:
        writer.write(COUNTS.as_json())
    await writer.drain()
    writer.close()


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def serve(args: argparse.Namespace) -> None:
    fake = FakePostgrest(
        Cluster(args.socket_dir, args.pg_port), args.dbname, jwt_secret=args.jwt_secret,
        publishable_key=args.publishable_key, schema_cache=True, db_pool=args.db_pool,
    )
    config = uvicorn.Config(
        Timed(fake.app()), log_level="warning", access_log=False, lifespan="on", http=CountingProtocol,
        backlog=4096, timeout_keep_alive=args.keep_alive,
    )
    server = uvicorn.Server(config)
    sock = listening_socket()
    controller = await asyncio.start_server(control, "127.0.0.1", 0)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task  # raises what stopped it
            return
        await asyncio.sleep(0.01)
    print(f"PORT {sock.getsockname()[1]} CONTROL {controller.sockets[0].getsockname()[1]} SERVER {SERVER}", flush=True)
    async with controller:
        await task  # uvicorn stops on SIGTERM (its own signal handlers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket-dir", required=True, help="the PostgreSQL cluster's unix socket directory")
    parser.add_argument("--pg-port", type=int, required=True)
    parser.add_argument("--dbname", required=True)
    parser.add_argument("--jwt-secret", required=True)
    parser.add_argument("--publishable-key", required=True)
    # PostgREST's Warp keeps idle connections for 30 s; the service's pool drops its own after 5 s, before that.
    parser.add_argument("--keep-alive", type=int, default=30)
    # PostgREST's own default (db-pool = 10); Supabase sizes it by instance, 10-20 on the small ones.
    parser.add_argument("--db-pool", type=int, default=10)
    (uvloop.run if uvloop else asyncio.run)(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
