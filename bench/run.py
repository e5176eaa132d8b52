"""Benchmark: one worker of the service next to the earlier design (baseline), the floor and the relay floor, and the
service on its production store (PostgREST and PostgreSQL) next to itself on SQLite.

Run from the repository root with the service's dependencies installed:

    .venv/bin/python bench/run.py            # the full run (about 15 minutes; creates bench/.venv-baseline first)
    .venv/bin/python bench/run.py --smoke    # a few streams, under a minute; service, floor, relay and production;
                                             # judges no target
    .venv/bin/python bench/run.py --targets production   # the production figures alone, with the SQLite service's
                                                          # figures they are compared with (a few minutes)
    .venv/bin/python bench/run.py --targets production --figures streams_500   # one figure, of each target

Everything runs on 127.0.0.1. For every figure a fresh server is started on core 0 (``taskset``-style affinity)
with a fresh fake Bedrock (``bench/fake_upstream.py``) on core 1, where this process (the load generator,
``bench/loadgen.py``) runs too. Targets:

- service: ``python app.py`` as the README runs it: SQLite in a temporary directory, HS256 auth on
  (``SUPABASE_JWT_SECRET``; every request carries a token minted here), ``LLM_PROVIDER=bedrock`` with
  ``BEDROCK_ENDPOINT_URL`` on the fake and dummy ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``. Rate limits are
  raised so they never refuse (they are still counted in the store on every request).
- baseline: ``bench/baseline_app.py`` (FastAPI + boto3 in default-executor threads) in bench/.venv-baseline.
- floor: ``bench/floor_app.py`` (a bare Starlette ``StreamingResponse``, no upstream, store or auth).
- relay: the relay floor, ``bench/relay_floor_app.py``: a bare Starlette app that signs one ConverseStream call per
  request with botocore, sends it on a pooled keep-alive asyncio connection to the same fake, decodes it with
  botocore's ``EventStreamBuffer`` and sends one SSE event per network read (no auth, store or httpx). The least
  any relay of this design can cost; the targets judge the service against it.
- production: the same ``python app.py`` with ``STORE=supabase``: its store is PostgREST over httpx as the signed-in
  user, the SQL functions of migrations/*.sql, and one keyed ``agent_runs_flush`` per 250 ms for up to 500 runs.
  PostgreSQL is ``tests/pg.py``'s cluster (one per run, started from this process so it shares core 1; each figure
  gets a fresh copy of a database with Supabase's roles and auth schema, every migration, and the write ceiling
  raised as the rate limits are), and PostgREST is ``bench/postgrest_standin.py`` (``tests/fake_postgrest.py``
  under uvicorn in a process of its own on core 1), which counts the connections and requests it serves. Users are
  registered in ``auth.users`` and their HS256 tokens carry Supabase's issuer. Same fake Bedrock. Asking for it
  alone runs the service too, but only figures 1 and 3 at ``production_streams``, the figures it is compared with.

Figures: (1) time to first token at one stream, upstream answering at once; (2) server CPU per 1,000 tokens and
tokens/s relaying 50 concurrent unpaced streams of 400 tokens; (3) 100..5,000 streams opened at once against an
upstream with 200 ms to first token and 20 tokens 100 ms apart: completed, TTFT p50/p99, p99 of the extra gap
between tokens, server memory per open stream, server CPU per turn (at 500 too when production runs); (4)
requests/s for list and get with 10,000 stored conversations. The production target runs (1) and (3) at 500, and:
(5) 1, 10, 100 and 500 users streaming a ~8 s answer each, opened at once: PostgREST requests by route (begin,
flush, other) per turn and per second, flush requests a second while every one of them streams, TCP connections
accepted against requests served; (6) 10 and 60 new turns a second for 10 s: every turn completes, flush requests
per turn at each rate; (7) at 500 streams, the duration of every flush round at the stand-in (p99, max) and in the
service's own histogram, and the stand-in's and PostgreSQL's CPU per turn. None of these is timed in a unit test.
The table is printed and written with the raw numbers to bench/results/<timestamp>.{txt,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The fake upstream and the service run on this interpreter's packages: say so up front, not in a log file later.
_MISSING = [name for name in ("anyio", "botocore", "httpx", "starlette", "uvicorn") if not importlib.util.find_spec(name)]
if _MISSING:
    raise SystemExit(
        f"bench: {', '.join(_MISSING)} not installed for {sys.executable}. Run it with the service's virtualenv: "
        ".venv/bin/python bench/run.py (after .venv/bin/pip install -r requirements.txt)"
    )

import httpx  # noqa: E402

from bench import loadgen, procs  # noqa: E402
from bench.loadgen import StreamResult  # noqa: E402
from tests.tokens import mint  # noqa: E402

BENCH = Path(__file__).resolve().parent
BASELINE_VENV = BENCH / ".venv-baseline"
BASELINE_PYTHON = BASELINE_VENV / "bin" / "python"
JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
PUBLISHABLE_KEY = "sb_publishable_bench_key"
METRICS_TOKEN = "bench-metrics-token-0123456789"
TARGETS = ("service", "baseline", "floor", "relay", "production")
MESSAGE = "What invoices do I have?"
# The database's own ceiling on one user's writes a minute (007, canvalo_private.settings), raised as the service's
# rate limits are: figure 1 sends 330 turns as one user.
WRITES_PER_MINUTE = 1_000_000_000
TEMPLATE_DATABASE = "bench_template"


@dataclass(frozen=True)
class Upstream:
    ttft: float
    tokens: int
    interval: float


@dataclass(frozen=True)
class Plan:
    ttft_requests: int = 300
    ttft_warmup: int = 30
    relay_streams: int = 50
    relay_tokens: int = 400
    levels: tuple[int, ...] = (100, 1000, 3000, 5000)
    paced: Upstream = Upstream(0.2, 20, 0.1)
    stream_timeout: float = 120.0
    conversations: int = 10_000
    api_seconds: float = 5.0
    api_connections: int = 32
    # The production target's own figures (PostgREST stand-in + PostgreSQL); see the module docstring.
    production_streams: int = 500
    request_levels: tuple[int, ...] = (1, 10, 100, 500)
    # Answers of ~8.2 s: long enough that every stream of a level is streaming at once for a while, after the last
    # one began and before the first one ends (at 500 users the last begins seconds after the first).
    request_upstream: Upstream = Upstream(0.2, 80, 0.1)
    arrival_rates: tuple[int, ...] = (10, 60)
    arrival_seconds: float = 10.0


SMOKE = Plan(
    ttft_requests=5,
    ttft_warmup=2,
    relay_streams=3,
    relay_tokens=20,
    levels=(5,),
    paced=Upstream(0.05, 5, 0.02),
    stream_timeout=20.0,
    conversations=100,
    api_seconds=0.3,
    api_connections=4,
    production_streams=5,
    request_levels=(3,),
    request_upstream=Upstream(0.05, 5, 0.02),
    arrival_rates=(8,),
    arrival_seconds=0.5,
)


@dataclass
class Context:
    plan: Plan
    work: Path  # temporary directory: databases, logs of this run
    logs: Path
    targets: list[str] = field(default_factory=list)
    template_db: Path | None = None
    api_user: str = ""
    api_ids: list[str] = field(default_factory=list)
    comparison_only: bool = False  # the service runs only what the production target is compared with
    cluster: Any = None  # tests.pg.Cluster, started once for the production target
    pinning: dict[str, str] = field(default_factory=dict)  # where each process of the production target may run
    standin_server: str | None = None  # the stand-in's event loop and HTTP parser
    figures: tuple[str, ...] = ()  # only these figures (by name, e.g. "streams_500"); every one when empty


# -- servers -------------------------------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    return {k: os.environ[k] for k in keep if k in os.environ} | {"PYTHONUNBUFFERED": "1"}


def aws_env(work: Path) -> dict[str, str]:
    """Dummy credentials the fake does not verify; no profile, config file or instance metadata is consulted."""
    return {
        "AWS_ACCESS_KEY_ID": "AKIDBENCHMARKFAKE000",
        "AWS_SECRET_ACCESS_KEY": "bench-secret-access-key-not-a-real-one",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(work / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(work / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def service_command(ctx: Context, port: int, fake_port: int, store: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``python app.py`` with ``store``'s settings (SQLite's file, or Supabase's URL and key)."""
    env = base_env() | aws_env(ctx.work) | store | {
        "ENVIRONMENT": "development",
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "SUPABASE_JWT_SECRET": JWT_SECRET,
        "METRICS_TOKEN": METRICS_TOKEN,
        "LLM_PROVIDER": "bedrock",
        "BEDROCK_ENDPOINT_URL": f"http://127.0.0.1:{fake_port}",
        "RATE_LIMIT_CHAT_PER_MINUTE": "100000000",
        "RATE_LIMIT_API_PER_MINUTE": "100000000",
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    return [sys.executable, "app.py"], env


def baseline_command(ctx: Context, port: int, fake_port: int, db: Path) -> tuple[list[str], dict[str, str]]:
    command = [str(BASELINE_PYTHON), "bench/baseline_app.py", "--port", str(port)]
    command += ["--endpoint", f"http://127.0.0.1:{fake_port}", "--db", str(db)]
    return command, base_env() | aws_env(ctx.work)


def floor_command(port: int, upstream: Upstream) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "bench/floor_app.py", "--port", str(port), "--ttft", str(upstream.ttft)]
    command += ["--tokens", str(upstream.tokens), "--interval", str(upstream.interval)]
    return command, base_env()


