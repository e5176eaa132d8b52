"""A conversation's counters and active leaf, as every turn and every delete leaves them (016), in real PostgreSQL.

016 keeps api.agent_conversations.message_count, last_message_at and updated_at per statement instead of per row,
and has agent_run_begin insert the user's message and its answer in one statement and read the answer's history with
its path. Each test reads the rows back as the database owner and compares them with what 001's per-row trigger and
015's begin left: the count of the conversation's messages, the newest created_at, the answer as the leaf.
Turns are begun as PostgREST sends them (role and claims set in the transaction, on the authenticator's login).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import DATABASE
from tests.pg import MIGRATIONS_DIR, SERVICE, act_as, create_supabase_database
from tests.support import new_id


def _as(db: psycopg.Connection[Any], user: str | None, query: str, *args: Any,
        headers: dict[str, str] | None = None) -> Any:
    """``query``'s answer, run as ``user`` (``anon`` for None) in a transaction of its own, with ``headers``."""
    with db.transaction():
        act_as(db, user, headers=headers)
        return db.execute(query, args).fetchone()[0]  # type: ignore[index]


class User:
    """One signed-in user beginning turns in their conversations, and ending each as its worker would."""

    def __init__(self, db: psycopg.Connection[Any], user_id: str) -> None:
        self.db, self.id = db, user_id

    def begin(self, conversation: str, text: str | None = "hi", **branch: str) -> dict[str, Any]:
        args = {"p_run_id": new_id(), "p_conversation_id": conversation, "p_text": text, "p_title": "t",
                "p_user_message_id": new_id(), "p_assistant_message_id": new_id(), "p_stale_seconds": 30,
                "p_events_ttl": 3600, "p_window_seconds": 60, "p_history_limit": 50,
                "p_write_key": secrets.token_hex(32), "p_client_message_id": new_id(), "p_chat_limit": 1000,
                "p_stream_limit": 10, **{f"p_{name}_message_id": value for name, value in branch.items()}}
        named = ", ".join(f"{name} => %s" for name in args)
        answer = _as(self.db, self.id, f"select api.agent_run_begin({named})", *args.values(), headers=SERVICE)
        answer["args"] = args
        return answer  # type: ignore[no-any-return]

    def turn(self, conversation: str, text: str | None = "hi", **branch: str) -> dict[str, Any]:
        """A turn that starts and completes: its begin's answer."""
        begun = self.begin(conversation, text, **branch)
        assert begun["outcome"] == "started", begun
        args = begun["args"]
        update = {"run_id": args["p_run_id"], "write_key": args["p_write_key"], "first_seq": 1, "last_seq": 1,
                  "frames": 'id: 1\ndata: {"type":"token","content":"ok"}\n\n', "content": "ok",
                  "metadata": {"status": "complete"}, "agent_type": "supervisor", "heartbeat": True,
                  "final_status": "complete"}
        flushed = _as(self.db, None, "select api.agent_runs_flush(%s)", Jsonb([update]))
        assert flushed[0]["applied"] is True, flushed
        return begun


@pytest.fixture
def connect(pg_cluster: Any) -> Iterator[Callable[[str], psycopg.Connection[Any]]]:
    opened: list[psycopg.Connection[Any]] = []

    def open_(database: str) -> psycopg.Connection[Any]:
        opened.append(psycopg.connect(pg_cluster.dsn(database, "authenticator"), autocommit=True))
        return opened[-1]

    yield open_
    for db in opened:
        db.close()


@pytest.fixture
def user(connect: Callable[[str], psycopg.Connection[Any]], register_user: Callable[[str], None]) -> Callable[[], User]:
    def make() -> User:
        made = User(connect(DATABASE), new_id())
        register_user(made.id)
        return made

    return make


def conversation_row(owner: psycopg.Connection[Any], conversation: str) -> dict[str, Any]:
    row = owner.execute("select to_jsonb(c) - 'words' from api.agent_conversations c where c.id = %s",
                        (conversation,)).fetchone()
    return row[0] if row else None  # type: ignore[return-value]


def expected(owner: psycopg.Connection[Any], conversation: str) -> tuple[int, datetime | None]:
    """What 001's trigger counted: every message of the conversation, and the newest created_at."""
    return owner.execute("select count(*), max(created_at) from api.agent_messages where conversation_id = %s",
                         (conversation,)).fetchone()  # type: ignore[return-value]


def counters(owner: psycopg.Connection[Any], conversation: str) -> tuple[Any, ...]:
    return owner.execute("select message_count, last_message_at, updated_at, active_leaf_id::text"
                         " from api.agent_conversations where id = %s", (conversation,)).fetchone()  # type: ignore


