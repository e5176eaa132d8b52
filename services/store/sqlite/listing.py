"""Listing in SQLite: conversations and messages by offset or by cursor, conversation search (FTS5), and the
conversations' own rows.

The conversation calls and ``message_page`` of the ``Store`` interface (``services.store`` says what each must do),
as functions on a store thread's connection. A cursor is a key (``ConversationKey``, ``MessageKey``); a page is the
``limit`` rows nearest the key on the side asked for, read by an index in that direction (conversations by
``(user_id, updated_at DESC, id)``, the messages of one branch by ``seq`` along its path, ``branches.PATH``) and
turned round when the order asked for is the other one. One row more than the page is read, to know whether more follow.

Search (``MIGRATION``, applied by ``SQLiteStore`` as a migration of its own): two FTS5 indexes, of the words of
message text and of conversation titles (``indexed_words``), kept in step by triggers. Assistant messages are inserted
empty and written as they stream, so the message index follows every change of ``content``. Every token is led by
its owner's search key, so the search matches every word of the user's text as a quoted prefix of the caller's own
tokens (``services/store/search.py``): its cost follows the caller's text, never everyone's.
"""

from __future__ import annotations

import json
import sqlite3
import uuid

from errors import ConversationNotFound
from services.store import Caller, Conversation, ConversationKey, ConversationPage, MessageKey, MessagePage, utc_now
from services.store.search import MAX_TERMS, search_words
from services.store.shared import (columns, from_row, page_of_conversations, page_of_messages, reads_downwards,
                                   with_siblings)
from services.store.sqlite import branches
from services.store.sqlite.writer import write_transaction

# The words a search can find, folded once by services/store/search.py: the index is fed "<owner>_<word>" tokens, which
# FTS5's ascii tokenizer (with "_" a token character) takes as they are: it splits at the spaces between them only
# (every other character in them is a letter, a mark or a digit) and lowercases nothing that is not already.
_TOKENIZER = "ascii tokenchars '_'"
WORDS_FUNCTION = "canvalo_search_words"


def indexed_words(owner: int | None, text: str | None) -> str:
    """What the index holds for ``text`` of the user whose search key is ``owner``: each distinct word as one token
    led by that key, so a user's search reads that user's words alone, whatever the others have written. Registered
    on every connection as ``canvalo_search_words``; a write made without it (another tool's) fails, never skips
    the index."""
    if owner is None or not text:
        return ""
    return " ".join(f"{owner}_{word}" for word in search_words(text))


