"""Edit and regenerate (issue 24): a conversation is a tree of messages, on both stores, through a live server.

Every answer here is numbered by the model that wrote it, and every prompt the model received is kept, so a test can
show that what the model saw is exactly the branch the reader sees, and the run's recorded ids say the same.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import create_app
from services.model import ModelEvent, ModelRequest
from services.store.sqlite import listing as sqlite_listing
from services.store.sqlite.store import MIGRATIONS
from tests.conftest import DATABASE, AuthHeaders
from tests.pg import MIGRATIONS_DIR, act_as, create_supabase_database
from tests.scripted_model import ScriptedModel
from tests.support import LiveServer, chunks, make_settings, new_id, serve
from tests.test_api import assert_envelope


@dataclass
class NumberedModel(ScriptedModel):
    """Answers "answer N" to its Nth call, so every answer in a tree is told apart."""

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        self.pieces = [f"answer {len(self.requests) + 1}"]
        async for event in super().stream(request):
            yield event


@dataclass
class Chat:
    """One user on a live server: sends, reads and switches branches of one conversation."""

    live: LiveServer
    auth: AuthHeaders
    user: str
    conversation: str

    def send(self, message: str | None = "hi", **branch: Any) -> httpx.Response:
        body = {"conversation_id": self.conversation, "user_id": self.user, **branch}
        if message is not None:
            body["message"] = message
        return httpx.post(f"{self.live.url}/api/chat/stream", json=body, headers=self.auth(self.user), timeout=30)

    def turn(self, message: str | None = "hi", **branch: Any) -> dict[str, Any]:
        """A turn that must succeed: its complete chunk."""
        response = self.send(message, **branch)
        assert response.status_code == 200, response.text
        return chunks(response.text)[-1]

    def read(self, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.live.url}/api/conversations/{self.conversation}",
                         params={"user_id": self.user, **params}, headers=self.auth(self.user), timeout=10)

    def path(self, **params: Any) -> list[dict[str, Any]]:
        response = self.read(**params)
        assert response.status_code == 200, response.text
        return response.json()["messages"]  # type: ignore[no-any-return]

    def switch(self, message_id: str) -> httpx.Response:
        return httpx.put(f"{self.live.url}/api/conversations/{self.conversation}/active-leaf",
                         json={"user_id": self.user, "message_id": message_id}, headers=self.auth(self.user),
                         timeout=10)


def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages]


def seen(model: ScriptedModel) -> list[str]:
    """What the model's latest call was sent: each turn's text, oldest first."""
    return ["".join(block["text"] for block in turn["content"]) for turn in model.requests[-1].messages]


@pytest.fixture
def prompt_ids(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[str], list[str]]:
    """The ids a run recorded as its prompt's path, read from the store's own table."""

    def read(run_id: str) -> list[str]:
        if store_kind == "sqlite":
            with sqlite3.connect(tmp_path / "canvalo.db") as db:
                row = db.execute("SELECT prompt_message_ids FROM agent_runs WHERE id = ?", (run_id,)).fetchone()
            return json.loads(row[0])  # type: ignore[no-any-return]
        with request.getfixturevalue("pg_cluster").connect(DATABASE) as db:
            row = db.execute("select prompt_message_ids from api.agent_runs where id = %s", (run_id,)).fetchone()
        return [str(value) for value in row[0]]

    return read


@pytest.fixture
def model() -> NumberedModel:
    return NumberedModel(pieces=[])


@pytest.fixture
def chat(tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, model: NumberedModel) -> Iterator[Chat]:
    with serve(create_app(make_settings(tmp_path, **service_env), model=model)) as live:
        yield Chat(live, auth_headers, new_id(), new_id())


def test_a_client_that_sends_no_parent_builds_one_linear_branch(chat: Chat, model: NumberedModel) -> None:
    chat.turn("first")
    chat.turn("second")
    messages = chat.path()
    assert texts(messages) == ["first", "answer 1", "second", "answer 2"]
    assert [m["parent_id"] for m in messages] == [None] + [m["id"] for m in messages[:-1]]
    assert all(m["sibling_ids"] == [m["id"]] for m in messages)
    body = chat.read().json()
    assert body["active_leaf_id"] == body["leaf_id"] == messages[-1]["id"]
    assert seen(model) == ["first", "answer 1", "second"]
    for query in ({}, {"q": "second"}):  # the list and a search show the conversation as a read does
        listed = httpx.get(f"{chat.live.url}/api/conversations", params={"user_id": chat.user, **query},
                           headers=chat.auth(chat.user), timeout=10).json()["conversations"]
        assert [(c["id"], c["active_leaf_id"]) for c in listed] == [(chat.conversation, messages[-1]["id"])]


def test_an_edit_makes_a_sibling_and_the_old_branch_stays(
    chat: Chat, model: NumberedModel, prompt_ids: Callable[[str], list[str]]
) -> None:
    chat.turn("paint the kitchen")
    chat.turn("blue walls")
    first, answer, old, old_answer = chat.path()
    done = chat.turn("green walls", edit_message_id=old["id"])
    messages = chat.path()
    assert texts(messages) == ["paint the kitchen", "answer 1", "green walls", "answer 3"]
    assert messages[2]["parent_id"] == answer["id"] and messages[2]["sibling_ids"] == [old["id"], messages[2]["id"]]
    assert seen(model) == ["paint the kitchen", "answer 1", "green walls"]
    assert prompt_ids(done["run_id"]) == [first["id"], answer["id"], messages[2]["id"]]
    assert texts(chat.path(leaf=old["id"])) == ["paint the kitchen", "answer 1", "blue walls", "answer 2"]
    assert chat.read().json()["message_count"] == 6  # every node, on every branch


def test_three_edits_of_the_first_message_then_a_switch_to_each_branch_survives_a_reload(chat: Chat) -> None:
    chat.turn("v1")
    root = chat.path()[0]["id"]
    for version in ("v2", "v3", "v4"):
        chat.turn(version, edit_message_id=root)
    roots = chat.path()[0]["sibling_ids"]
    assert len(roots) == 4 and roots[0] == root
    for index, message_id in enumerate(roots):
        switched = chat.switch(message_id)
        assert switched.status_code == 200, switched.text
        shown = chat.path()  # a reload: the stored active leaf, nothing the browser kept
        assert texts(shown) == [f"v{index + 1}", f"answer {index + 1}"]
        assert switched.json()["active_leaf_id"] == shown[-1]["id"]  # switched to that branch's leaf


def test_regenerate_adds_answers_without_a_second_user_message_and_the_prompt_is_the_path(
    chat: Chat, model: NumberedModel, prompt_ids: Callable[[str], list[str]]
) -> None:
    chat.turn("what invoices do I have?")
    question, first = chat.path()
    second = chat.turn(None, regenerate_message_id=first["id"])
    assert seen(model) == ["what invoices do I have?"]  # the user message once, and no earlier answer
    assert prompt_ids(second["run_id"]) == [question["id"]]
    chat.turn(None, regenerate_message_id=first["id"])
    messages = chat.path()  # a reload
    assert texts(messages) == ["what invoices do I have?", "answer 3"]
    assert messages[1]["sibling_ids"][0] == first["id"] and len(messages[1]["sibling_ids"]) == 3
    assert chat.read().json()["message_count"] == 4  # one user message, three answers
    assert texts(chat.path(leaf=second["message_id"])) == ["what invoices do I have?", "answer 2"]


def test_a_repeated_regenerate_attaches_and_a_new_client_message_id_makes_a_new_sibling(
    chat: Chat, model: NumberedModel
) -> None:
    chat.turn("hello")
    answer = chat.path()[1]["id"]
    client_message_id = new_id()
    first = chat.send(None, regenerate_message_id=answer, client_message_id=client_message_id)
    repeat = chat.send(None, regenerate_message_id=answer, client_message_id=client_message_id)
    assert first.status_code == repeat.status_code == 200
    assert repeat.headers["x-run-id"] == first.headers["x-run-id"] and len(model.requests) == 2
    fresh = chat.send(None, regenerate_message_id=answer, client_message_id=new_id())
    assert fresh.headers["x-run-id"] != first.headers["x-run-id"] and len(model.requests) == 3
    assert len(chat.path()[1]["sibling_ids"]) == 3
    # The same id again for something else: a conflict, nothing made.
    assert_envelope(chat.send("a new question", client_message_id=client_message_id), 409, "IDEMPOTENCY_CONFLICT")
    assert len(model.requests) == 3


def test_a_send_after_an_earlier_answer_branches_there_and_moves_the_active_leaf(chat: Chat) -> None:
    chat.turn("one")
    chat.turn("two")
    first_answer = chat.path()[1]["id"]
    chat.turn("three", parent_message_id=first_answer)
    assert texts(chat.path()) == ["one", "answer 1", "three", "answer 3"]
    assert chat.switch(chat.path()[2]["sibling_ids"][0]).status_code == 200
    chat.turn("four")  # no parent: after the active leaf, the "two" branch
    assert texts(chat.path()) == ["one", "answer 1", "two", "answer 2", "four", "answer 4"]


def test_a_branch_point_outside_the_conversation_or_of_the_wrong_role_is_a_4xx_and_stores_nothing(
    chat: Chat, auth_headers: AuthHeaders
) -> None:
    chat.turn("mine")
    question, answer = chat.path()
    elsewhere = Chat(chat.live, chat.auth, chat.user, new_id())
    elsewhere.turn("other conversation")
    foreign = Chat(chat.live, auth_headers, new_id(), new_id())
    foreign.turn("someone else's")
    cases = [
        ({"parent_message_id": elsewhere.path()[1]["id"]}, 404, "MESSAGE_NOT_FOUND"),
        ({"regenerate_message_id": foreign.path()[1]["id"]}, 404, "MESSAGE_NOT_FOUND"),
        ({"edit_message_id": new_id()}, 404, "MESSAGE_NOT_FOUND"),
        ({"parent_message_id": question["id"]}, 422, "VALIDATION_ERROR"),
        ({"regenerate_message_id": question["id"]}, 422, "VALIDATION_ERROR"),
        ({"edit_message_id": answer["id"]}, 422, "VALIDATION_ERROR"),
        ({"parent_message_id": "not-a-uuid"}, 422, "VALIDATION_ERROR"),
        ({"parent_message_id": answer["id"], "edit_message_id": question["id"]}, 422, "VALIDATION_ERROR"),
    ]
    for branch, status, code in cases:
        assert_envelope(chat.send("x", **branch), status, code)
    assert_envelope(chat.send(None), 422, "VALIDATION_ERROR")  # a message is required but for a regenerate
    fresh = Chat(chat.live, chat.auth, chat.user, new_id())
    assert_envelope(fresh.send("x", parent_message_id=answer["id"]), 404, "MESSAGE_NOT_FOUND")
    assert_envelope(fresh.read(), 404, "CONVERSATION_NOT_FOUND")  # the refused turn created nothing
    assert_envelope(chat.read(leaf=foreign.path()[0]["id"]), 404, "MESSAGE_NOT_FOUND")
    assert_envelope(chat.read(leaf="nope"), 422, "VALIDATION_ERROR")
    assert_envelope(chat.switch(elsewhere.path()[0]["id"]), 404, "MESSAGE_NOT_FOUND")
    assert_envelope(foreign.switch(question["id"]), 404, "MESSAGE_NOT_FOUND")
    assert_envelope(Chat(chat.live, auth_headers, foreign.user, chat.conversation).switch(question["id"]), 404,
                    "CONVERSATION_NOT_FOUND")
    body = chat.read().json()
    assert (body["message_count"], body["active_leaf_id"]) == (2, answer["id"])


def test_an_edit_on_another_branch_while_a_run_generates_is_409(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders
) -> None:
    slow = ScriptedModel(pieces=[f"w{i} " for i in range(200)], pause=0.02)
    with serve(create_app(make_settings(tmp_path, **service_env), model=slow)) as live:
        chat = Chat(live, auth_headers, new_id(), new_id())
        body = {"conversation_id": chat.conversation, "user_id": chat.user, "message": "first"}
        with httpx.stream("POST", f"{live.url}/api/chat/stream", json=body, headers=auth_headers(chat.user),
                          timeout=30) as running:
            next(running.iter_lines())  # generating
            question = chat.path()[0]["id"]
            assert_envelope(chat.send("edited", edit_message_id=question), 409, "RUN_IN_PROGRESS")
            assert_envelope(chat.send(None, regenerate_message_id=chat.path()[1]["id"]), 409, "RUN_IN_PROGRESS")
            httpx.post(f"{live.url}/api/chat/runs/{running.headers['x-run-id']}/stop",
                       json={"user_id": chat.user}, headers=auth_headers(chat.user), timeout=10)
        stopped = chat.path()[1]
        assert stopped["metadata"]["status"] == "stopped"
        chat.turn("edited", edit_message_id=question)  # a stopped answer is a node like any other: it stays
        assert len(chat.path()[0]["sibling_ids"]) == 2


# -- existing conversations become one branch ------------------------------------------------------------------------


def _linear_rows(n: int) -> list[tuple[str, str, str]]:
    return [(new_id(), "user" if i % 2 == 0 else "assistant", f"message {i}") for i in range(n)]


def test_sqlite_migration_makes_existing_conversations_one_branch(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.create_function(sqlite_listing.WORDS_FUNCTION, 2, sqlite_listing.indexed_words, deterministic=True)
    for number, script in enumerate(MIGRATIONS[:6], start=1):
        db.executescript(f"{script}; PRAGMA user_version = {number};")
    conversation, rows = new_id(), _linear_rows(4)
    db.execute("INSERT INTO agent_conversations (id, user_id, title, created_at, updated_at) VALUES (?, ?, 't',"
               " '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z')", (conversation, new_id()))
    db.executemany("INSERT INTO agent_messages (id, conversation_id, role, content, created_at)"
                   " VALUES (?, ?, ?, ?, '2026-01-01T00:00:00.000000Z')",
                   [(i, conversation, role, text) for i, role, text in rows])
    db.commit()
    db.executescript(f"BEGIN; {MIGRATIONS[6]}; PRAGMA user_version = 7; COMMIT;")
    parents = db.execute("SELECT id, parent_id FROM agent_messages ORDER BY seq").fetchall()
    leaf = db.execute("SELECT active_leaf_id FROM agent_conversations").fetchone()[0]
    assert parents == [(rows[0][0], None)] + [(rows[i][0], rows[i - 1][0]) for i in range(1, 4)]
    assert leaf == rows[-1][0]


def test_postgres_migration_makes_existing_conversations_one_branch_and_runs_twice(pg_cluster: Any) -> None:
    name = "backfill_branches"
    create_supabase_database(pg_cluster, name, migrate=False)
    branches = MIGRATIONS_DIR / "012_branches.sql"
    before = [script for script in sorted(MIGRATIONS_DIR.glob("*.sql")) if script.name < branches.name]
    user, conversation, rows = new_id(), new_id(), _linear_rows(5)
    with pg_cluster.connect(name) as db:
        for script in before:  # a project as it was before 012: conversations without parents
            db.execute(script.read_text())
        db.execute("insert into auth.users (id) values (%s)", (user,))
        db.execute("insert into api.agent_conversations (id, user_id, title) values (%s, %s, 't')", (conversation, user))
        # Rows stored out of order: the newest written first, and the rest at one instant (seq orders them).
        for i, role, text in [rows[4], rows[0], rows[2], rows[1], rows[3]]:
            at = "2026-01-02 00:00:00+00" if i == rows[4][0] else "2026-01-01 00:00:00+00"
            db.execute("insert into api.agent_messages (id, conversation_id, role, content, created_at)"
                       " values (%s, %s, %s, %s, %s)", (i, conversation, role, text, at))
        for _ in range(2):
            db.execute(branches.read_text())
        stored = [rows[0], rows[2], rows[1], rows[3], rows[4]]  # by (created_at, seq)
        parents = dict(db.execute("select id::text, parent_id::text from api.agent_messages").fetchall())
        assert parents == {stored[0][0]: None, **{stored[i][0]: stored[i - 1][0] for i in range(1, 5)}}
        leaf = db.execute("select active_leaf_id::text from api.agent_conversations").fetchone()
        assert leaf == (stored[-1][0],)
        with db.transaction():
            act_as(db, user)
            page = db.execute("select api.agent_message_branch(%s)", (conversation,)).fetchone()[0]
        assert [row["content"] for row in page["rows"]] == [text for _, _, text in stored]