def test_every_kind_of_turn_counts_its_messages_and_makes_its_answer_the_active_leaf(
    user: Callable[[], User], pg_cluster: Any
) -> None:
    alice, conversation = user(), new_id()
    with pg_cluster.connect(DATABASE) as owner:
        first = alice.turn(conversation, "first")
        count, newest = expected(owner, conversation)
        assert counters(owner, conversation) == (2, newest, newest, first["args"]["p_assistant_message_id"])
        assert count == 2
        second = alice.turn(conversation, "second")
        edit = alice.turn(conversation, "second, edited", edit=second["args"]["p_user_message_id"])
        regenerate = alice.turn(conversation, None, regenerate=edit["args"]["p_assistant_message_id"])
        # After the first answer again: a branch beside the edits, which the leaf follows.
        after = alice.turn(conversation, "third", parent=first["args"]["p_assistant_message_id"])
        turns = [first, second, edit, regenerate, after]
        count, newest = expected(owner, conversation)
        assert count == 9  # two messages a turn, one for the regenerate: every branch kept
        assert counters(owner, conversation) == (9, newest, newest, after["args"]["p_assistant_message_id"])
        assert newest == owner.execute("select created_at from api.agent_messages where id = %s",
                                       (after["args"]["p_assistant_message_id"],)).fetchone()[0]
        # Each answer follows its user's message, inserted just before it (seq); the regenerate's follows the edit's.
        for begun in turns:
            args = begun["args"]
            answered = begun["run"]["user_message_id"]
            answer = owner.execute("select parent_id::text, role, content from api.agent_messages where id = %s",
                                   (args["p_assistant_message_id"],)).fetchone()
            assert answer == (answered, "assistant", "ok")
            if args["p_text"] is not None:
                asked = owner.execute("select role, content, metadata, (select seq from api.agent_messages"
                                      " where id = %s) > seq from api.agent_messages where id = %s",
                                      (args["p_assistant_message_id"], answered)).fetchone()
                assert asked == ("user", args["p_text"], {}, True)
        assert regenerate["run"]["user_message_id"] == edit["args"]["p_user_message_id"]
        # The answer's history is the path to the user's message, each row as the table holds it.
        for begun in turns:
            path = begun["history"]
            ids = [m["id"] for m in path]
            assert ids == owner.execute("select prompt_message_ids::text[] from api.agent_runs where id = %s",
                                        (begun["run"]["id"],)).fetchone()[0]
            assert ids[-1] == begun["run"]["user_message_id"] and path[0]["parent_id"] is None
            assert all(m["parent_id"] == p["id"] for p, m in zip(path, path[1:]))
            assert "words" not in path[0] and set(path[0]) == {
                "id", "conversation_id", "content", "role", "agent_type", "metadata", "created_at", "seq", "parent_id"}
        assert [m["content"] for m in after["history"]] == ["first", "ok", "third"]
        assert [m["content"] for m in regenerate["history"]] == ["first", "ok", "second, edited"]


def test_a_turn_begun_again_with_its_key_answers_as_it_began(user: Callable[[], User], pg_cluster: Any) -> None:
    alice, conversation = user(), new_id()
    alice.turn(conversation, "first")
    begun = alice.begin(conversation, "second")
    again = alice.begin(conversation, "second")
    assert again["outcome"] == "in_progress"  # a new run while one generates
    repeated = _as(alice.db, alice.id,
                   "select api.agent_run_begin(" + ", ".join(f"{name} => %s" for name in begun["args"]) + ")",
                   *begun["args"].values(), headers=SERVICE)
    assert repeated["outcome"] == "started"
    assert (repeated["run"], repeated["history"]) == (begun["run"], begun["history"])
    with pg_cluster.connect(DATABASE) as owner:
        assert counters(owner, conversation)[:1] == (4,)  # the repeat inserted nothing


def test_a_refused_turn_and_another_users_turn_leave_the_counters_alone(
    user: Callable[[], User], pg_cluster: Any
) -> None:
    alice, bob, conversation = user(), user(), new_id()
    first = alice.turn(conversation, "first")
    with pg_cluster.connect(DATABASE) as owner:
        before = conversation_row(owner, conversation)
        assert bob.begin(conversation, "mine now")["outcome"] == "not_found"
        assert bob.begin(new_id(), "x", parent=first["args"]["p_assistant_message_id"])["outcome"] == \
            "message_not_found"
        assert alice.begin(conversation, "x", edit=first["args"]["p_assistant_message_id"])["outcome"] == "wrong_role"
        assert conversation_row(owner, conversation) == before
        assert owner.execute("select count(*) from api.agent_conversations c where c.user_id = %s",
                             (bob.id,)).fetchone() == (0,)


