"""A newcomer's first hour: `python app.py` as README runs it, and what it says when something is not right yet.

Each problem is one line on stderr that names what to fix, and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import chunks, free_port, make_settings, new_id, serve, wait_until_healthy
from tests.tokens import encode

ROOT = Path(__file__).resolve().parent.parent
SUPABASE = {"STORE": "supabase", "SUPABASE_URL": "https://x.supabase.co", "SUPABASE_RUN_SECRET": "r" * 32}
SECRET_KEY = "sb_secret_0123456789abcdef"
SERVICE_ROLE_KEY = encode({"role": "service_role", "iss": "supabase"})


def run_app(env: dict[str, str], *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "LOG_LEVEL": "INFO", **env}
    return subprocess.run([sys.executable, *args, "app.py"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def one_line(completed: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    return lines[0]


def test_a_port_in_use_is_one_line_naming_api_port_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = run_app({"API_PORT": str(port), "SQLITE_PATH": str(tmp_path / "db" / "canvalo.db")})
    assert completed.returncode == 2
    line = one_line(completed)
    assert f"API_PORT {port}" in line and "already in use" in line
    assert not (tmp_path / "db").exists()  # it stopped before migrating anything


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"STORE": "supabase"}, "SUPABASE_URL"),
        ({"SUPABASE_URL": "not-a-url"}, "SUPABASE_URL"),
        ({"SUPABASE_URL": "https://x.supabase.co?x=1"}, "SUPABASE_URL"),
        ({"STORE": "supabase", "SUPABASE_URL": "https://x.supabase.co"}, "SUPABASE_PUBLISHABLE_KEY"),
        # A secret key bypasses row-level security: refused before anything starts, like every other setting.
        ({**SUPABASE, "SUPABASE_PUBLISHABLE_KEY": SECRET_KEY}, "SUPABASE_PUBLISHABLE_KEY holds a secret"),
        ({**SUPABASE, "SUPABASE_PUBLISHABLE_KEY": "", "SUPABASE_ANON_KEY": SERVICE_ROLE_KEY},
         "SUPABASE_ANON_KEY holds a secret or service-role key"),
    ],
)
def test_a_store_that_cannot_work_is_one_line_in_development_too(env: dict[str, str], named: str) -> None:
    completed = run_app({"ENVIRONMENT": "development", **env})
    assert completed.returncode == 2
    line = one_line(completed)
    assert named in line
    assert SECRET_KEY not in completed.stderr and SERVICE_ROLE_KEY not in completed.stderr


@pytest.mark.parametrize(("env", "named"), [
    ({"METRICS_DIR": "/proc/no-such-dir"}, "METRICS_DIR '/proc/no-such-dir' cannot be written"),
    ({"METRICS_DIR": "/etc/hostname/metrics"}, "METRICS_DIR '/etc/hostname/metrics' cannot be used"),
    ({"SHUTDOWN_GRACE_SECONDS": "inf"}, "SHUTDOWN_GRACE_SECONDS must be a finite number"),
])
def test_a_setting_that_would_fail_later_is_one_line_at_startup(tmp_path: Path, env: dict[str, str],
                                                                named: str) -> None:
    completed = run_app({"SQLITE_PATH": str(tmp_path / "canvalo.db"), **env})
    assert completed.returncode == 2
    assert named in one_line(completed)


def test_production_names_every_problem_in_one_line() -> None:
    completed = run_app({"ENVIRONMENT": "production"})
    assert completed.returncode == 2
    line = one_line(completed)
    for named in ("SUPABASE_JWT_SECRET", "SUPABASE_URL", "SUPABASE_PUBLISHABLE_KEY", "CORS_ORIGINS",
                  "LLM_PROVIDER=bedrock", "STORE=supabase"):
        assert named in line, named


def test_ctrl_c_stops_the_service_quietly(tmp_path: Path) -> None:
    port = free_port()
    # As a terminal starts it: Ctrl-C's signal not ignored. A suite started in the background (`cmd &`, nohup) hands
    # its children SIGINT ignored, and Python then installs no KeyboardInterrupt for uvicorn to raise again.
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path,
                               env={**os.environ, "API_PORT": str(port), "LOG_LEVEL": "INFO"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground process
        output, errors = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "Traceback" not in errors and "KeyboardInterrupt" not in errors, errors
    assert "Finished server process" in errors  # it shut down as on SIGTERM, its runs saved
    assert process.returncode == 130  # 128 + SIGINT: what a shell expects of a program stopped by Ctrl-C


def test_a_stream_cut_by_the_end_of_the_grace_period_logs_no_traceback(tmp_path: Path) -> None:
    """The client gets its retryable SERVER_SHUTTING_DOWN chunk, and the log stays as quiet as README says."""
    port = free_port()
    env = {**os.environ, "API_PORT": str(port), "SHUTDOWN_GRACE_SECONDS": "1", "LOCAL_TOKEN_DELAY": "0.3",
           "LOG_LEVEL": "INFO"}
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        body = {"message": "What invoices do I have?", "conversation_id": new_id(), "user_id": new_id()}
        with httpx.stream("POST", f"{url}/api/chat/stream", json=body, timeout=20) as response:
            pieces = response.iter_bytes()
            received = next(pieces)
            process.send_signal(signal.SIGTERM)
            received += b"".join(pieces)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
    assert chunks(received.decode())[-1]["code"] == "SERVER_SHUTTING_DOWN"
    assert "Finished server process" in errors  # the log was read to its end
    assert "Traceback" not in errors and "Exception in ASGI application" not in errors, errors[-1500:]


def test_a_second_ctrl_c_quits_promptly(tmp_path: Path) -> None:
    """uvicorn's "CTRL+C to force quit" during a stream: the process exits at once, saying so, rather than waiting up
    to FINAL_SAVE_SECONDS for the run's final save and printing tracebacks (the run ends as interrupted at the next
    start). Whether the wait happens depends on timing; the tracebacks were there every time."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path,
                               env={**os.environ, "API_PORT": str(port), "LOCAL_TOKEN_DELAY": "0.5"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        body = {"message": "What invoices do I have?", "conversation_id": new_id(), "user_id": new_id()}
        with httpx.stream("POST", f"{url}/api/chat/stream", json=body, timeout=60) as response:
            pieces = response.iter_bytes()
            next(pieces)
            process.send_signal(signal.SIGINT)
            time.sleep(1)
            process.send_signal(signal.SIGINT)
            forced = time.monotonic()
            with contextlib.suppress(httpx.RemoteProtocolError):  # a forced quit cuts the stream
                b"".join(pieces)
            status = process.wait(timeout=60)
            took = time.monotonic() - forced
    finally:
        if process.poll() is None:
            process.kill()
        _, errors = process.communicate(timeout=30)
    assert status == 130
    assert took < 10, f"exited {took:.0f} s after the second Ctrl-C; log tail: {errors[-300:]}"
    assert "Traceback" not in errors and "Second Ctrl-C: quitting now" in errors, errors[-1500:]


def test_without_the_dependencies_it_says_to_install_requirements() -> None:
    completed = run_app({}, "-I", "-S")  # no site-packages: as if run outside the virtualenv
    assert completed.returncode == 1
    line = one_line(completed)
    assert "not installed" in line and "pip install -r requirements.txt" in line


def test_an_older_python_is_told_the_version_it_needs() -> None:
    code = ("import runpy, sys; sys.version_info = (3, 10, 12, 'final', 0); sys.version = '3.10.12';"
            " runpy.run_path('app.py', run_name='__main__')")
    completed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert completed.returncode == 1
    assert "Python 3.11 or newer is required" in one_line(completed) and "3.10.12" in completed.stderr


def test_startup_says_where_the_data_is_and_what_is_active(tmp_path: Path) -> None:
    port = free_port()
    relative = "somewhere/canvalo.db"
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path,
                               env={**os.environ, "API_PORT": str(port), "SQLITE_PATH": relative, "LOG_LEVEL": "INFO"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    started = next(line for line in output.splitlines() if "Started:" in line)
    assert str(tmp_path / relative) in started  # the resolved path, not the relative one
    assert "store=sqlite" in started and "model=local" in started and "auth=none" in started


def test_the_collector_is_tuned_once_the_app_has_started(tmp_path: Path) -> None:
    # bench/RESULTS.md: with CPython's defaults a burst of streams spends a fifth of its CPU in the collector.
    from app import create_app
    from web.gc_tuning import GC_THRESHOLDS

    before = gc.get_threshold()
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    try:
        with serve(create_app(make_settings(tmp_path))) as live:
            assert httpx.get(f"{live.url}/health").status_code == 200
            assert gc.get_threshold() == GC_THRESHOLDS
            assert gc.get_freeze_count() > 0  # what startup made is out of every later collection
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_relative_sqlite_path_keeps_its_database_when_the_start_directory_goes(tmp_path: Path) -> None:
    # SQLITE_PATH is resolved once, against the directory the service started from: removing that directory later
    # (a release directory swapped out, a temporary checkout cleaned) neither loses the database nor gives a 500.
    started_in = tmp_path / "release"
    started_in.mkdir()
    port = free_port()
    env = {**os.environ, "API_PORT": str(port), "SQLITE_PATH": "../shared/canvalo.db"}
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=started_in, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    user = "8a0c6a44-2a55-4b9e-9d53-4e2f1f3c6a11"
    try:
        wait_until_healthy(url, process)
        created = httpx.post(f"{url}/api/conversations", json={"user_id": user, "title": "Kept"}, timeout=5)
        assert created.status_code in (200, 201), created.text
        started_in.rmdir()
        health = httpx.get(f"{url}/health", timeout=5)
        listed = httpx.get(f"{url}/api/conversations", params={"user_id": user}, timeout=5)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert health.status_code == 200 and health.json()["store"]["writable"] is True, health.text
    assert [c["title"] for c in listed.json()["conversations"]] == ["Kept"]
    assert "Traceback" not in output


@pytest.mark.parametrize("directory", ["a?b#c", "100% done", "plain"])
def test_the_store_uses_its_database_at_its_path_and_never_makes_a_new_one_once_open(
    tmp_path: Path, directory: str
) -> None:
    # The store opens its file by URI: a "?" or "#" in the path once cut it short, so the health probe opened (and
    # created) another file and called the database reachable. And once open, a database deleted underneath must
    # be an error, never a new empty database answering as if every conversation were gone.
    import asyncio

    from errors import AppError
    from services.store.sqlite.store import SQLiteStore
    from services.store import Caller

    path = tmp_path / directory / "canvalo.db"

    async def probed() -> bool | None:
        store = SQLiteStore(str(path))
        await store.open()
        try:
            await store.ping()
            return await store.probe_write()
        finally:
            await store.aclose()

    async def deleted_underneath() -> list[str]:
        store = SQLiteStore(str(path))
        await store.open()  # no read yet: each reader thread connects after the file is gone
        refused: list[str] = []
        try:
            for leftover in path.parent.iterdir():
                leftover.unlink()
            for attempt in (store.list_conversations(Caller(new_id()), 10, 0), store.ping()):
                try:
                    await attempt
                except AppError as exc:
                    refused.append(exc.code)
        finally:
            await store.aclose()
        return refused

    assert asyncio.run(probed()) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory]  # nothing made beside it
    assert asyncio.run(deleted_underneath()) == ["STORE_UNAVAILABLE", "STORE_UNAVAILABLE"]
    assert not path.exists()  # no new empty database
