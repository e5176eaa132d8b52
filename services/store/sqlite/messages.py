"""Message rows in SQLite, shared by the store (``services/store/sqlite/store.py``) and its runs (``sqlite_runs.py``).

Functions run on a store thread with its connection, inside the caller's transaction where they write.
"""

from __future__ import annotations

import json
import sqlite3

from typing import Any

from services.store import Message, Role, utc_now
from services.store.shared import columns, from_row

MESSAGE_COLUMNS = columns(Message)


def write_message(
    db: sqlite3.Connection, conversation_id: str, message_id: str, role: Role, content: str, parent_id: str | None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Insert into a conversation already checked to be the caller's, inside the caller's transaction (a chat turn's
    admission, which writes every message); OR IGNORE on the service-generated id, so a retry writes nothing twice.
    The row is not read back: every statement costs the writer thread a round trip for the GIL."""
    db.execute(
        f"INSERT OR IGNORE INTO agent_messages ({MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (message_id, conversation_id, role, content, None, json.dumps(metadata or {}), utc_now(), parent_id),
    )


def message_row(row: sqlite3.Row) -> Message:
    return from_row(Message, row, metadata=json.loads)

