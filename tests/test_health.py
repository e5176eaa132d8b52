"""/health under a flood: concurrent probes share one store probe, so a flood costs the store one probe at a time."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from app import create_app
from tests.support import make_settings, serve
from tests.test_metrics import AUTH, TOKEN, sample


def test_concurrent_health_checks_share_one_store_probe(tmp_path: Path) -> None:
    """Twenty /health calls while a probe is in flight (another process holds SQLite's write lock, so the probe's
    write waits its 3 s) make one probe of the store, not twenty, and all get its answer."""
    settings = make_settings(tmp_path, METRICS_TOKEN=TOKEN, SQLITE_PATH=str(tmp_path / "canvalo.db"))
    with serve(create_app(settings)) as live:
        before = httpx.get(f"{live.url}/metrics", headers=AUTH).text
        holder = sqlite3.connect(tmp_path / "canvalo.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with ThreadPoolExecutor(20) as pool:
                answers = list(pool.map(lambda _: httpx.get(f"{live.url}/health", timeout=30), range(20)))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        after = httpx.get(f"{live.url}/metrics", headers=AUTH).text
    assert {(a.status_code, a.json()["store"]["readable"], a.json()["store"]["writable"]) for a in answers} == {
        (503, True, False)
    }
    pings = [sample(text, "canvalo_store_query_duration_seconds_count", store="sqlite", operation="ping")
             for text in (before, after)]
    assert pings[1] - pings[0] <= 2, pings  # one probe (two if a straggler arrived after it ended), never twenty


def test_health_answers_fresh_after_the_store_recovers(tmp_path: Path) -> None:
    """Sharing a probe in flight never serves an old answer: the call after one that saw the store down probes again."""
    settings = make_settings(tmp_path, SQLITE_PATH=str(tmp_path / "canvalo.db"))
    with serve(create_app(settings)) as live:
        holder = sqlite3.connect(tmp_path / "canvalo.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            down = httpx.get(f"{live.url}/health", timeout=30)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        up = httpx.get(f"{live.url}/health", timeout=30)
    assert (down.status_code, up.status_code) == (503, 200)