def relay_command(ctx: Context, port: int, fake_port: int) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "bench/relay_floor_app.py", "--port", str(port)]
    command += ["--endpoint", f"http://127.0.0.1:{fake_port}"]
    return command, base_env() | aws_env(ctx.work)


@dataclass(frozen=True)
class Served:
    """A started server of one target, as the figures use it: where it listens, its pid, and for the production target
    the database its users must exist in, the token issuer it checks and the stand-in that counts its requests."""

    port: int
    pid: int
    cluster: Any = None
    database: str = ""
    issuer: str | None = None
    standin: procs.Standin | None = None

    def new_users(self, count: int) -> list[str]:
        """``count`` fresh user ids; on the production target registered in auth.users (Supabase Auth's job)."""
        users = [str(uuid.uuid4()) for _ in range(count)]
        if self.cluster is not None:
            with self.cluster.connect(self.database) as db:
                db.execute("insert into auth.users (id) select unnest(%s::uuid[])", (users,))
        return users

    def chat_request(self, user_id: str) -> bytes:
        body = {"message": MESSAGE, "conversation_id": str(uuid.uuid4()), "user_id": user_id, "history": []}
        token = mint(user_id, JWT_SECRET, issuer=self.issuer, lifetime=3600)
        return loadgen.post(self.port, "/api/chat/stream", body, token)


