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
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app import create_app
from tests.support import LiveServer, make_settings, new_id, serve

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
