"""Rate-limit counters and stream leases in SQLite: the shared state behind ``services/ratelimit.py``.

Every worker process (and every app instance) that opens the same SQLite file sees the same rows, and each
decision is one write transaction, so two workers can never both take the last slot. The tables hold disposable
operational state, not user data, so they are created idempotently at startup (``create_tables``) rather than
through the numbered ``MIGRATIONS`` of the business schema. Functions here run on a store thread, given its
connection (see ``SQLiteStore._run``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_limits (
    subject TEXT NOT NULL,
    bucket TEXT NOT NULL,
    window_start REAL NOT NULL,
    hits INTEGER NOT NULL,
    PRIMARY KEY (subject, bucket)
);
CREATE TABLE IF NOT EXISTS stream_leases (
    id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_stream_leases_subject ON stream_leases (subject, expires_at);
"""

# One statement, so atomic on its own: a new window resets the count, the current one adds to it. ``max`` keeps a
# worker whose clock lags from reopening a window another worker already moved past.
_HIT = """
INSERT INTO rate_limits (subject, bucket, window_start, hits) VALUES (?, ?, ?, 1)
ON CONFLICT (subject, bucket) DO UPDATE SET
    hits = CASE WHEN excluded.window_start > rate_limits.window_start THEN 1 ELSE rate_limits.hits + 1 END,
    window_start = max(rate_limits.window_start, excluded.window_start)
RETURNING hits, window_start
"""


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction whose lock is taken up front (BEGIN IMMEDIATE), so two writers queue on busy_timeout
    instead of deadlocking on a lock upgrade; rolled back on any exception. Shared by the store and the limits."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def create_tables(db: sqlite3.Connection) -> None:
    db.executescript(SCHEMA)


def hit(db: sqlite3.Connection, subject: str, bucket: str, window_seconds: int, limit: int) -> tuple[bool, float]:
    """Count one request; (allowed, seconds until the current window ends)."""
    now = time.time()
    window_start = float(int(now // window_seconds) * window_seconds)
    hits, current_start = db.execute(_HIT, (subject, bucket, window_start)).fetchone()
    return hits <= limit, max(0.0, current_start + window_seconds - now)


def acquire_lease(db: sqlite3.Connection, subject: str, lease_id: str, limit: int, ttl_seconds: int) -> bool:
    """Count-then-insert inside BEGIN IMMEDIATE: the write lock is taken first, so the count cannot go stale."""
    with write_transaction(db):
        return _take_lease(db, subject, lease_id, limit, ttl_seconds)


def admit_chat(
    db: sqlite3.Connection,
    subject: str,
    lease_id: str,
    *,
    window_seconds: int,
    chat_limit: int,
    stream_limit: int,
    ttl_seconds: int,
) -> tuple[bool, float, bool]:
    """``hit`` on the chat bucket, then, only if that allowed it, ``acquire_lease``: one write transaction.

    Returns (allowed by the chat limit, seconds until its window ends, stream slot taken). A refused hit still
    counts (as ``hit`` alone does) and takes no slot.
    """
    with write_transaction(db):
        allowed, retry_after = hit(db, subject, "chat", window_seconds, chat_limit)
        taken = allowed and _take_lease(db, subject, lease_id, stream_limit, ttl_seconds)
    return allowed, retry_after, taken


def _take_lease(db: sqlite3.Connection, subject: str, lease_id: str, limit: int, ttl_seconds: int) -> bool:
    """Clear this subject's lapsed leases, then take one slot if fewer than ``limit`` are held. In a write lock."""
    now = time.time()
    db.execute("DELETE FROM stream_leases WHERE subject = ? AND expires_at <= ?", (subject, now))
    held = db.execute("SELECT count(*) FROM stream_leases WHERE subject = ?", (subject,)).fetchone()[0]
    if held >= limit:
        return False
    db.execute("INSERT INTO stream_leases (id, subject, expires_at) VALUES (?, ?, ?)", (lease_id, subject, now + ttl_seconds))
    return True


def release_lease(db: sqlite3.Connection, subject: str, lease_id: str) -> None:
    db.execute("DELETE FROM stream_leases WHERE id = ? AND subject = ?", (lease_id, subject))