@contextmanager
def server(ctx: Context, target: str, upstream: Upstream, name: str, db: Path | None = None) -> Iterator[Served]:
    """A fresh fake upstream and a fresh server of ``target`` (for production, a fresh database and stand-in too)."""
    if target == "production":
        with production_server(ctx, upstream, name) as served:
            yield served
        return
    db = db or ctx.work / f"{target}-{name}-{uuid.uuid4().hex[:6]}.db"
    log = ctx.logs / f"{target}-{name}.log"
    with procs.fake_upstream(upstream.ttft, upstream.tokens, upstream.interval, ctx.logs / f"fake-{name}.log") as fake:
        port = procs.free_port()
        if target == "service":
            command, env = service_command(ctx, port, fake, {"STORE": "sqlite", "SQLITE_PATH": str(db)})
        elif target == "baseline":
            command, env = baseline_command(ctx, port, fake, db)
        elif target == "relay":
            command, env = relay_command(ctx, port, fake)
        else:
            command, env = floor_command(port, upstream)
        with procs.launch(command, env, port, log) as proc:
            yield Served(port, proc.pid)


@contextmanager
def production_server(ctx: Context, upstream: Upstream, name: str) -> Iterator[Served]:
    """The service with ``STORE=supabase`` against a fresh PostgREST stand-in over a fresh database of the run's
    PostgreSQL cluster (tests/pg.py: Supabase's roles and auth schema, every migration, the run secret), and a fresh
    fake Bedrock."""
    from tests.pg import RUN_SECRET

    cluster = ctx.cluster
    assert cluster is not None, "the production target starts its PostgreSQL cluster in main()"
    database = f"bench_{name.replace('-', '_')}_{uuid.uuid4().hex[:6]}"
    create_database(cluster, database)
    standin_log = ctx.logs / f"standin-{name}.log"
    fake_log = ctx.logs / f"fake-{name}.log"
    try:
        with (
            procs.fake_upstream(upstream.ttft, upstream.tokens, upstream.interval, fake_log) as fake,
            procs.postgrest_standin(
                cluster.socket_dir, cluster.port, database, JWT_SECRET, PUBLISHABLE_KEY, standin_log
            ) as standin,
        ):
            port, url = procs.free_port(), f"http://127.0.0.1:{standin.port}"
            store = {"STORE": "supabase", "SUPABASE_URL": url, "SUPABASE_PUBLISHABLE_KEY": PUBLISHABLE_KEY,
                     "SUPABASE_RUN_SECRET": RUN_SECRET}
            command, env = service_command(ctx, port, fake, store)
            with procs.launch(command, env, port, ctx.logs / f"production-{name}.log") as proc:
                served = Served(port, proc.pid, cluster, database, f"{url}/auth/v1", standin)
                record_pinning(ctx, served)
                yield served
    finally:
        with cluster.connect() as admin:
            admin.execute(f'drop database if exists "{database}" with (force)')


def create_template(cluster: Any) -> None:
    """The database every production figure copies: as a Supabase project has it, with every migration, and the
    write ceiling raised (the service's rate limits are too), since the benchmark's users write far faster than any
    person. Copying it takes a fraction of the time of migrating each database."""
    from tests.pg import create_supabase_database

    create_supabase_database(cluster, TEMPLATE_DATABASE)
    with cluster.connect(TEMPLATE_DATABASE) as db:
        db.execute("update canvalo_private.settings set value = %s where name = 'writes_per_minute'",
                   (WRITES_PER_MINUTE,))


def create_database(cluster: Any, database: str) -> None:
    with cluster.connect() as admin:
        admin.execute(f'create database "{database}" template "{TEMPLATE_DATABASE}"')


def record_pinning(ctx: Context, served: Served) -> None:
    """Where each process of the production target may run, read from /proc (the report shows it)."""
    if ctx.pinning or served.standin is None:
        return
    ctx.pinning = {
        "service": procs.affinity(served.pid),
        "postgresql": procs.affinity(procs.postmaster_pid(ctx.cluster.socket_dir, ctx.cluster.port)),
        "postgrest_standin": procs.affinity(served.standin.pid),
        "load_generator": procs.affinity(os.getpid()),
    }
    ctx.standin_server = served.standin.server


# -- requests ------------------------------------------------------------------------------------------------------


async def stream_batch(served: Served, count: int, timeout: float) -> tuple[list[StreamResult], float]:
    """``count`` streams opened at once on connections opened beforehand; (results, seconds from send to last end)."""
    # Users registered and tokens minted before the clock starts.
    requests = [served.chat_request(user) for user in served.new_users(count)]
    clients = await loadgen.open_clients(served.port, count)
    try:
        started = time.perf_counter()
        results = await loadgen.run_streams(clients, requests, timeout)
        ends = [r.finished for r in results if r.finished is not None]
        return results, (max(ends) if ends else time.perf_counter()) - started
    finally:
        loadgen.close_all(clients)


