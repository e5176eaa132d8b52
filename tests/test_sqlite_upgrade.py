"""The embedded default's SQLite file from every earlier version of the service, with data in it, opened by this
version: every route works on the old data (a run a crashed version left 'running', a pending action kept without
`before`, messages without parent_id), nothing old is lost, and every answer is a documented shape."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import create_app
from services.store.sqlite import listing as sqlite_listing
from services.store.sqlite.store import MIGRATIONS
from tests.support import LiveServer, chunks, make_settings, new_id, serve

# Migration 4 as it shipped (git show dc89f1c^:services/sqlite_listing.py), before 5 replaced it with "": a file
# still at 4 has these tables and triggers, which 5 drops.
_TOKENIZER = "unicode61 remove_diacritics 0"
SHIPPED_4 = f"""
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

T0 = "2026-01-01T00:00:00.000000Z"
ODD = "Ünïcödé 👩‍🎨 مرحبا e\u0301 \u200b\u2028 \x07 İstanbul"


def _old_file(path: Path, version: int) -> dict[str, Any]:
    """A file as version ``version`` of the service left it, with a user's data in it."""
    db = sqlite3.connect(path)
    db.create_function(sqlite_listing.WORDS_FUNCTION, 2, sqlite_listing.indexed_words, deterministic=True)
    for number, script in enumerate(MIGRATIONS[:version], start=1):
        db.executescript(f"{SHIPPED_4 if number == 4 else script}; PRAGMA user_version = {number};")
    user = new_id()
    ids = {name: new_id() for name in ("linear", "unanswered", "crashed")}
    messages: dict[str, list[tuple[str, str, str]]] = {}
    for name, conversation in ids.items():
        db.execute("INSERT INTO agent_conversations (id, user_id, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                   (conversation, user, None if name == "linear" else ODD, T0, T0))

    def add(name: str, role: str, content: str, metadata: dict[str, Any] | None = None) -> str:
        message = new_id()
        db.execute("INSERT INTO agent_messages (id, conversation_id, role, content, agent_type, metadata, created_at)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?)", (message, ids[name], role, content,
                                                     None if role == "user" else "supervisor",
                                                     json.dumps(metadata or {}), T0))  # all at one instant
        messages.setdefault(name, []).append((message, role, content))
        return message

    add("linear", "user", "What invoices do I have?")
    add("linear", "assistant", "You have no invoices.", {"status": "complete"})
    add("linear", "user", ODD)
    add("linear", "assistant", "Noted.", {"status": "complete"})
    add("unanswered", "user", "first try")
    add("unanswered", "user", "second try")
    add("crashed", "user", "Tell me about my projects")
    run = new_id()
    if version >= 2:  # a run the old version was writing when it crashed: 'running', its heartbeat long gone
        answer = add("crashed", "assistant", "You have two proj", {"status": "streaming", "run_id": run, "seq": 3})
        now = time.time()
        db.execute("INSERT INTO agent_runs (id, user_id, conversation_id, user_message_id, assistant_message_id,"
                   " client_message_id, status, last_seq, created_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?,"
                   " 'running', 0, ?, ?)", (run, user, ids["crashed"], messages["crashed"][0][0], answer, new_id(),
                                            now - 7200, now - 7000))
    action = new_id()
    if version >= 3:  # prepared by the old version, never confirmed; before migration 6 it has no `before`
        now = time.time()
        db.execute("INSERT INTO pending_actions (id, user_id, table_name, tool, kind, record_id, changes, summary,"
                   " created_at, expires_at) VALUES (?, ?, 'invoices', 'update_invoice', 'update', ?, ?,"
                   " 'Mark invoice INV-1 as paid', ?, ?)",
                   (action, user, new_id(), json.dumps({"status": "paid"}), now - 10, now + 3600))
    if version >= 7:  # that version wrote each message's parent and the conversation's leaf itself
        db.executescript(MIGRATIONS[6].split("CREATE INDEX")[0].split("ALTER TABLE agent_runs")[1].split(";", 1)[1])
    db.commit()
    db.close()
    return {"user": user, "ids": ids, "messages": messages, "run": run, "action": action}


@pytest.fixture(params=range(1, len(MIGRATIONS)), ids=lambda v: f"v{v}")
def old(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[LiveServer, dict[str, Any], int]]:
    version = request.param
    data = _old_file(tmp_path / "canvalo.db", version)
    with serve(create_app(make_settings(tmp_path))) as live:
        yield live, data, version


def test_an_earlier_versions_file_serves_every_route(old: tuple[LiveServer, dict[str, Any], int]) -> None:
    live, data, version = old
    user, ids = data["user"], data["ids"]
    http = httpx.Client(base_url=live.url, timeout=15)

    def read(name: str, **params: Any) -> dict[str, Any]:
        response = http.get(f"/api/conversations/{ids[name]}", params={"user_id": user, **params})
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    listed = http.get("/api/conversations", params={"user_id": user})
    assert listed.status_code == 200, listed.text
    assert {c["id"] for c in listed.json()["conversations"]} == set(ids.values())
    found = http.get("/api/conversations", params={"user_id": user, "q": "İstanbul"})
    assert found.status_code == 200, found.text
    assert {c["id"] for c in found.json()["conversations"]} == set(ids.values())
    for name, expected in data["messages"].items():
        shown = read(name)["messages"]
        assert [(m["id"], m["role"], m["content"]) for m in shown[:len(expected)]] == expected, name
        assert [m["parent_id"] for m in shown] == [None] + [m["id"] for m in shown[:-1]], name
    if version >= 2:  # the crashed run: ended as interrupted, its partial answer kept, its events stream ends
        events = http.get(f"/api/chat/runs/{data['run']}/events", params={"user_id": user})
        assert events.status_code == 200, events.text
        assert chunks(events.text)[-1]["type"] in ("error", "complete"), events.text
        stopped = http.post(f"/api/chat/runs/{data['run']}/stop", json={"user_id": user})
        assert stopped.status_code in (200, 202), stopped.text
        answer = read("crashed")["messages"][1]
        assert answer["content"].startswith("You have two proj") and answer["metadata"]["status"] != "streaming"
    if version >= 3:  # an action kept without the values it replaces is shown, and refused as expired
        action = http.get(f"/api/actions/{data['action']}", params={"user_id": user})
        assert action.status_code == 200, action.text
        confirmed = http.post(f"/api/actions/{data['action']}/confirm", json={"user_id": user})
        assert confirmed.status_code in (404, 409, 410), confirmed.text
        if version < 6:
            assert action.json()["status"] == "expired" and confirmed.json()["error"]["code"] == "ACTION_EXPIRED"
    for name in ids:
        sent = http.post("/api/chat/stream", json={"message": "hello", "conversation_id": ids[name], "user_id": user})
        assert sent.status_code == 200, sent.text
        assert chunks(sent.text)[-1]["type"] == "complete", sent.text[-400:]
    linear = data["messages"]["linear"]
    regenerated = http.post("/api/chat/stream", json={"conversation_id": ids["linear"], "user_id": user,
                                                      "regenerate_message_id": linear[1][0]})
    assert regenerated.status_code == 200 and chunks(regenerated.text)[-1]["type"] == "complete", regenerated.text
    edited = http.post("/api/chat/stream", json={"message": "edited", "conversation_id": ids["linear"],
                                                 "user_id": user, "edit_message_id": linear[2][0]})
    assert edited.status_code == 200 and chunks(edited.text)[-1]["type"] == "complete", edited.text
    back = http.put(f"/api/conversations/{ids['linear']}/active-leaf", json={"user_id": user, "message_id": linear[3][0]})
    assert back.status_code == 200, back.text
    assert [m["id"] for m in read("linear")["messages"]][:4] == [m[0] for m in linear]
    usage = http.get("/api/usage", params={"user_id": user, "period": "month"})
    assert usage.status_code == 200, usage.text
    deleted = http.delete(f"/api/conversations/{ids['crashed']}", params={"user_id": user})
    assert deleted.status_code == 200, deleted.text
    http.close()
