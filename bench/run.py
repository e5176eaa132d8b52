"""Benchmark: one worker of the service next to the earlier design (baseline), the floor and the relay floor.

Run from the repository root with the service's dependencies installed:

    .venv/bin/python bench/run.py            # the full run (about 10 minutes; creates bench/.venv-baseline first)
    .venv/bin/python bench/run.py --smoke    # a few streams, seconds; service, floor and relay; judges no target

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

Figures: (1) time to first token at one stream, upstream answering at once; (2) server CPU per 1,000 tokens and
tokens/s relaying 50 concurrent unpaced streams of 400 tokens; (3) 100..5,000 streams opened at once against an
upstream with 200 ms to first token and 20 tokens 100 ms apart: completed, TTFT p50/p99, p99 of the extra gap
between tokens, server memory per open stream; (4) requests/s for list and get with 10,000 stored conversations.
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
from contextlib import closing, contextmanager
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
TARGETS = ("service", "baseline", "floor", "relay")
MESSAGE = "What invoices do I have?"


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
)


@dataclass
class Context:
    plan: Plan
    work: Path  # temporary directory: databases, logs of this run
    logs: Path
    template_db: Path | None = None
    api_user: str = ""
    api_ids: list[str] = field(default_factory=list)


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


def service_command(ctx: Context, port: int, fake_port: int, db: Path) -> tuple[list[str], dict[str, str]]:
    env = base_env() | aws_env(ctx.work) | {
        "ENVIRONMENT": "development",
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "STORE": "sqlite",
        "SQLITE_PATH": str(db),
        "SUPABASE_JWT_SECRET": JWT_SECRET,
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


@contextmanager
def server(ctx: Context, target: str, upstream: Upstream, name: str, db: Path | None = None) -> Iterator[tuple[int, int]]:
    """A fresh fake upstream and a fresh server of ``target``; yields (server port, server pid)."""
    db = db or ctx.work / f"{target}-{name}-{uuid.uuid4().hex[:6]}.db"
    log = ctx.logs / f"{target}-{name}.log"
    with procs.fake_upstream(upstream.ttft, upstream.tokens, upstream.interval, ctx.logs / f"fake-{name}.log") as fake:
        port = procs.free_port()
        if target == "service":
            command, env = service_command(ctx, port, fake, db)
        elif target == "baseline":
            command, env = baseline_command(ctx, port, fake, db)
        elif target == "relay":
            command, env = relay_command(ctx, port, fake)
        else:
            command, env = floor_command(port, upstream)
        with procs.launch(command, env, port, log) as proc:
            yield port, proc.pid


# -- requests ------------------------------------------------------------------------------------------------------


def chat_request(port: int, user_id: str | None = None) -> bytes:
    user_id = user_id or str(uuid.uuid4())
    body = {"message": MESSAGE, "conversation_id": str(uuid.uuid4()), "user_id": user_id, "history": []}
    return loadgen.post(port, "/api/chat/stream", body, mint(user_id, JWT_SECRET, lifetime=3600))


async def stream_batch(port: int, count: int, timeout: float) -> tuple[list[StreamResult], float]:
    """``count`` streams opened at once on connections opened beforehand; (results, seconds from send to last end)."""
    requests = [chat_request(port) for _ in range(count)]  # tokens minted before the clock starts
    clients = await loadgen.open_clients(port, count)
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
    with server(ctx, target, Upstream(0.0, 5, 0.0), "ttft") as (port, _):
        user_id = str(uuid.uuid4())
        requests = [chat_request(port, user_id) for _ in range(plan.ttft_warmup + plan.ttft_requests)]
        client = (await loadgen.open_clients(port, 1))[0]
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
    with server(ctx, target, Upstream(0.0, plan.relay_tokens, 0.0), "relay") as (port, pid):
        await stream_batch(port, min(5, plan.relay_streams), 60.0)  # warm-up: imports, pools, caches
        cpu_before = procs.cpu_seconds(pid)
        results, wall = await stream_batch(port, plan.relay_streams, plan.stream_timeout)
        cpu = procs.cpu_seconds(pid) - cpu_before
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
    """Figure 3: ``count`` streams opened at once against the paced upstream; memory from /proc during the run."""
    plan = ctx.plan
    with server(ctx, target, plan.paced, f"streams-{count}") as (port, pid):
        await stream_batch(port, min(10, count), 60.0)
        rss_before = procs.rss_bytes(pid)
        cpu_before = procs.cpu_seconds(pid)
        with MemoryWatch(pid) as memory:
            results, wall = await stream_batch(port, count, plan.stream_timeout)
        cpu = procs.cpu_seconds(pid) - cpu_before
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
    }


async def figure_api(ctx: Context, target: str) -> dict[str, Any]:
    """Figure 4: list and get over keep-alive connections, 10,000 stored conversations for the caller."""
    plan = ctx.plan
    assert ctx.template_db is not None
    db = ctx.work / f"{target}-api.db"
    shutil.copy(ctx.template_db, db)
    user, ids = ctx.api_user, ctx.api_ids
    token = mint(user, JWT_SECRET, lifetime=3600)
    with server(ctx, target, Upstream(0.0, 5, 0.0), "api", db=db) as (port, _):
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
        # The search index's triggers call the store's word-folding function: the store registers it on each connection.
        db.create_function(sqlite_listing.WORDS_FUNCTION, 2, sqlite_listing.indexed_words, deterministic=True)
        base = time.time() - len(ids)
        stamps = [time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(base + i)) + ".000000Z" for i in range(len(ids))]
        db.executemany(
            "INSERT INTO agent_conversations (id, user_id, title, created_at, updated_at, last_message_at,"
            " message_count, metadata) VALUES (?, ?, 'AI Chat', ?, ?, NULL, 0, '{}')",
            [(cid, user, stamp, stamp) for cid, stamp in zip(ids, stamps)],
        )
        rows = []
        for cid, stamp in zip(ids, stamps):
            rows.append((str(uuid.uuid4()), cid, "user", MESSAGE, None, stamp))
            rows.append((str(uuid.uuid4()), cid, "assistant", loadgen.TOKEN * 20, "supervisor", stamp))
        db.executemany(
            "INSERT INTO agent_messages (id, conversation_id, role, content, agent_type, metadata, created_at)"
            " VALUES (?, ?, ?, ?, ?, '{}', ?)",
            rows,
        )
    ctx.template_db, ctx.api_user, ctx.api_ids = path, user, ids


# -- the run -------------------------------------------------------------------------------------------------------

Figure = Callable[[Context, str], Any]


async def run_target(ctx: Context, target: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("ttft", lambda: figure_ttft(ctx, target)),
        ("relay", lambda: figure_relay(ctx, target)),
    ]
    steps += [(f"streams_{n}", lambda n=n: figure_concurrency(ctx, target, n)) for n in ctx.plan.levels]
    steps.append(("api", lambda: figure_api(ctx, target)))
    for name, step in steps:
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
    parser.add_argument("--targets", help="comma-separated subset of service,baseline,floor,relay")
    parser.add_argument("--levels", help="comma-separated stream counts for figure 3 (default 100,1000,3000,5000)")
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


def choose_targets(args: argparse.Namespace) -> list[str]:
    default = "service,floor,relay" if args.smoke else ",".join(TARGETS)
    targets = [t.strip() for t in (args.targets or default).split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.smoke and "baseline" not in targets:
        print("Smoke mode: no baseline (it needs bench/.venv-baseline; add --targets to include it).")
    if "baseline" in targets and not ensure_baseline_venv():
        print("baseline: SKIPPED, its virtual environment could not be created.")
        targets.remove("baseline")
    return targets


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers, so every server and fake is stopped


def main(argv: list[str] | None = None) -> int:
    from bench import report

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    plan = choose_plan(args)
    procs.raise_fd_limit()
    procs.pin_self_to_bench_core()
    targets = choose_targets(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="canvalo-bench-") as tmp:
        ctx = Context(plan=plan, work=Path(tmp), logs=out_dir / f"logs-{stamp}")
        seed_conversations(ctx)
        print(f"Benchmark ({'smoke' if args.smoke else 'full'}): targets {', '.join(targets)}", flush=True)
        results = {target: asyncio.run(run_target(ctx, target)) for target in targets}
    document = {"machine": machine(), "plan": asdict(plan), "smoke": args.smoke, "results": results}
    table = report.render(document)
    print()
    print(table)
    (out_dir / f"{stamp}.json").write_text(json.dumps(_finite(document), indent=2, default=str))
    (out_dir / f"{stamp}.txt").write_text(table + "\n")
    print(f"\nWritten: {out_dir / (stamp + '.txt')} and .json")
    return 0 if report.all_ran(document) else 1


if __name__ == "__main__":
    raise SystemExit(main())
