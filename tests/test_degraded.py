"""The embedded store on a full disk: reads keep working, writes are a 503 STORE_UNAVAILABLE,
/health says which, and everything recovers without a restart. A real 2 MB tmpfs holds SQLITE_PATH (mounting needs
root, which CI has). A read-only database fails its writes the same way (sqlite3.OperationalError), so it takes the
same path; a tmpfs cannot be remounted read-only under a database that has it open, so that case is not staged here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app import create_app
from services.runs import manager as runs
from tests.scripted_model import ScriptedModel
from tests.support import LiveServer, chunks, event_ids, make_settings, new_id, serve, streamed_text

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")


@pytest.fixture
def small_disk() -> Iterator[Path]:
    mount_point = Path(tempfile.mkdtemp(prefix="canvalo-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        mount_point.rmdir()


@contextlib.contextmanager
def full(disk: Path) -> Iterator[None]:
    filler = disk / "filler"
    with open(filler, "wb") as out:
        with contextlib.suppress(OSError):  # ENOSPC: the disk is full
            while True:
                out.write(b"\0" * 65536)
                out.flush()
    try:
        yield
    finally:
        filler.unlink()


def check_degraded(live: LiveServer, user: str, conversation: str) -> None:
    listed = httpx.get(f"{live.url}/api/conversations", params={"user_id": user})
    opened = httpx.get(f"{live.url}/api/conversations/{conversation}", params={"user_id": user})
    assert listed.status_code == opened.status_code == 200  # reads work though the rate-limit row cannot be written
    assert opened.json()["messages"][-1]["metadata"]["status"] == "complete"
    created = httpx.post(f"{live.url}/api/conversations", json={"user_id": user, "title": "new " * 40})
    chat = httpx.post(f"{live.url}/api/chat/stream", json={"message": "hi", "conversation_id": new_id(), "user_id": user})
    for refused in (created, chat):
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "STORE_UNAVAILABLE" and refused.json()["error"]["retryable"]
    health = httpx.get(f"{live.url}/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy"
    assert (health.json()["store"]["readable"], health.json()["store"]["writable"]) == (True, False)


def check_recovered(live: LiveServer, user: str) -> None:
    assert httpx.post(f"{live.url}/api/conversations", json={"user_id": user, "title": "back"}).status_code == 201
    health = httpx.get(f"{live.url}/health")
    assert health.status_code == 200 and health.json()["store"]["writable"] is True


def test_reads_survive_a_full_disk_and_writes_recover_without_a_restart(small_disk: Path) -> None:
    settings = make_settings(small_disk, SQLITE_PATH=str(small_disk / "canvalo.db"))
    user, conversation = new_id(), new_id()
    with serve(create_app(settings)) as live:
        body = {"message": "hello", "conversation_id": conversation, "user_id": user}
        assert httpx.post(f"{live.url}/api/chat/stream", json=body, timeout=30).status_code == 200
        with full(small_disk):
            check_degraded(live, user, conversation)
        check_recovered(live, user)


def test_an_answer_streaming_when_the_disk_fills_is_kept_in_memory_and_saved_when_space_returns(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user saw the answer stream; the disk filled before it could be saved. Nothing of it is lost: viewers are
    told the store is down (retryable, no id), the run keeps every frame and its text in memory, /health says so, no
    sweep ends it as dead meanwhile, and the first flush once space returns saves the whole answer."""
    # Our own timing constants, shortened so the outage outlasts both many times over within a few seconds.
    monkeypatch.setattr(runs, "FINAL_SAVE_SECONDS", 1.0)
    monkeypatch.setattr(runs, "MAINTAIN_SECONDS", 0.2)
    settings = make_settings(small_disk, SQLITE_PATH=str(small_disk / "canvalo.db"), RUN_STALE_SECONDS="2")
    model = ScriptedModel(pieces=[f"w{i} " for i in range(30)], pause=0.05)
    user, conversation = new_id(), new_id()
    body = {"message": "hello", "conversation_id": conversation, "user_id": user}
    with serve(create_app(settings, model=model)) as live:
        received = ""
        with httpx.stream("POST", f"{live.url}/api/chat/stream", json=body, timeout=30) as response:
            run_id = response.headers["x-run-id"]
            stream = response.iter_text()
            while len(event_ids(received)) < 3:
                received += next(stream)
            with full(small_disk):
                received += "".join(stream)  # to its end, while the disk is full
                health = httpx.get(f"{live.url}/health")
                time.sleep(3)  # fifteen maintenance rounds, the run's heartbeat long past RUN_STALE_SECONDS
                assert httpx.get(f"{live.url}/health").json()["runs"] == {"generating": 0, "unsaved": 1}
        wait_for(lambda: httpx.get(f"{live.url}/health").json()["runs"]["unsaved"] == 0)
        stored = httpx.get(f"{live.url}/api/conversations/{conversation}", params={"user_id": user}).json()
        replay = httpx.get(f"{live.url}/api/chat/runs/{run_id}/events", params={"user_id": user}, timeout=30).text
    seen = chunks(received)
    assert (seen[-1]["code"], seen[-1]["retryable"]) == ("STORE_UNAVAILABLE", True)
    assert received.rstrip("\n").rsplit("\n\n", 1)[-1].startswith("data: ")  # no id: not part of the run's log
    assert (health.status_code, health.json()["runs"]["unsaved"]) == (503, 1)
    answer = stored["messages"][-1]
    assert answer["content"] == streamed_text(seen) == "".join(model.pieces)
    assert answer["metadata"]["status"] == "complete"
    assert chunks(replay)[-1]["type"] == "complete" and streamed_text(chunks(replay)) == answer["content"]


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)
