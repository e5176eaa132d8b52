"""Pending actions in SQLite: ``create_action``, ``get_action`` and ``confirm_action`` of the ``Store`` interface
(``services.store`` says what each must do, ``services/agents/actions.py`` why they exist), as functions on a store
thread's connection.

The table (``MIGRATION``, applied by ``SQLiteStore`` as migration 3, and ``BEFORE_MIGRATION``, migration 6) holds one
row per prepared change. Times are Unix seconds (``time.time()``), as for chat runs, and are shown as ISO 8601 UTC. A
confirmation is one ``BEGIN IMMEDIATE`` transaction: the action is checked (the caller's, unused, unexpired, with a
``before``), the record is read and must still hold ``before``, the change runs through
``sqlite_records.update_record``/``delete_record`` on the same connection, and the action is marked used. Writers
queue on the database's write lock, so of two workers confirming at once the second finds it used, and nothing
changes the record between the check and the change. A refusal after the check (the record went, or changed) rolls
the whole transaction back and leaves the action unused.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from errors import ActionAlreadyUsed, ActionExpired, ActionNotFound, RecordChanged
from services.domains import BY_TABLE, Domain
from services.store import ActionDone, Caller, NewAction, PendingAction
from services.store.shared import columns, epoch_timestamp, from_row
from services.store.sqlite import records as sqlite_records
from services.store.sqlite.writer import write_transaction

MIGRATION = """
CREATE TABLE pending_actions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    table_name TEXT NOT NULL,
    tool TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('update', 'delete')),
    record_id TEXT NOT NULL,
    changes TEXT,
    summary TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE INDEX pending_actions_user_expiry ON pending_actions (user_id, expires_at);
"""

# The values a change replaces, as JSON (services/agents/actions.py). Actions kept before it have none and cannot be
# confirmed: they were shown without the whole change.
BEFORE_MIGRATION = "ALTER TABLE pending_actions ADD COLUMN before TEXT;"

# Expired actions are kept this long, so a late confirmation still says ACTION_EXPIRED rather than not found.
KEEP_EXPIRED_SECONDS = 86_400.0

_COLUMNS = columns(PendingAction)


def create_action(db: sqlite3.Connection, caller: Caller, new: NewAction, ttl_seconds: float) -> PendingAction:
    now = time.time()
    with write_transaction(db):
        db.execute(
            "DELETE FROM pending_actions WHERE user_id = ? AND expires_at < ?",
            (caller.user_id, now - KEEP_EXPIRED_SECONDS),
        )
        # OR IGNORE on the client-generated id: a retried insert is a no-op, and the read below scopes by user.
        db.execute(
            f"INSERT OR IGNORE INTO pending_actions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (new.id, caller.user_id, new.table, new.tool, new.kind, new.record_id,
             None if new.changes is None else _strict(new.changes), _strict(new.before), new.summary, now,
             now + ttl_seconds),
        )
        return _action(_fetch(db, caller, new.id))


def get_action(db: sqlite3.Connection, caller: Caller, action_id: str) -> PendingAction:
    return _action(_fetch(db, caller, action_id))


def confirm_action(db: sqlite3.Connection, caller: Caller, action_id: str) -> ActionDone:
    with write_transaction(db):
        now = time.time()  # once the write lock is held: a confirmation that queued behind another is judged now
        row = _fetch(db, caller, action_id)
        if row["used_at"] is not None:
            raise ActionAlreadyUsed()
        if row["expires_at"] <= now or row["before"] is None:
            raise ActionExpired()
        action = _action(row)
        domain = BY_TABLE.get(action.table)
        if domain is None:  # a domain removed since the action was kept
            raise ActionNotFound()
        _check_unchanged(db, caller, domain, action)
        record = None
        if action.kind == "delete":
            sqlite_records.delete_record(db, caller, domain, action.record_id)
        else:
            record = sqlite_records.update_record(db, caller, domain, action.record_id, action.changes or {})
        db.execute("UPDATE pending_actions SET used_at = ? WHERE id = ?", (now, action_id))
        row = _fetch(db, caller, action_id)
    return ActionDone(_action(row), record)


def _check_unchanged(db: sqlite3.Connection, caller: Caller, domain: Domain, action: PendingAction) -> None:
    """Refuse (``RECORD_CHANGED``) unless the record still holds every value of ``before``. Values are compared as
    JSON, as they were read, so ``true`` and ``1`` differ, as they do in PostgreSQL's jsonb."""
    current = sqlite_records.get_record(db, caller, domain, action.record_id)
    if any(_same(value) != _same(current.get(name)) for name, value in (action.before or {}).items()):
        raise RecordChanged()


def _strict(value: Any) -> str:
    """``value`` as strict JSON, as PostgreSQL's jsonb keeps it (no NaN, no Infinity)."""
    return json.dumps(value, allow_nan=False)


def _same(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _fetch(db: sqlite3.Connection, caller: Caller, action_id: str) -> sqlite3.Row:
    row: sqlite3.Row | None = db.execute(
        f"SELECT {_COLUMNS} FROM pending_actions WHERE id = ? AND user_id = ?", (action_id, caller.user_id)
    ).fetchone()
    if row is None:
        raise ActionNotFound()
    return row


def _action(row: sqlite3.Row) -> PendingAction:
    return from_row(PendingAction, row, changes=_json, before=_json,
                    created_at=epoch_timestamp, expires_at=epoch_timestamp,
                    used_at=lambda value: None if value is None else epoch_timestamp(value))


def _json(value: str | None) -> Any:
    return None if value is None else json.loads(value)