# Replaces migration 4's indexes, whose tokenizer split and folded words its own way (Unicode 6.1: no Cherokee
# case, no Adlam or Osage letters) and whose matches were over every user's text.
MIGRATION = f"""
DROP TRIGGER IF EXISTS agent_messages_fts_insert;
DROP TRIGGER IF EXISTS agent_messages_fts_delete;
DROP TRIGGER IF EXISTS agent_messages_fts_update;
DROP TRIGGER IF EXISTS agent_conversations_fts_insert;
DROP TRIGGER IF EXISTS agent_conversations_fts_update;
DROP TRIGGER IF EXISTS agent_conversations_fts_delete;
DROP TABLE IF EXISTS agent_messages_fts;
DROP TABLE IF EXISTS agent_conversations_fts;
DROP TABLE IF EXISTS agent_conversation_search_keys;

-- A small stable integer per user, which leads each of the user's tokens.
CREATE TABLE agent_search_owners (
    key INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL UNIQUE
);
-- A conversation's implicit rowid may change on VACUUM, so its title is indexed under a key of its own.
CREATE TABLE agent_conversation_search_keys (
    key INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL UNIQUE
);
CREATE VIRTUAL TABLE agent_message_words USING fts5(words, tokenize = "{_TOKENIZER}");
CREATE VIRTUAL TABLE agent_title_words USING fts5(words, tokenize = "{_TOKENIZER}");

INSERT INTO agent_search_owners (user_id) SELECT DISTINCT user_id FROM agent_conversations ORDER BY user_id;
INSERT INTO agent_conversation_search_keys (conversation_id) SELECT id FROM agent_conversations;
INSERT INTO agent_title_words (rowid, words)
    SELECT k.key, {WORDS_FUNCTION}(o.key, c.title)
      FROM agent_conversation_search_keys k
      JOIN agent_conversations c ON c.id = k.conversation_id
      JOIN agent_search_owners o ON o.user_id = c.user_id;
INSERT INTO agent_message_words (rowid, words)
    SELECT m.seq, {WORDS_FUNCTION}(o.key, m.content)
      FROM agent_messages m
      JOIN agent_conversations c ON c.id = m.conversation_id
      JOIN agent_search_owners o ON o.user_id = c.user_id;

CREATE TRIGGER agent_title_words_insert AFTER INSERT ON agent_conversations
BEGIN
    INSERT INTO agent_search_owners (user_id)
        SELECT NEW.user_id WHERE NOT EXISTS (SELECT 1 FROM agent_search_owners WHERE user_id = NEW.user_id);
    INSERT INTO agent_conversation_search_keys (conversation_id) VALUES (NEW.id);
    INSERT INTO agent_title_words (rowid, words)
        SELECT k.key, {WORDS_FUNCTION}(o.key, NEW.title)
          FROM agent_conversation_search_keys k, agent_search_owners o
         WHERE k.conversation_id = NEW.id AND o.user_id = NEW.user_id;
END;
CREATE TRIGGER agent_title_words_update AFTER UPDATE OF title ON agent_conversations
WHEN OLD.title IS NOT NEW.title
BEGIN
    UPDATE agent_title_words
       SET words = {WORDS_FUNCTION}((SELECT key FROM agent_search_owners WHERE user_id = NEW.user_id), NEW.title)
     WHERE rowid = (SELECT key FROM agent_conversation_search_keys WHERE conversation_id = NEW.id);
END;
CREATE TRIGGER agent_title_words_delete AFTER DELETE ON agent_conversations
BEGIN
    DELETE FROM agent_title_words
     WHERE rowid = (SELECT key FROM agent_conversation_search_keys WHERE conversation_id = OLD.id);
    DELETE FROM agent_conversation_search_keys WHERE conversation_id = OLD.id;
END;
CREATE TRIGGER agent_message_words_insert AFTER INSERT ON agent_messages
BEGIN
    INSERT INTO agent_message_words (rowid, words)
        SELECT NEW.seq, {WORDS_FUNCTION}(o.key, NEW.content)
          FROM agent_conversations c JOIN agent_search_owners o ON o.user_id = c.user_id
         WHERE c.id = NEW.conversation_id;
END;
-- Only when the text changed: a run's flushes rewrite content with its metadata, often with the same text.
CREATE TRIGGER agent_message_words_update AFTER UPDATE OF content ON agent_messages
WHEN OLD.content IS NOT NEW.content
BEGIN
    UPDATE agent_message_words
       SET words = (SELECT {WORDS_FUNCTION}(o.key, NEW.content)
                      FROM agent_conversations c JOIN agent_search_owners o ON o.user_id = c.user_id
                     WHERE c.id = NEW.conversation_id)
     WHERE rowid = NEW.seq;
END;
CREATE TRIGGER agent_message_words_delete AFTER DELETE ON agent_messages
BEGIN
    DELETE FROM agent_message_words WHERE rowid = OLD.seq;
END;
"""

CONVERSATION_COLUMNS = columns(Conversation)

# The conversations holding every word, in a title or in one message: two FTS5 lookups of the caller's own tokens,
# each a set of ids, that the caller-scoped read below then filters by owner with its index.
_MATCHING = (
    "(id IN (SELECT k.conversation_id FROM agent_title_words"
    " JOIN agent_conversation_search_keys k ON k.key = agent_title_words.rowid"
    " WHERE agent_title_words MATCH ?)"
    " OR id IN (SELECT m.conversation_id FROM agent_message_words"
    " JOIN agent_messages m ON m.seq = agent_message_words.rowid WHERE agent_message_words MATCH ?))"
)
# Older/newer activity than a key, in the list's order (updated_at descending, then id ascending). The first term
# bounds the index range; the second breaks ties on updated_at by id.
_OLDER = "updated_at <= ? AND (updated_at < ? OR id > ?)"
_NEWER = "updated_at >= ? AND (updated_at > ? OR id < ?)"


def fts5_query(owner: int, terms: list[str]) -> str:
    """Every term as a quoted prefix of the owner's tokens (``"7_kitch"* "7_inv"*``): FTS5 reads nothing inside
    double quotes as syntax, and a term holds only letters, marks and digits."""
    return " ".join(f'"{owner}_{term}"*' for term in terms)