def test_deletes_take_their_own_count_off_each_conversation_and_never_below_zero(
    user: Callable[[], User], pg_cluster: Any
) -> None:
    alice, one, two = user(), new_id(), new_id()
    for conversation in (one, two, one):
        alice.turn(conversation)
    with pg_cluster.connect(DATABASE) as owner:
        kept = {c: counters(owner, c) for c in (one, two)}
        assert (kept[one][0], kept[two][0]) == (4, 2)
        # One statement over both conversations (users cannot delete messages; the owner can).
        owner.execute("delete from api.agent_messages where id in ((select id from api.agent_messages"
                      " where conversation_id = %s order by seq limit 3) union all (select id from"
                      " api.agent_messages where conversation_id = %s order by seq limit 1))", (one, two))
        assert counters(owner, one) == (1, *kept[one][1:])  # the times and the leaf stay as they were
        assert counters(owner, two) == (1, *kept[two][1:])
        owner.execute("update api.agent_conversations set message_count = 0 where id = %s", (one,))
        owner.execute("delete from api.agent_messages where conversation_id = %s", (one,))
        assert counters(owner, one)[0] == 0
        assert expected(owner, two)[0] == 1
        # A conversation deleted takes its messages (its statement finds no conversation to count) and nothing else.
        assert _as(alice.db, alice.id, "select api.agent_conversation_delete(%s)", one) is True
        assert conversation_row(owner, one) is None and expected(owner, one)[0] == 0
        assert counters(owner, two) == (1, *kept[two][1:])


def test_a_statement_over_many_conversations_counts_each_as_one_row_at_a_time_did(
    user: Callable[[], User], pg_cluster: Any
) -> None:
    alice, one, two = user(), new_id(), new_id()
    alice.turn(one)
    alice.turn(two)
    rows = [(one, "2000-01-01 00:00:00+00"), (two, "2999-01-01 00:00:00+00"), (one, "2999-06-01 00:00:00+00"),
            (one, "2999-03-01 00:00:00+00"), (two, "2000-01-01 00:00:00+00")]
    with pg_cluster.connect(DATABASE) as owner:
        before = {c: counters(owner, c) for c in (one, two)}
        ids = [new_id() for _ in rows]
        owner.execute("insert into api.agent_messages (id, conversation_id, role, content, created_at)"
                      " select * from unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::timestamptz[])",
                      (ids, [c for c, _ in rows], ["user"] * 5, ["x"] * 5, [at for _, at in rows]))
        for conversation in (one, two):
            mine = [(i, at) for i, (c, at) in zip(ids, rows) if c == conversation]
            count, _, updated, _ = before[conversation]
            newest = max([before[conversation][1]] + [owner.execute("select %s::timestamptz", (at,)).fetchone()[0]
                                                     for _, at in mine])
            # 001's rule row by row: +1 each, the greatest created_at; the leaf is left where it was.
            assert counters(owner, conversation) == (count + len(mine), newest, max(updated, newest),
                                                     before[conversation][3])
            assert expected(owner, conversation) == (count + len(mine), newest)


def test_001_run_again_alone_counts_once_and_016_again_brings_back_the_statement_triggers(pg_cluster: Any) -> None:
    name = "counts_rerun"
    create_supabase_database(pg_cluster, name)
    user, conversation = new_id(), new_id()
    with pg_cluster.connect(name) as owner:
        owner.execute("insert into auth.users (id) values (%s)", (user,))
        alice = User(psycopg.connect(pg_cluster.dsn(name, "authenticator"), autocommit=True), user)
        try:
            alice.turn(conversation)
            owner.execute((MIGRATIONS_DIR / "001_agent_chat.sql").read_text())  # type: ignore[arg-type]
            second = alice.turn(conversation)
            # 001's per-row trigger counts, the statement ones run 001's body with no row: each message once.
            count, newest = expected(owner, conversation)
            assert counters(owner, conversation) == (4, newest, newest, second["args"]["p_assistant_message_id"])
            (rerun,) = sorted(MIGRATIONS_DIR.glob("016_*.sql"))
            owner.execute(rerun.read_text())  # type: ignore[arg-type]
            third = alice.turn(conversation)
            count, newest = expected(owner, conversation)
            assert counters(owner, conversation) == (6, newest, newest, third["args"]["p_assistant_message_id"])
            triggers = owner.execute("select tgname, tgtype & 1 = 1 from pg_trigger"
                                     " where tgrelid = 'api.agent_messages'::regclass and not tgisinternal"
                                     " order by tgname").fetchall()
            assert triggers == [("agent_messages_touch_conversation_delete", False),
                                ("agent_messages_touch_conversation_insert", False)]  # per statement, not per row
        finally:
            alice.db.close()
