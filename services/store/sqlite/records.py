"""Business records in SQLite: tables derived from the ``Domain`` declarations, and scoped CRUD on them.

These functions run on the SQLite store's threads with that thread's connection. Table and column names are taken
from the declarations only (never from input), values are always bound parameters, and every statement is scoped to
the caller's ``user_id``: one user's tool calls cannot read or touch another's rows.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from errors import RecordNotFound
from services.domains import DOMAINS, Column, Domain
from services.store import Caller, utc_now

_SQL_TYPES = {"integer": "INTEGER", "number": "REAL"}


def create_tables(db: sqlite3.Connection) -> None:
    """Create missing tables and add missing columns, so a new domain or column needs no hand-written migration."""
    for domain in DOMAINS:
        columns = ", ".join(f"{c.name} {_SQL_TYPES.get(c.type, 'TEXT')}" for c in domain.columns)
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {domain.table} (id TEXT PRIMARY KEY, user_id TEXT NOT NULL, {columns},"
            " created_at TEXT NOT NULL, updated_at TEXT NOT NULL)"
        )
        existing = {row[1] for row in db.execute(f"PRAGMA table_info({domain.table})")}
        for column in domain.columns:
            if column.name not in existing:
                db.execute(f"ALTER TABLE {domain.table} ADD COLUMN {column.name} {_SQL_TYPES.get(column.type, 'TEXT')}")
        order = ", ".join(name for name, _ in domain.order_by)
        db.execute(f"CREATE INDEX IF NOT EXISTS idx_{domain.table}_user ON {domain.table} (user_id, {order})")


def list_records(
    db: sqlite3.Connection, caller: Caller, domain: Domain, filters: dict[str, Any], limit: int
) -> list[dict[str, Any]]:
    where = ["user_id = ?"] + [f"{name} = ?" for name in filters]
    order = ", ".join(f"{name} {direction.upper()}" for name, direction in domain.order_by)
    rows = db.execute(
        f"SELECT * FROM {domain.table} WHERE {' AND '.join(where)} ORDER BY {order}, id LIMIT ?",
        (caller.user_id, *(_encode(domain.column(k), v) for k, v in filters.items()), limit),
    )
    return [_decode(domain, row) for row in rows.fetchall()]


def get_record(db: sqlite3.Connection, caller: Caller, domain: Domain, record_id: str) -> dict[str, Any]:
    row = db.execute(
        f"SELECT * FROM {domain.table} WHERE id = ? AND user_id = ?", (record_id, caller.user_id)
    ).fetchone()
    if row is None:
        raise RecordNotFound(domain.singular)
    return _decode(domain, row)


def insert_record(db: sqlite3.Connection, caller: Caller, domain: Domain, values: dict[str, Any]) -> dict[str, Any]:
    now = utc_now()
    row = {**{k: _encode(domain.column(k), v) for k, v in values.items()}, "user_id": caller.user_id}
    row.update(created_at=now, updated_at=now)
    names = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    # OR IGNORE on the client-generated id: a retried insert is a no-op, and the read below scopes by user.
    db.execute(f"INSERT OR IGNORE INTO {domain.table} ({names}) VALUES ({marks})", tuple(row.values()))
    return get_record(db, caller, domain, values["id"])


def update_record(
    db: sqlite3.Connection, caller: Caller, domain: Domain, record_id: str, values: dict[str, Any]
) -> dict[str, Any]:
    assignments = ", ".join(f"{name} = ?" for name in values)
    cursor = db.execute(
        f"UPDATE {domain.table} SET {assignments}, updated_at = ? WHERE id = ? AND user_id = ?",
        (*(_encode(domain.column(k), v) for k, v in values.items()), utc_now(), record_id, caller.user_id),
    )
    if cursor.rowcount == 0:
        raise RecordNotFound(domain.singular)
    return get_record(db, caller, domain, record_id)


def delete_record(db: sqlite3.Connection, caller: Caller, domain: Domain, record_id: str) -> None:
    cursor = db.execute(f"DELETE FROM {domain.table} WHERE id = ? AND user_id = ?", (record_id, caller.user_id))
    if cursor.rowcount == 0:
        raise RecordNotFound(domain.singular)


def _encode(column: Column | None, value: Any) -> Any:
    if column is not None and column.type == "json":
        return json.dumps(value, allow_nan=False)  # strict JSON, as PostgreSQL's jsonb takes it
    return value


def _decode(domain: Domain, row: sqlite3.Row) -> dict[str, Any]:
    record = dict(row)
    for column in domain.columns:
        if column.type == "json" and isinstance(record.get(column.name), str):
            record[column.name] = json.loads(record[column.name])
    return record
