"""Listing in SQLite: conversations and messages by offset or by cursor, and conversation search (FTS5).

``list_conversations`` and ``message_page`` of the ``Store`` interface (``services/store.py`` says what each must do),
as functions on a store thread's connection. A cursor is a key (``ConversationKey``, ``MessageKey``); a page is the
``limit`` rows nearest the key on the side asked for, read by an index in that direction (conversations by
``(user_id, updated_at DESC, id)``, messages by ``(conversation_id, seq)``) and turned round when the order asked for
is the other one. One row more than the page is read, to know whether more follow.

Search (``MIGRATION``, applied by ``SQLiteStore`` as a migration of its own): two FTS5 indexes, of message text and of
conversation titles, kept in step by triggers. Assistant messages are inserted empty and written as they stream, so
the message index follows every change of ``content``. A conversation's implicit rowid may change on ``VACUUM``, so
the title index is keyed by ``agent_conversation_search_keys``, a stable integer per conversation. The search itself
matches every word of the user's text as a quoted prefix (``services/search.py``) and is then scoped to the caller.
"""

from __future__ import annotations

import json
import sqlite3

from services.search import search_terms
from services.sqlite_messages import MESSAGE_COLUMNS, message_row
from services.store import Caller, Conversation, ConversationKey, MessageKey, MessagePage, Page

# No diacritic folding, so both stores match alike (PostgreSQL's 'simple' configuration keeps accents too).
_TOKENIZER = "unicode61 remove_diacritics 0"

MIGRATION = f"""
CREATE VIRTUAL TABLE agent_messages_fts USING fts5(
    content, content = 'agent_messages', content_rowid = 'seq', tokenize = '{_TOKENIZER}'
);
INSERT INTO agent_messages_fts (agent_messages_fts) VALUES ('rebuild');
CREATE TRIGGER agent_messages_fts_insert AFTER INSERT ON agent_messages
BEGIN
    INSERT INTO agent_messages_fts (rowid, content) VALUES (NEW.seq, NEW.content);
END;
CREATE TRIGGER agent_messages_fts_delete AFTER DELETE ON agent_messages
BEGIN
    INSERT INTO agent_messages_fts (agent_messages_fts, rowid, content) VALUES ('delete', OLD.seq, OLD.content);
END;
-- Only when the text changed: a run's flushes rewrite content with its metadata, often with the same text.
CREATE TRIGGER agent_messages_fts_update AFTER UPDATE OF content ON agent_messages
WHEN OLD.content IS NOT NEW.content
BEGIN
    INSERT INTO agent_messages_fts (agent_messages_fts, rowid, content) VALUES ('delete', OLD.seq, OLD.content);
    INSERT INTO agent_messages_fts (rowid, content) VALUES (NEW.seq, NEW.content);
END;

CREATE TABLE agent_conversation_search_keys (
    key INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL UNIQUE
);
CREATE VIRTUAL TABLE agent_conversations_fts USING fts5(title, tokenize = '{_TOKENIZER}');
INSERT INTO agent_conversation_search_keys (conversation_id) SELECT id FROM agent_conversations;
INSERT INTO agent_conversations_fts (rowid, title)
    SELECT k.key, c.title FROM agent_conversation_search_keys k JOIN agent_conversations c ON c.id = k.conversation_id;
CREATE TRIGGER agent_conversations_fts_insert AFTER INSERT ON agent_conversations
BEGIN
    INSERT INTO agent_conversation_search_keys (conversation_id) VALUES (NEW.id);
    INSERT INTO agent_conversations_fts (rowid, title) VALUES (last_insert_rowid(), NEW.title);
END;
CREATE TRIGGER agent_conversations_fts_update AFTER UPDATE OF title ON agent_conversations
WHEN OLD.title IS NOT NEW.title
BEGIN
    UPDATE agent_conversations_fts SET title = NEW.title
     WHERE rowid = (SELECT key FROM agent_conversation_search_keys WHERE conversation_id = NEW.id);
END;
CREATE TRIGGER agent_conversations_fts_delete AFTER DELETE ON agent_conversations
BEGIN
    DELETE FROM agent_conversations_fts
     WHERE rowid = (SELECT key FROM agent_conversation_search_keys WHERE conversation_id = OLD.id);
    DELETE FROM agent_conversation_search_keys WHERE conversation_id = OLD.id;
END;
"""

CONVERSATION_COLUMNS = "id, user_id, title, created_at, updated_at, last_message_at, message_count, metadata"