class MemoryWatch:
    """Samples a pid's RSS every 20 ms in the background; ``peak`` is the largest value seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = procs.rss_bytes(pid)
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, procs.rss_bytes(self.pid))
            await asyncio.sleep(0.02)

    def __enter__(self) -> MemoryWatch:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, procs.rss_bytes(self.pid))


# -- statistics ----------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; ``inf`` entries (never happened within the time limit) sort last."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def ttfts(results: list[StreamResult]) -> list[float]:
    return [r.first_token - r.sent if r.first_token is not None else math.inf for r in results]


def extra_gaps(results: list[StreamResult], interval: float) -> list[float]:
    """Per stream, for each token event after the first: its gap to the previous event minus the upstream interval.

    Tokens that arrive together in one event count once, so a stall shows as one long gap instead of being hidden
    among the zero gaps of the tokens merged behind it.
    """
    gaps: list[float] = []
    for result in results:
        times = [arrived for arrived, _ in result.token_events]
        gaps.extend(later - earlier - interval for earlier, later in zip(times, times[1:]))
    return gaps


def errors(results: list[StreamResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in results:
        if not result.ok:
            key = result.error or f"HTTP {result.status}"
            counts[key] = counts.get(key, 0) + 1
    return counts


# -- figures -------------------------------------------------------------------------------------------------------


async def figure_ttft(ctx: Context, target: str) -> dict[str, Any]:
    """Figure 1: one stream at a time, upstream answers at once; TTFT from request written to first token read."""
    plan = ctx.plan
    with server(ctx, target, Upstream(0.0, 5, 0.0), "ttft") as served:
        [user_id] = served.new_users(1)
        requests = [served.chat_request(user_id) for _ in range(plan.ttft_warmup + plan.ttft_requests)]
        client = (await loadgen.open_clients(served.port, 1))[0]
        try:
            results = [await loadgen.one_stream(client, raw, 10.0) for raw in requests]
        finally:
            loadgen.close_all([client])
    measured = results[plan.ttft_warmup :]
    values = ttfts(measured)
    return {
        "requests": len(measured),
        "ok": sum(r.ok for r in measured),
        "errors": errors(measured),
        "ttft_p50_ms": _ms(percentile(values, 50)),
        "ttft_p99_ms": _ms(percentile(values, 99)),
    }


async def figure_relay(ctx: Context, target: str) -> dict[str, Any]:
    """Figure 2: 50 concurrent streams of 400 unpaced tokens; server CPU from /proc around the measured batch."""
    plan = ctx.plan
    with server(ctx, target, Upstream(0.0, plan.relay_tokens, 0.0), "relay") as served:
        await stream_batch(served, min(5, plan.relay_streams), 60.0)  # warm-up: imports, pools, caches
        cpu_before = procs.cpu_seconds(served.pid)
        results, wall = await stream_batch(served, plan.relay_streams, plan.stream_timeout)
        cpu = procs.cpu_seconds(served.pid) - cpu_before
    tokens = sum(r.tokens for r in results)
    return {
        "streams": len(results),
        "ok": sum(r.ok for r in results),
        "errors": errors(results),
        "tokens": tokens,
        "server_cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "cpu_s_per_1000_tokens": round(cpu / tokens * 1000, 5) if tokens else None,
        "tokens_per_s": round(tokens / wall) if wall > 0 else None,
        "sse_events_per_stream": round(sum(r.events for r in results) / max(1, len(results)), 1),
    }


async def figure_concurrency(ctx: Context, target: str, count: int) -> dict[str, Any]:
    """Figure 3: ``count`` streams opened at once against the paced upstream; memory from /proc during the run. On
    the production target, also what the service asked of PostgREST meanwhile (``StoreWatch``)."""
    plan = ctx.plan
    with server(ctx, target, plan.paced, f"streams-{count}") as served:
        await stream_batch(served, min(10, count), 60.0)
        rss_before = procs.rss_bytes(served.pid)
        cpu_before = procs.cpu_seconds(served.pid)
        watch = await StoreWatch.start(served)
        with MemoryWatch(served.pid) as memory:
            results, wall = await stream_batch(served, count, plan.stream_timeout)
        cpu = procs.cpu_seconds(served.pid) - cpu_before
        store = await watch.finish(results, wall)
    completed = [r for r in results if r.ok]
    values = ttfts(results)
    gaps = extra_gaps(completed, plan.paced.interval)
    return {
        "streams": count,
        "completed": len(completed),
        "errors": errors(results),
        "wall_s": round(wall, 2),
        "server_cpu_s": round(cpu, 2),
        "ttft_p50_s": _s(percentile(values, 50)),
        "ttft_p99_s": _s(percentile(values, 99)),
        "extra_gap_p99_s": _s(percentile(gaps, 99)),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_peak_mb": round(memory.peak / 2**20, 1),
        "kb_per_stream": round((memory.peak - rss_before) / 1024 / count, 1),
        "cpu_ms_per_turn": round(cpu / count * 1000, 2),
        **store,
    }


async def figure_api(ctx: Context, target: str) -> dict[str, Any]:
    """Figure 4: list and get over keep-alive connections, 10,000 stored conversations for the caller."""
    plan = ctx.plan
    assert ctx.template_db is not None
    db = ctx.work / f"{target}-api.db"
    shutil.copy(ctx.template_db, db)
    user, ids = ctx.api_user, ctx.api_ids
    token = mint(user, JWT_SECRET, lifetime=3600)
    with server(ctx, target, Upstream(0.0, 5, 0.0), "api", db=db) as served:
        port = served.port
        clients = await loadgen.open_clients(port, plan.api_connections)
        try:
            list_path = f"/api/conversations?user_id={user}&limit=50"
            def listing(i: int) -> bytes:
                return loadgen.get(port, list_path, token)
            def getting(i: int) -> bytes:
                return loadgen.get(port, f"/api/conversations/{ids[i % len(ids)]}?user_id={user}", token)
            await loadgen.run_requests(clients, listing, 0.5, 200)  # warm-up
            await loadgen.run_requests(clients, getting, 0.5, 200)
            listed = await loadgen.run_requests(clients, listing, plan.api_seconds, 1_000_000)
            got = await loadgen.run_requests(clients, getting, plan.api_seconds, 1_000_000)
            deep = await _deep_pages(ctx, port, clients, token) if target == "service" else {}
        finally:
            loadgen.close_all(clients)
    return {
        "conversations": plan.conversations,
        "connections": plan.api_connections,
        "list_rps": round(listed.rps),
        "list_failed": listed.failed,
        "get_rps": round(got.rps),
        "get_failed": got.failed,
        **deep,
    }


async def _deep_pages(ctx: Context, port: int, clients: list[loadgen.Client], token: str) -> dict[str, Any]:
    """Figure 4, the service only (the others have no cursors): the page halfway down the list, by offset and by the
    cursor of the page above it, as a client scrolling down reads it."""
    plan, user, size = ctx.plan, ctx.api_user, 50
    offset = max(size, plan.conversations // 2 // size * size)
    above = f"http://127.0.0.1:{port}/api/conversations?user_id={user}&limit={size}&offset={offset - size}"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client:
        cursor = (await client.get(above)).json()["before_cursor"]
    paths = {
        "list_deep_offset": f"/api/conversations?user_id={user}&limit={size}&offset={offset}",
        "list_deep_cursor": f"/api/conversations?user_id={user}&limit={size}&before={cursor}",
    }
    out: dict[str, Any] = {"deep_offset": offset}
    for name, path in paths.items():
        request = loadgen.get(port, path, token)
        await loadgen.run_requests(clients, lambda i, request=request: request, 0.5, 200)  # warm-up
        stats = await loadgen.run_requests(clients, lambda i, request=request: request, plan.api_seconds, 1_000_000)
        out[f"{name}_rps"], out[f"{name}_failed"] = round(stats.rps), stats.failed
    return out


# -- the production target's own figures -------------------------------------------------------------------------

FLUSH_BUCKETS = 'canvalo_store_query_duration_seconds_bucket{store="supabase",operation="flush_runs",le="'


class StoreWatch:
    """What a batch cost beside the service's own CPU: how busy each core was (every process on it, ours or not), and
    on the production target what the service asked of PostgREST, counted at the stand-in, with the CPU of the
    stand-in and of PostgreSQL and the service's own histogram of its flush rounds."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.cores = procs.core_times()
        self.histogram: dict[str, float] = {}
        self.helpers = (0.0, 0.0)

    @classmethod
    async def start(cls, served: Served) -> StoreWatch:
        watch = cls(served)
        if served.standin is not None:
            watch.histogram = await flush_histogram(served.port)
            await served.standin.reset()
            watch.helpers = helpers_cpu(served)
        watch.cores = procs.core_times()
        return watch

    async def finish(self, results: list[StreamResult], wall: float) -> dict[str, Any]:
        out: dict[str, Any] = {"cores_busy_pct": procs.busy_percent(self.cores, procs.core_times())}
        standin = self.served.standin
        if standin is None:
            return out
        standin_cpu, postgres_cpu = (b - a for a, b in zip(self.helpers, helpers_cpu(self.served)))
        stats = await standin.stats()
        histogram = await flush_histogram(self.served.port)
        turns = len(results)
        rounds = _delta(histogram, self.histogram, "+Inf")
        return out | request_figures(stats, turns, wall) | streaming_flushes(stats["requests"], results) | {
            "service_flush_rounds": rounds,
            "service_flush_rounds_over_1s": rounds - _delta(histogram, self.histogram, "1.0"),
            "standin_cpu_ms_per_turn": round(standin_cpu / turns * 1000, 2) if turns else None,
            "postgres_cpu_ms_per_turn": round(postgres_cpu / turns * 1000, 2) if turns else None,
            # What core 1 had to do for the batch besides the fake and the load generator: the least time it takes
            # to begin every turn, whatever the service does.
            "helpers_cpu_s": round(standin_cpu + postgres_cpu, 2),
        }


