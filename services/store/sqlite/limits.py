"""Rate-limit counters in SQLite: the shared state behind ``services/limits/rates.py``.

Every worker process (and every app instance) that opens the same SQLite file sees the same rows, and each
decision is one write transaction, so two workers can never both take the last slot. The tables hold disposable
operational state, not user data, so they are created idempotently at startup (``SCHEMA``) rather than
through the numbered ``MIGRATIONS`` of the business schema. Functions here run on a store thread, given its
connection (see ``SQLiteStore._write``).
"""

from __future__ import annotations

import sqlite3
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_limits (
    subject TEXT NOT NULL,
    bucket TEXT NOT NULL,
    window_start REAL NOT NULL,
    hits INTEGER NOT NULL,
    PRIMARY KEY (subject, bucket)
);
CREATE INDEX IF NOT EXISTS idx_rate_limits_window ON rate_limits (window_start);
-- A user's stream slots are their running chat runs (runs.py), so no table of leases is kept; one left in an
-- upgraded file is dropped.
DROP TABLE IF EXISTS stream_leases;
-- One row that /health rewrites to learn whether the database can take a write (disk full, read-only).
CREATE TABLE IF NOT EXISTS store_probe (id INTEGER PRIMARY KEY CHECK (id = 1), written_at REAL NOT NULL);
"""

PRUNE_BATCH = 100

# One statement, so atomic on its own: a new window resets the count, the current one adds to it. ``max`` keeps a
# worker whose clock lags from reopening a window another worker already moved past.
_HIT = """
INSERT INTO rate_limits (subject, bucket, window_start, hits) VALUES (?, ?, ?, 1)
ON CONFLICT (subject, bucket) DO UPDATE SET
    hits = CASE WHEN excluded.window_start > rate_limits.window_start THEN 1 ELSE rate_limits.hits + 1 END,
    window_start = max(rate_limits.window_start, excluded.window_start)
RETURNING hits, window_start
"""


def hit(db: sqlite3.Connection, subject: str, bucket: str, window_seconds: int, limit: int) -> tuple[bool, float]:
    """Count one request; (allowed, seconds until the current window ends)."""
    now = time.time()
    window_start = float(int(now // window_seconds) * window_seconds)
    hits, current_start = db.execute(_HIT, (subject, bucket, window_start)).fetchone()
    if hits == 1:
        _prune(db, window_start - window_seconds)
    return hits <= limit, max(0.0, current_start + window_seconds - now)


def _prune(db: sqlite3.Connection, before: float) -> None:
    """Forget subjects whose last window ended before ``before`` (one row per subject and bucket would otherwise
    stay for ever: every address that ever failed to sign in). Done when a subject opens a new window, a little at a
    time, so no request pays for a large sweep."""
    db.execute(
        "DELETE FROM rate_limits WHERE rowid IN (SELECT rowid FROM rate_limits WHERE window_start < ? LIMIT ?)",
        (before, PRUNE_BATCH),
    )
