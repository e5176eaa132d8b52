"""A conversation as a tree of messages in SQLite: the message rows, where a turn goes, the path the model reads, and
the branch a page shows (``Store.begin_run``, ``Store.message_page`` and ``Store.set_active_leaf`` say what each must
do). Functions of a store thread's connection, for ``listing.py`` and ``runs.py``.

Every message names its ``parent_id`` (None for a first message) and a conversation its ``active_leaf_id``. A child is
always written after its parent, so along a path ``seq`` grows: a branch pages by ``seq`` like a whole conversation
did. Paths are read by recursive queries over ``(parent_id, seq)``, from stored rows only, never from client order.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from errors import MessageNotFound
from services.store import Message, MessagePage, NewRun, Role, utc_now
from services.store.shared import columns, from_row, wrong_branch_point

MESSAGE_COLUMNS = columns(Message)

# Migration 7. Existing conversations become one branch: each message's parent is the one written before it, and the
# active leaf the last one.
MIGRATION = """
ALTER TABLE agent_messages ADD COLUMN parent_id TEXT;
ALTER TABLE agent_conversations ADD COLUMN active_leaf_id TEXT;
ALTER TABLE agent_runs ADD COLUMN prompt_message_ids TEXT NOT NULL DEFAULT '[]';
UPDATE agent_messages SET parent_id = (
    SELECT p.id FROM agent_messages p
     WHERE p.conversation_id = agent_messages.conversation_id AND p.seq < agent_messages.seq
     ORDER BY p.seq DESC LIMIT 1);
UPDATE agent_conversations SET active_leaf_id = (
    SELECT m.id FROM agent_messages m WHERE m.conversation_id = agent_conversations.id ORDER BY m.seq DESC LIMIT 1);
CREATE INDEX idx_agent_messages_parent ON agent_messages (parent_id, seq);
"""

# The path from a message up to its conversation's first message.
PATH = (
    "WITH RECURSIVE path(id, parent_id, depth) AS ("
    " SELECT id, parent_id, 1 FROM agent_messages WHERE id = ? AND conversation_id = ?"
    " UNION ALL SELECT m.id, m.parent_id, p.depth + 1 FROM agent_messages m JOIN path p ON m.id = p.parent_id)"
)


def write_message(
    db: sqlite3.Connection, conversation_id: str, message_id: str, role: Role, content: str, parent_id: str | None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Insert into a conversation already checked to be the caller's, inside the caller's transaction (a chat turn's
    admission, which writes every message); OR IGNORE on the service-generated id, so a retry writes nothing twice.
    The row is not read back: every statement costs the writer thread a round trip for the GIL."""
    db.execute(
        f"INSERT OR IGNORE INTO agent_messages ({MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (message_id, conversation_id, role, content, None, json.dumps(metadata or {}, allow_nan=False), utc_now(),
         parent_id),
    )


def message_row(row: sqlite3.Row) -> Message:
    return from_row(Message, row, metadata=json.loads)


def target(db: sqlite3.Connection, new: NewRun, active_leaf: str | None) -> tuple[str | None, str | None]:
    """Where ``new`` goes: (the new user message's parent, None) or, for a regenerate, (None, the user message it
    answers again); with no branch point named, after ``active_leaf`` (the conversation's, None for a new one).
    ``MessageNotFound`` or ``ValidationFailed`` for a branch point that cannot be one."""
    if new.regenerate_id is not None:
        answer = _named(db, new, new.regenerate_id, "assistant")
        if answer["parent_role"] != "user":  # a model answers a user's turn, never its own
            raise wrong_branch_point(new)
        return None, answer["parent_id"]
    if new.edit_id is not None:
        return _named(db, new, new.edit_id, "user")["parent_id"], None
    if new.parent_id is not None:
        return _named(db, new, new.parent_id, "assistant")["id"], None
    return active_leaf, None


def _named(db: sqlite3.Connection, new: NewRun, message_id: str, role: str) -> sqlite3.Row:
    row = db.execute(
        "SELECT id, role, parent_id, (SELECT p.role FROM agent_messages p WHERE p.id = m.parent_id) AS parent_role"
        " FROM agent_messages m WHERE id = ? AND conversation_id = ?",
        (message_id, new.conversation_id),
    ).fetchone()
    if row is None:
        raise MessageNotFound()
    if row["role"] != role:
        raise wrong_branch_point(new)
    return row  # type: ignore[no-any-return]


def history(db: sqlite3.Connection, conversation_id: str, message_id: str, limit: int) -> list[Message]:
    """The newest ``limit`` messages of the path ending at ``message_id``, oldest first: the walk up stops there, so
    a turn's cost does not grow with the conversation."""
    bounded = PATH.replace("JOIN path p ON m.id = p.parent_id", "JOIN path p ON m.id = p.parent_id AND p.depth < ?")
    rows = db.execute(
        f"{bounded} SELECT {MESSAGE_COLUMNS} FROM agent_messages WHERE id IN (SELECT id FROM path) ORDER BY seq",
        (message_id, conversation_id, limit),
    )
    return [message_row(r) for r in rows]


def leaf_below(db: sqlite3.Connection, conversation_id: str, message_id: str) -> str:
    """The newest leaf under ``message_id`` (itself when it has no children), following the newest child."""
    row = db.execute(
        "WITH RECURSIVE down(id, depth) AS ("
        " SELECT id, 0 FROM agent_messages WHERE id = ? AND conversation_id = ?"
        " UNION ALL SELECT (SELECT c.id FROM agent_messages c WHERE c.parent_id = down.id ORDER BY c.seq DESC"
        " LIMIT 1), depth + 1 FROM down WHERE down.id IS NOT NULL)"
        " SELECT id FROM down WHERE id IS NOT NULL ORDER BY depth DESC LIMIT 1",
        (message_id, conversation_id),
    ).fetchone()
    if row is None:
        raise MessageNotFound()
    return str(row[0])


def children(db: sqlite3.Connection, conversation_id: str, page: MessagePage) -> dict[str, list[str]]:
    """The children of the page's messages' parents, oldest first, by parent id (``""`` for the first messages)."""
    parents = {m.parent_id for m in page.messages}
    named = [p for p in parents if p is not None]
    rows = db.execute(
        f"SELECT parent_id, id FROM agent_messages WHERE conversation_id = ?"
        f" AND (parent_id IN ({','.join('?' * len(named))}) OR (parent_id IS NULL AND ?)) ORDER BY seq",
        (conversation_id, *named, None in parents),
    )
    found: dict[str, list[str]] = {}
    for parent_id, message_id in rows:
        found.setdefault(parent_id or "", []).append(message_id)
    return found