def helpers_cpu(served: Served) -> tuple[float, float]:
    """CPU seconds so far of the stand-in and of the whole PostgreSQL cluster."""
    assert served.standin is not None
    cluster = served.cluster
    return procs.cpu_seconds(served.standin.pid), procs.postgres_cpu_seconds(cluster.socket_dir, cluster.port)


async def flush_histogram(port: int) -> dict[str, float]:
    """The service's own record of its flush rounds, one observation per round whatever requests it took: the
    cumulative buckets of ``canvalo_store_query_duration_seconds{store="supabase",operation="flush_runs"}``."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {METRICS_TOKEN}"}) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(FLUSH_BUCKETS):
            bound, _, value = line[len(FLUSH_BUCKETS) :].partition('"} ')
            buckets[bound] = float(value)
    return buckets


def _delta(after: dict[str, float], before: dict[str, float], bound: str) -> int:
    return round(after.get(bound, 0.0) - before.get(bound, 0.0))


def request_figures(stats: dict[str, Any], turns: int, wall: float) -> dict[str, Any]:
    """Requests the stand-in served since the watch started, by route, per turn and per second of the batch; the
    flush requests' durations at the stand-in (receipt to the end of the answer) and the runs each carried; the TCP
    connections it accepted."""
    requests = stats["requests"]
    out: dict[str, Any] = {}
    for route in ("begin", "flush", "other"):
        count = sum(1 for r in requests if r[0] == route)
        out[f"{route}_requests"] = count
        out[f"{route}_per_turn"] = round(count / turns, 3) if turns else None
        out[f"{route}_per_s"] = round(count / wall, 2) if wall > 0 else None
    flushes = [r for r in requests if r[0] == "flush"]
    durations = [r[3] for r in flushes]
    begins = [r[3] for r in requests if r[0] == "begin"]
    others: dict[str, int] = {}
    for r in requests:
        if r[0] == "other":
            others[r[1]] = others.get(r[1], 0) + 1
    return out | {
        "other_paths": others,
        "flush_p50_ms": _ms(percentile(durations, 50)),
        "flush_p99_ms": _ms(percentile(durations, 99)),
        "flush_max_ms": _ms(max(durations)) if durations else None,
        "begin_p50_ms": _ms(percentile(begins, 50)),
        "begin_p99_ms": _ms(percentile(begins, 99)),
        "runs_per_flush_max": max((r[4] for r in flushes), default=0),
        "requests_served": len(requests),
        "connections_accepted": stats["accepted"],
        "connections_max_open": stats["max_open"],
    }


def streaming_flushes(requests: list[list[Any]], results: list[StreamResult]) -> dict[str, Any]:
    """Flush requests a second while every stream of a batch was streaming: from the last first token to 0.1 s before
    the first last token, when no turn was beginning and none ending (a run's end is flushed at once: runs.py
    ``_end``), so only the periodic flushes remain."""
    done = [r for r in results if r.ok and r.token_events]
    if not done:
        return {"streaming_window_s": None, "flush_per_s_streaming": None}
    start = max(r.token_events[0][0] for r in done)
    end = min(r.token_events[-1][0] for r in done) - 0.1
    if end - start < 0.5:
        return {"streaming_window_s": round(max(0.0, end - start), 3), "flush_per_s_streaming": None}
    count = sum(1 for r in requests if r[0] == "flush" and start <= r[2] < end)
    return {"streaming_window_s": round(end - start, 2), "flush_per_s_streaming": round(count / (end - start), 2)}


async def figure_requests(ctx: Context, target: str, users: int) -> dict[str, Any]:
    """Production figure 5: ``users`` users each stream one answer of ~8 s, all opened at once; what the service asked
    of PostgREST meanwhile (requests by route per turn and per second, flushes a second while all of them streamed)
    and the TCP connections it took, counted at the stand-in."""
    plan = ctx.plan
    with server(ctx, target, plan.request_upstream, f"requests-{users}") as served:
        await stream_batch(served, 1, 60.0)  # warm-up: imports, the pool's first connection
        cpu_before = procs.cpu_seconds(served.pid)
        watch = await StoreWatch.start(served)
        results, wall = await stream_batch(served, users, plan.stream_timeout)
        cpu = procs.cpu_seconds(served.pid) - cpu_before
        store = await watch.finish(results, wall)
    return {
        "users": users,
        "completed": sum(r.ok for r in results),
        "errors": errors(results),
        "wall_s": round(wall, 2),
        "ttft_p99_s": _s(percentile(ttfts(results), 99)),
        "cpu_ms_per_turn": round(cpu / users * 1000, 2),
        **store,
    }


async def figure_arrivals(ctx: Context, target: str, rate: int) -> dict[str, Any]:
    """Production figure 6: ``rate`` new turns a second for ``arrival_seconds``, each a new user on a connection of its
    own opened just before its turn, against the paced upstream (an open arrival process: turns begin and end all the time)."""
    plan = ctx.plan
    count = max(1, round(rate * plan.arrival_seconds))
    with server(ctx, target, plan.paced, f"arrivals-{rate}") as served:
        await stream_batch(served, 1, 60.0)  # warm-up
        requests = [served.chat_request(user) for user in served.new_users(count)]
        cpu_before = procs.cpu_seconds(served.pid)
        watch = await StoreWatch.start(served)
        results = await loadgen.run_arrivals(served.port, requests, rate, plan.stream_timeout)
        cpu = procs.cpu_seconds(served.pid) - cpu_before
        first = min(r.sent for r in results if r.sent)
        wall = max((r.finished or time.perf_counter()) for r in results) - first
        store = await watch.finish(results, wall)
    spread = max(r.sent for r in results) - first
    return {
        "rate": rate,
        "turns": count,
        "achieved_rate": round((count - 1) / spread, 1) if spread > 0 else None,
        "completed": sum(r.ok for r in results),
        "errors": errors(results),
        "wall_s": round(wall, 2),
        "ttft_p50_s": _s(percentile(ttfts(results), 50)),
        "ttft_p99_s": _s(percentile(ttfts(results), 99)),
        "cpu_ms_per_turn": round(cpu / count * 1000, 2),
        **store,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else (math.inf if math.isinf(value) else round(value * 1000, 2))


def _s(value: float | None) -> float | None:
    return None if value is None else (math.inf if math.isinf(value) else round(value, 3))


def _finite(value: Any) -> Any:
    """JSON has no infinity: a time that never came within the limit is written as the string "never"."""
    if isinstance(value, float) and math.isinf(value):
        return "never"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# -- seeding -------------------------------------------------------------------------------------------------------


def seed_conversations(ctx: Context) -> None:
    """The service's own schema (its store migrates a new file), then 10,000 conversations of 2 messages each."""
    from services.store.sqlite import listing as sqlite_listing
    from services.store.sqlite.store import SQLiteStore

    path = ctx.work / "template.db"

    async def migrate() -> None:
        store = SQLiteStore(str(path))
        await store.open()
        await store.aclose()

    asyncio.run(migrate())
    user = str(uuid.uuid4())
    ids = [str(uuid.uuid4()) for _ in range(ctx.plan.conversations)]
    # Closed, not only committed: the file is copied next, and the rows reach it from the WAL only when the last
    # connection closes (an unclosed sqlite3 connection waits for the cyclic garbage collector to close it).
    with closing(sqlite3.connect(path)) as db, db:
        # The search index's triggers call this function, which the store registers on each of its own connections.
        db.create_function(sqlite_listing.WORDS_FUNCTION, 2, sqlite_listing.indexed_words, deterministic=True)
        base = time.time() - len(ids)
        stamps = [time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(base + i)) + ".000000Z" for i in range(len(ids))]
        db.executemany(
            "INSERT INTO agent_conversations (id, user_id, title, created_at, updated_at, last_message_at,"
            " message_count, metadata) VALUES (?, ?, 'AI Chat', ?, ?, NULL, 0, '{}')",
            [(cid, user, stamp, stamp) for cid, stamp in zip(ids, stamps)],
        )
        rows, leaves = [], []
        for cid, stamp in zip(ids, stamps):  # one turn each: a question and its answer, the conversation's branch
            question, answer = str(uuid.uuid4()), str(uuid.uuid4())
            rows.append((question, cid, "user", MESSAGE, None, stamp, None))
            rows.append((answer, cid, "assistant", loadgen.TOKEN * 20, "supervisor", stamp, question))
            leaves.append((answer, cid))
        db.executemany(
            "INSERT INTO agent_messages (id, conversation_id, role, content, agent_type, metadata, created_at,"
            " parent_id) VALUES (?, ?, ?, ?, ?, '{}', ?, ?)",
            rows,
        )
        db.executemany("UPDATE agent_conversations SET active_leaf_id = ? WHERE id = ?", leaves)
    ctx.template_db, ctx.api_user, ctx.api_ids = path, user, ids