def list_conversations(
    db: sqlite3.Connection, caller: Caller, limit: int, offset: int, before: ConversationKey | None = None,
    after: ConversationKey | None = None, search: str | None = None
) -> ConversationPage:
    where, params = ["user_id = ?"], [caller.user_id]
    if search is not None:
        terms = search_words(search)[:MAX_TERMS]
        owner = db.execute("SELECT key FROM agent_search_owners WHERE user_id = ?", (caller.user_id,)).fetchone()
        if not terms or owner is None:
            return ConversationPage([], 0)
        match = fts5_query(owner[0], terms)
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
    return page_of_conversations(rows, limit, total, after, conversation_row)


def message_page(
    db: sqlite3.Connection, caller: Caller, conversation_id: str, limit: int, offset: int = 0, *,
    newest_first: bool = False, before: MessageKey | None = None, after: MessageKey | None = None,
    leaf: str | None = None,
) -> MessagePage:
    """See ``Store.message_page``: the branch ending at the active leaf, or at the newest leaf below ``leaf``."""
    active = get_conversation(db, caller, conversation_id).active_leaf_id
    end = active if leaf is None else branches.leaf_below(db, conversation_id, leaf)
    where: list[str] = ["id IN (SELECT id FROM path)"]
    params: list[object] = [end, conversation_id]
    if before is not None:
        where.append("seq < ?")
        params.append(before.seq)
    elif after is not None:
        where.append("seq > ?")
        params.append(after.seq)
    downwards = reads_downwards(before, after, newest_first)
    rows = db.execute(
        f"{branches.PATH} SELECT seq, {branches.MESSAGE_COLUMNS} FROM agent_messages WHERE {' AND '.join(where)}"
        f" ORDER BY seq {'DESC' if downwards else 'ASC'} LIMIT ? OFFSET ?",
        [*params, limit + 1, offset],
    ).fetchall()
    page = page_of_messages(rows, limit, downwards=downwards, newest_first=newest_first, key=_message_key,
                            decode=branches.message_row)
    return with_siblings(page, branches.children(db, conversation_id, page), end)


def set_active_leaf(db: sqlite3.Connection, caller: Caller, conversation_id: str, message_id: str) -> Conversation:
    with write_transaction(db):
        get_conversation(db, caller, conversation_id)
        leaf = branches.leaf_below(db, conversation_id, message_id)
        db.execute("UPDATE agent_conversations SET active_leaf_id = ? WHERE id = ?", (leaf, conversation_id))
        return get_conversation(db, caller, conversation_id)


def _message_key(row: sqlite3.Row) -> MessageKey:
    return MessageKey(row["created_at"], row["seq"])


def insert_conversation(db: sqlite3.Connection, caller: Caller, conversation_id: str, title: str | None) -> None:
    """OR IGNORE: a retry creates nothing twice, and an id that is someone else's is left untouched (the scoped fetch
    that follows says NotFound, as the Supabase store does)."""
    now = utc_now()
    db.execute(
        f"INSERT OR IGNORE INTO agent_conversations ({CONVERSATION_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, NULL, 0, '{}', NULL)",
        (conversation_id, caller.user_id, title, now, now),
    )


def create_conversation(db: sqlite3.Connection, caller: Caller, title: str | None) -> Conversation:
    new_id = str(uuid.uuid4())
    insert_conversation(db, caller, new_id, title)
    return get_conversation(db, caller, new_id)


def get_conversation(db: sqlite3.Connection, caller: Caller, conversation_id: str) -> Conversation:
    row = db.execute(
        f"SELECT {CONVERSATION_COLUMNS} FROM agent_conversations WHERE id = ? AND user_id = ?",
        (conversation_id, caller.user_id),
    ).fetchone()
    if row is None:
        raise ConversationNotFound()
    return conversation_row(row)


def rename_conversation(db: sqlite3.Connection, caller: Caller, conversation_id: str, title: str) -> Conversation:
    with write_transaction(db):
        # As Supabase's trigger (001): a new title is activity, the same one is not; time never goes back.
        db.execute(
            "UPDATE agent_conversations SET title = ?,"
            " updated_at = CASE WHEN title IS ? THEN updated_at ELSE max(updated_at, ?) END"
            " WHERE id = ? AND user_id = ?",
            (title, title, utc_now(), conversation_id, caller.user_id),
        )
        return get_conversation(db, caller, conversation_id)


def delete_conversation(db: sqlite3.Connection, caller: Caller, conversation_id: str) -> None:
    cursor = db.execute(
        "DELETE FROM agent_conversations WHERE id = ? AND user_id = ?", (conversation_id, caller.user_id)
    )
    if cursor.rowcount == 0:
        raise ConversationNotFound()


def conversation_row(row: sqlite3.Row) -> Conversation:
    return from_row(Conversation, row, metadata=json.loads)