# The conversations holding every word, in a title or in one message: two FTS5 lookups, each a set of ids, that the
# caller-scoped read below then filters by owner with its index.
_MATCHING = (
    "(id IN (SELECT k.conversation_id FROM agent_conversations_fts"
    " JOIN agent_conversation_search_keys k ON k.key = agent_conversations_fts.rowid"
    " WHERE agent_conversations_fts MATCH ?)"
    " OR id IN (SELECT m.conversation_id FROM agent_messages_fts"
    " JOIN agent_messages m ON m.seq = agent_messages_fts.rowid WHERE agent_messages_fts MATCH ?))"
)
# Older/newer activity than a key, in the list's order (updated_at descending, then id ascending). The first term
# bounds the index range; the second breaks ties on updated_at by id.
_OLDER = "updated_at <= ? AND (updated_at < ? OR id > ?)"
_NEWER = "updated_at >= ? AND (updated_at > ? OR id < ?)"


def fts5_query(terms: list[str]) -> str:
    """Every term as a quoted prefix (``"kitch"* "inv"*``): FTS5 reads nothing inside double quotes as syntax."""
    return " ".join('"' + term.replace('"', '""') + '"*' for term in terms)


def list_conversations(
    db: sqlite3.Connection,
    caller: Caller,
    limit: int,
    offset: int,
    before: ConversationKey | None,
    after: ConversationKey | None,
    search: str | None,
) -> Page:
    """See ``Store.list_conversations``."""
    where, params = ["user_id = ?"], [caller.user_id]
    if search is not None:
        terms = search_terms(search)
        if not terms:
            return Page([], 0)
        match = fts5_query(terms)
        # Driven by the matches, looked up by id, then kept if the caller's ("+" keeps SQLite off the owner index,
        # which would read every conversation of the caller to test each against the matches).
        where = ["+user_id = ?", _MATCHING]
        params += [match, match]
    total = db.execute(f"SELECT count(*) FROM agent_conversations WHERE {' AND '.join(where)}", params).fetchone()[0]
    order = "updated_at DESC, id"
    if before is not None or after is not None:
        key = before or after
        assert key is not None
        where.append(_OLDER if before is not None else _NEWER)
        params += [key.updated_at, key.updated_at, key.id]
        if after is not None:
            order = "updated_at, id DESC"  # nearest first: the newer side is read upwards, then turned round
    rows = db.execute(
        f"SELECT {CONVERSATION_COLUMNS} FROM agent_conversations WHERE {' AND '.join(where)}"
        f" ORDER BY {order} LIMIT ? OFFSET ?",
        [*params, limit + 1, offset],
    ).fetchall()
    conversations = [conversation_row(r) for r in rows[:limit]]
    if after is not None:
        conversations.reverse()
    return Page(conversations, total, has_more=len(rows) > limit)


def message_page(
    db: sqlite3.Connection,
    conversation_id: str,
    limit: int,
    offset: int,
    newest_first: bool,
    before: MessageKey | None,
    after: MessageKey | None,
) -> MessagePage:
    """See ``Store.message_page``; the caller has checked that the conversation is theirs."""
    where, params = ["conversation_id = ?"], [conversation_id]
    if before is not None:
        where.append("seq < ?")
        params.append(before.seq)
    elif after is not None:
        where.append("seq > ?")
        params.append(after.seq)
    # Read from the cursor outwards (or from the end asked for), then put the page in the order asked for.
    downwards = before is not None or (after is None and newest_first)
    rows = db.execute(
        f"SELECT seq, {MESSAGE_COLUMNS} FROM agent_messages WHERE {' AND '.join(where)}"
        f" ORDER BY seq {'DESC' if downwards else 'ASC'} LIMIT ? OFFSET ?",
        [*params, limit + 1, offset],
    ).fetchall()
    page = rows[:limit]
    ascending = page[::-1] if downwards else page
    keys = [MessageKey(r["created_at"], r["seq"]) for r in ascending]
    messages = [message_row(r) for r in ascending]
    if newest_first:
        messages.reverse()
    return MessagePage(
        messages, oldest=keys[0] if keys else None, newest=keys[-1] if keys else None, has_more=len(rows) > limit
    )


def conversation_row(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        user_id=row["user_id"],
        title=row["title"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_message_at=row["last_message_at"],
        message_count=row["message_count"],
        metadata=json.loads(row["metadata"]),
    )