# -- the run -------------------------------------------------------------------------------------------------------

Figure = Callable[[Context, str], Any]


Step = tuple[str, Callable[[], Any]]


def steps_of(ctx: Context, target: str) -> list[Step]:
    """The figures of ``target``, in order. The production target is compared with the SQLite service at
    ``production_streams``: the service runs that level too, and only that and figure 1 when it was not asked for."""
    plan = ctx.plan
    compared = f"streams_{plan.production_streams}"
    ttft: Step = ("ttft", lambda: figure_ttft(ctx, target))
    streams: Step = (compared, lambda: figure_concurrency(ctx, target, plan.production_streams))
    if target == "production":
        steps = [ttft, streams]
        steps += [(f"requests_{n}", lambda n=n: figure_requests(ctx, target, n)) for n in plan.request_levels]
        return steps + [(f"arrivals_{r}", lambda r=r: figure_arrivals(ctx, target, r)) for r in plan.arrival_rates]
    if target == "service" and ctx.comparison_only:
        return [ttft, streams]
    steps = [ttft, ("relay", lambda: figure_relay(ctx, target))]
    steps += [(f"streams_{n}", lambda n=n: figure_concurrency(ctx, target, n)) for n in plan.levels]
    if target == "service" and "production" in ctx.targets and plan.production_streams not in plan.levels:
        steps.append(streams)
    return steps + [("api", lambda: figure_api(ctx, target))]


