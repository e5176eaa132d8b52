"""Processes of a benchmark run: start them pinned to a core, wait until they answer, read their CPU and memory.

What: ``launch`` starts a server (the service, the baseline or the floor) on the server core with a raised fd limit
and waits for ``GET /`` to answer; ``fake_upstream`` starts ``bench/fake_upstream.py`` on the benchmark's own core;
``cpu_seconds`` and ``rss_bytes`` read ``/proc/<pid>/stat`` (utime + stime, all threads) and ``/proc/<pid>/status``
(VmRSS). Every process is stopped with SIGTERM, then SIGKILL after a few seconds: the baseline's worker threads do
not stop when their clients leave, and nothing may outlive the run.

For the production target, ``postgrest_standin`` starts ``bench/postgrest_standin.py`` on the benchmark's core (it
inherits this process's affinity, as the fake does; PostgreSQL, started from here by ``tests/pg.py``, inherits it too)
and yields a ``Standin`` whose control port gives its counts; ``postgres_cpu_seconds`` adds up the cluster's
processes; ``core_times`` and ``affinity`` say how busy each core was and where a process may run.

Why pinning: on a 2-core machine the server gets core 0 alone and the fake plus the load generator share core 1, so
the server's figures are not distorted by the load it is given.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# uvloop and httptools for the PostgREST stand-in's process only (bench/postgrest_standin.py says why); bench/run.py
# installs them here, so the service, the tests and the load generator never see them.
STANDIN_PACKAGES = REPO / "bench" / ".standin-packages"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = 1024
_LIVE: set[subprocess.Popen[bytes]] = set()  # every process started here, stopped at exit whatever happened


_AVAILABLE = sorted(os.sched_getaffinity(0))  # read at import, before this process pins itself to one core


def cores() -> tuple[int | None, int | None]:
    """(server core, benchmark core), or (None, None) when fewer than two cores are available to pin."""
    if len(_AVAILABLE) < 2:
        return None, None
    return _AVAILABLE[0], _AVAILABLE[1]


def raise_fd_limit() -> None:
    """5,000 streams need 10,000+ descriptors in the server (client + upstream sockets) and in the benchmark."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pin_self_to_bench_core() -> None:
    _, bench_core = cores()
    if bench_core is not None:
        os.sched_setaffinity(0, {bench_core})


def _server_preexec() -> None:
    server_core, _ = cores()
    if server_core is not None:
        os.sched_setaffinity(0, {server_core})
    raise_fd_limit()
    os.setpgrp()  # its own process group, so stopping it never signals the benchmark


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields 3 onwards of proc(5)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * PAGE_KB
    return 0


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    _LIVE.discard(proc)
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@atexit.register
def stop_all() -> None:
    for proc in list(_LIVE):
        stop(proc, grace=2.0)


def _started(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    _LIVE.add(proc)
    return proc


@contextlib.contextmanager
def launch(
    command: Sequence[str], env: Mapping[str, str], port: int, log: Path, ready_timeout: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server on the server core; yield it once ``GET /`` answers 200; always stop it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = _started(
            subprocess.Popen(
                list(command), cwd=REPO, env=dict(env), stdout=out, stderr=subprocess.STDOUT, preexec_fn=_server_preexec
            )
        )
    try:
        deadline = time.monotonic() + ready_timeout
        while not _answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[1]} did not start; see {log}")
            time.sleep(0.05)
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def fake_upstream(ttft: float, tokens: int, interval: float, log: Path) -> Iterator[int]:
    """Start the fake Bedrock on the benchmark's core; yield its port."""
    command = [sys.executable, "-m", "bench.fake_upstream", "--ttft", str(ttft), "--tokens", str(tokens)]
    command += ["--interval", str(interval)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as err:
        proc = _started(subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=err))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the fake upstream did not start; see {log}")
        yield int(line.split()[1])
    finally:
        stop(proc)


@dataclass(frozen=True)
class Standin:
    """A running PostgREST stand-in: the port the service talks to, its control port, its pid and what it runs on."""

    port: int
    control: int
    pid: int
    server: str  # its event loop and HTTP parser: "uvloop+httptools", or "asyncio+h11" as in the tests

    async def reset(self) -> None:
        await self._ask("RESET")

    async def stats(self) -> dict[str, Any]:
        """Connections accepted, open, most open at once, and every request since the last reset."""
        return json.loads(await self._ask("STATS"))  # type: ignore[no-any-return]

    async def _ask(self, command: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.control)
        try:
            writer.write(f"{command}\n".encode())
            return await asyncio.wait_for(reader.read(), timeout=30)  # the stand-in closes after its answer
        finally:
            writer.close()


@contextlib.contextmanager
def postgrest_standin(
    socket_dir: str, pg_port: int, dbname: str, jwt_secret: str, key: str, log: Path
) -> Iterator[Standin]:
    """Start the PostgREST stand-in over ``dbname`` on the benchmark's core; yield it once it listens."""
    command = [sys.executable, "-m", "bench.postgrest_standin", "--socket-dir", socket_dir, "--pg-port", str(pg_port)]
    command += ["--dbname", dbname, "--jwt-secret", jwt_secret, "--publishable-key", key]
    env = os.environ | ({"PYTHONPATH": str(STANDIN_PACKAGES)} if STANDIN_PACKAGES.is_dir() else {})
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as err:
        proc = _started(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err))
    try:
        assert proc.stdout is not None
        words = proc.stdout.readline().decode().split()
        if len(words) != 6 or words[0] != "PORT":
            raise RuntimeError(f"the PostgREST stand-in did not start; see {log}")
        yield Standin(int(words[1]), int(words[3]), proc.pid, words[5])
    finally:
        stop(proc)


def postgres_cpu_seconds(socket_dir: str, port: int) -> float:
    """CPU of a whole cluster: the postmaster with the children it has reaped (cutime + cstime: backends that
    exited), plus every live child (backends, background workers). The postmaster's pid heads its socket lock file."""
    postmaster = postmaster_pid(socket_dir, port)
    fields = _stat_fields(postmaster)
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            child = _stat_fields(int(entry.name))
        except (OSError, ValueError):
            continue  # exited while we looked
        if int(child[1]) == postmaster:
            ticks += int(child[11]) + int(child[12])
    return ticks / CLOCK_TICKS


def postmaster_pid(socket_dir: str, port: int) -> int:
    return int(Path(socket_dir, f".s.PGSQL.{port}.lock").read_text().split()[0])


def core_times() -> dict[int, tuple[int, int]]:
    """Per core, (busy, total) jiffies since boot from /proc/stat; busy is everything but idle and iowait."""
    times: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            numbers = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (sum(numbers) - numbers[3] - numbers[4], sum(numbers))
    return times


def busy_percent(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[str, float]:
    """How busy each core was between two ``core_times`` readings, every process on it counted (ours or not)."""
    out = {}
    for core, (busy, total) in after.items():
        busy_then, total_then = before.get(core, (0, 0))
        elapsed = total - total_then
        out[f"cpu{core}"] = round(100 * (busy - busy_then) / elapsed, 1) if elapsed else 0.0
    return out


def affinity(pid: int) -> str:
    """The cores ``pid`` may run on, as the kernel lists them (``Cpus_allowed_list``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return "?"
