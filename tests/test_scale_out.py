"""Scale-out in production mode: several worker processes on 127.0.0.1 sharing one Supabase database (the fake
PostgREST over real PostgreSQL), each holding nothing another needs. What one worker does to a run, a budget or a
limit, every other worker sees through the database alone.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from app import create_app
from services.runs import manager as runs_module
from tests.conftest import DATABASE, AuthHeaders
from tests.pg import register_run_secret
from tests.support import chunks, event_ids, free_port, make_settings, new_id, serve, streamed_text
from tests.test_runs import chat_body, conversation, read_until, resume, slow_model, start_service

STORES = ("supabase",)


class Workers(list[str]):
    """The URLs of worker processes, with the processes themselves (``processes[i]`` serves ``self[i]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[subprocess.Popen[bytes]] = []


@contextlib.contextmanager
def workers(env: dict[str, str], count: int = 2) -> Iterator[Workers]:
    """``count`` worker processes (``python app.py``) with one environment, so one database."""
    started = Workers()
    try:
        for _ in range(count):
            port = free_port()
            started.processes.append(start_service(env, port))
            started.append(f"http://127.0.0.1:{port}")
        yield started
    finally:
        for process in started.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


def test_a_short_run_stale_seconds_never_ends_a_run_another_worker_is_generating(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    """RUN_STALE_SECONDS may be as short as 2 s, and a run's worker keeps it alive however long it takes: a viewer on
    another worker, which ends the runs whose heartbeat lapsed, must never take a live run for a dead one. The
    answer takes about 7 s (0.3 s a word), well past 2 s between two heartbeats every 5 s."""
    env = {**service_env, "LOCAL_TOKEN_DELAY": "0.3", "RUN_STALE_SECONDS": "2"}
    conversation_id = new_id()
    with workers(env) as (first, second):
        received, run_id = read_until(first, chat_body(user_id, conversation_id, "hello"), auth_headers(user_id), 2)
        followed = chunks(resume(second, run_id, user_id, auth_headers(user_id)).text)
        stored = conversation(first, user_id, conversation_id, auth_headers(user_id))["messages"][-1]
    assert followed[-1]["type"] == "complete", followed[-1]
    assert stored["metadata"]["status"] == "complete"
    assert stored["content"] == streamed_text(followed)


def test_workers_on_either_of_two_registered_run_secrets_share_runs_and_a_retired_one_ends_nothing_begun(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str, pg_cluster: Any
) -> None:
    """A secret being replaced (docs/production.md, The run secret): while both are registered, a worker on either
    begins turns, and each follows and stops the other's; the old one deleted mid-answer, that answer is still saved
    (its key was registered at its begin), and only new turns on the old secret's worker are refused."""
    retiring = "retiring-run-secret-" + "9" * 40
    with pg_cluster.connect(DATABASE) as db:
        register_run_secret(db, retiring)
    env = {**service_env, "LOCAL_TOKEN_DELAY": "0.1"}
    try:
        with workers(env, 1) as (current,), workers({**env, "SUPABASE_RUN_SECRET": retiring}, 1) as (old,):
            mine = auth_headers(user_id)
            _, on_old = read_until(old, chat_body(user_id, new_id(), "hello"), mine, 2)
            followed = chunks(resume(current, on_old, user_id, mine).text)
            _, on_current = read_until(current, chat_body(user_id, new_id(), "hello"), mine, 2)
            stopped = httpx.post(f"{old}/api/chat/runs/{on_current}/stop", json={"user_id": user_id},
                                 headers=mine, timeout=30)
            conversation_id = new_id()
            _, last = read_until(old, chat_body(user_id, conversation_id, "hello"), mine, 2)
            with pg_cluster.connect(DATABASE) as db:
                db.execute("delete from canvalo_private.run_secrets where hash = sha256(convert_to(%s, 'UTF8'))",
                           (retiring,))
            finished = chunks(resume(current, last, user_id, mine).text)
            stored = conversation(current, user_id, conversation_id, mine)["messages"][-1]
            refused = httpx.post(f"{old}/api/chat/stream", json=chat_body(user_id, new_id(), "hello"),
                                 headers=mine, timeout=30)
            served = httpx.post(f"{current}/api/chat/stream", json=chat_body(user_id, new_id(), "hello"),
                                headers=mine, timeout=30)
    finally:
        with pg_cluster.connect(DATABASE) as db:
            db.execute("delete from canvalo_private.run_secrets where hash = sha256(convert_to(%s, 'UTF8'))",
                       (retiring,))
    assert followed[-1]["type"] == "complete"
    assert stopped.status_code == 200 and stopped.json()["metadata"]["status"] == "stopped", stopped.text
    assert finished[-1]["type"] == "complete" and stored["metadata"]["status"] == "complete"
    assert stored["content"] == streamed_text(finished)
    assert refused.status_code == 502 and refused.json()["error"]["code"] == "STORE_MISCONFIGURED", refused.text
    assert served.status_code == 200 and chunks(served.text)[-1]["type"] == "complete"


def test_a_worker_stopped_with_sigterm_saves_its_runs_end_for_the_viewers_and_turns_other_workers_serve(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    """SIGTERM of one worker (a rolling restart) while another keeps serving: its run ends ``interrupted`` with
    ``SERVER_SHUTTING_DOWN`` at the end of the grace period, saved, so a viewer on the other worker gets that end and
    the user's one stream slot and the conversation are free at once, not after RUN_STALE_SECONDS."""
    env = {**service_env, "LOCAL_TOKEN_DELAY": "0.5", "SHUTDOWN_GRACE_SECONDS": "1", "MAX_STREAMS_PER_USER": "1"}
    conversation_id = new_id()
    mine = auth_headers(user_id)
    with workers(env) as started:
        (stopping, serving), process = started, started.processes[0]
        received, run_id = read_until(stopping, chat_body(user_id, conversation_id, "hello"), mine, 2)
        with httpx.stream("GET", f"{serving}/api/chat/runs/{run_id}/events", params={"user_id": user_id},
                          headers={**mine, "Last-Event-ID": str(event_ids(received)[-1])}, timeout=30) as viewer:
            process.send_signal(signal.SIGTERM)
            followed = chunks("".join(viewer.iter_text()))
        stored = conversation(serving, user_id, conversation_id, mine)["messages"][-1]
        again = httpx.post(f"{serving}/api/chat/stream", json=chat_body(user_id, conversation_id, "hello again"),
                           headers=mine, timeout=30)
    assert (followed[-1]["type"], followed[-1]["code"]) == ("error", "SERVER_SHUTTING_DOWN"), followed[-1]
    assert stored["metadata"]["status"] == "interrupted"
    assert stored["content"] == streamed_text(chunks(received) + followed)
    assert again.status_code == 200, again.text
    assert chunks(again.text)[-1]["type"] == "complete"


def test_a_viewer_on_a_worker_whose_clock_runs_ahead_of_the_databases_polls_no_faster(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker judges a run's heartbeat (the database's clock) by its own clock before asking the database to end
    it; the database judges by its own. A worker whose clock runs ahead (workers and database are different
    machines) finds a live run stale, and the database ends nothing: its viewer must go on reading every
    POLL_SECONDS, not read and ask again at once, in a loop, for as long as the clocks disagree."""
    token = "m" * 32
    settings = make_settings(tmp_path, **{**service_env, "METRICS_TOKEN": token})
    ahead = SimpleNamespace(time=lambda: time.time() + settings.run_stale_seconds + 1, monotonic=time.monotonic,
                            perf_counter=time.perf_counter)
    monkeypatch.setattr(runs_module, "time", ahead)  # only the run manager's staleness check reads time.time

    def reads(url: str) -> float:
        text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("canvalo_store_query_duration_seconds_count") and 'operation="read_run"' in line)

    model = slow_model(pieces=40, pause=0.05)  # about 2 s: 8 poll intervals
    with serve(create_app(settings, model=model)) as first, serve(create_app(settings)) as second:
        _, run_id = read_until(first.url, chat_body(user_id, new_id()), auth_headers(user_id), 1)
        followed = chunks(resume(second.url, run_id, user_id, auth_headers(user_id)).text)
        read = reads(second.url)
    assert followed[-1]["type"] == "complete"
    assert read <= 30, read  # about 2 s at one read every 0.25 s, with room for a slow machine