async def run_target(ctx: Context, target: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, step in steps_of(ctx, target):
        if ctx.figures and name not in ctx.figures:
            continue
        began = time.monotonic()
        try:
            out[name] = await step()
        except Exception as exc:  # noqa: BLE001 - one failed figure must not lose the others; it is reported
            out[name] = {"failed": f"{type(exc).__name__}: {exc}"}
        print(f"  {target:8} {name:13} {time.monotonic() - began:6.1f} s  {json.dumps(out[name])}", flush=True)
    return out


def ensure_baseline_venv() -> bool:
    """Create bench/.venv-baseline from bench/requirements-baseline.txt if it is missing; False if that fails."""
    if BASELINE_PYTHON.exists():
        return True
    print(f"Creating {BASELINE_VENV.relative_to(procs.REPO)} (FastAPI, boto3, uvicorn; once) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(BASELINE_VENV)], check=True)
        pip = [str(BASELINE_PYTHON), "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements-baseline.txt")]
        subprocess.run(pip, check=True)
    except subprocess.CalledProcessError as exc:
        print(f"Could not create the baseline's virtual environment: {exc}", flush=True)
        return False
    return True


def ensure_standin_packages() -> None:
    """Install bench/requirements-standin.txt into procs.STANDIN_PACKAGES if it is missing (the stand-in runs on
    asyncio and h11 if that fails, and the report says which it ran on)."""
    if procs.STANDIN_PACKAGES.is_dir():
        return
    print(f"Installing {procs.STANDIN_PACKAGES.relative_to(procs.REPO)} (uvloop, httptools for the stand-in; once) ...",
          flush=True)
    target = str(procs.STANDIN_PACKAGES)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--target", target]
    pip += ["-r", str(BENCH / "requirements-standin.txt")]
    try:
        subprocess.run(pip, check=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(target, ignore_errors=True)
        print(f"Could not install the stand-in's packages: {exc}", flush=True)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    memory_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    server_core, bench_core = procs.cores()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "server_core": server_core,
        "bench_core": bench_core,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the service against the earlier design and the floors.")
    parser.add_argument("--smoke", action="store_true", help="a few streams, seconds: checks the script runs")
    parser.add_argument("--targets", help="comma-separated subset of service,baseline,floor,relay,production")
    parser.add_argument("--levels", help="comma-separated stream counts for figure 3 (default 100,1000,3000,5000)")
    parser.add_argument("--figures", help="comma-separated figure names to run (e.g. ttft,streams_500); default all")
    parser.add_argument("--stream-timeout", type=float, help="give up on a batch of streams after this (s)")
    parser.add_argument("--out", default=str(BENCH / "results"), help="directory for the table and JSON")
    return parser.parse_args(argv)


def choose_plan(args: argparse.Namespace) -> Plan:
    plan = SMOKE if args.smoke else Plan()
    if args.levels:
        plan = replace(plan, levels=tuple(int(n) for n in args.levels.split(",")))
    if args.stream_timeout:
        plan = replace(plan, stream_timeout=args.stream_timeout)
    return plan


def choose_targets(args: argparse.Namespace) -> tuple[list[str], bool]:
    """The targets in the order they run, and whether the service runs only as the production target's comparison."""
    default = "service,floor,relay,production" if args.smoke else ",".join(TARGETS)
    targets = [t.strip() for t in (args.targets or default).split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    comparison_only = "production" in targets and "service" not in targets
    if comparison_only:
        targets.insert(targets.index("production"), "service")
    if "production" in targets and not importlib.util.find_spec("psycopg"):
        raise SystemExit("bench: the production target needs psycopg (pip install -r requirements-test.txt)")
    if args.smoke and "baseline" not in targets:
        print("Smoke mode: no baseline (it needs bench/.venv-baseline; add --targets to include it).")
    if "production" in targets and not args.smoke:
        ensure_standin_packages()
    if "baseline" in targets and not ensure_baseline_venv():
        print("baseline: SKIPPED, its virtual environment could not be created.")
        targets.remove("baseline")
    return targets, comparison_only


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers, so every server and fake is stopped


def main(argv: list[str] | None = None) -> int:
    from bench import report

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    plan = choose_plan(args)
    procs.raise_fd_limit()
    procs.pin_self_to_bench_core()
    targets, comparison_only = choose_targets(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="canvalo-bench-") as tmp, ExitStack() as stack:
        ctx = Context(plan, Path(tmp), out_dir / f"logs-{stamp}", targets, comparison_only=comparison_only,
                      figures=tuple(f.strip() for f in (args.figures or "").split(",") if f.strip()))
        if "production" in targets:
            from tests.pg import start_cluster

            # Started from this process, so PostgreSQL inherits its core (the benchmark's); one cluster for the run,
            # a fresh database per figure.
            ctx.cluster = stack.enter_context(start_cluster(port=procs.free_port()))
            create_template(ctx.cluster)
        seed_conversations(ctx)
        print(f"Benchmark ({'smoke' if args.smoke else 'full'}): targets {', '.join(targets)}", flush=True)
        results = {target: asyncio.run(run_target(ctx, target)) for target in targets}
    machine_now = machine() | {"pinning": ctx.pinning, "standin_server": ctx.standin_server,
                               "load_before": load_before, "load_after": os.getloadavg()}
    document = {"machine": machine_now, "plan": asdict(plan), "smoke": args.smoke, "results": results}
    table = report.render(document)
    print()
    print(table)
    (out_dir / f"{stamp}.json").write_text(json.dumps(_finite(document), indent=2, default=str))
    (out_dir / f"{stamp}.txt").write_text(table + "\n")
    print(f"\nWritten: {out_dir / (stamp + '.txt')} and .json")
    return 0 if report.all_ran(document) else 1


if __name__ == "__main__":
    raise SystemExit(main())
