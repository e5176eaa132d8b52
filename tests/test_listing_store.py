"""Cursor paging and search at the store interface, on both stores, where HTTP cannot set the scene: items that tie
on their timestamp, and a SQLite file that already held conversations when the search migration arrived."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.store import Caller, ConversationKey, MessageKey, NewRun, RunUpdate, TurnLimits
from services.store.postgrest.store import PostgrestStore
from services.store.sqlite import listing as sqlite_listing
from services.store.sqlite.store import MIGRATIONS, SQLiteStore
from tests.conftest import DATABASE
from tests.pg import act_as, apply_migrations, create_supabase_database, migration_sql
from tests.support import new_id
from tests.test_postgrest import LEGACY_SCHEMA
from tests.tokens import TEST_PUBLISHABLE_KEY, mint

pytestmark = pytest.mark.anyio

Store = SQLiteStore | PostgrestStore
SAME_TIME = "2026-01-02T03:04:05.123456Z"


@pytest.fixture
def execute(store: Store, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[str, tuple[Any, ...]], None]:
    """Run SQL on the store's database as its owner (a test's way to make timestamps tie)."""
    if isinstance(store, SQLiteStore):

        def on_sqlite(statement: str, params: tuple[Any, ...]) -> None:
            with sqlite3.connect(tmp_path / "store.db") as db:  # the file conftest's store fixture opens
                db.execute(statement.replace("%s", "?").replace("api.", ""), params)

        return on_sqlite
    cluster = request.getfixturevalue("pg_cluster")

    def on_postgres(statement: str, params: tuple[Any, ...]) -> None:
        with cluster.connect(DATABASE) as db:
            db.execute(statement, params)

    return on_postgres


async def test_conversations_tied_on_their_activity_time_page_by_id_both_ways(
    store: Store, new_caller: Callable[[], Caller], execute: Callable[[str, tuple[Any, ...]], None]
) -> None:
    caller = new_caller()
    made = [await store.create_conversation(caller, f"c{i}") for i in range(4)]
    for conversation in made:
        execute("UPDATE api.agent_conversations SET updated_at = %s WHERE id = %s", (SAME_TIME, conversation.id))
    in_order = sorted(c.id for c in made)  # ties on updated_at are broken by id
    assert [c.id for c in (await store.list_conversations(caller, 10, 0)).conversations] == in_order

    seen, page = [], await store.list_conversations(caller, 1, 0)
    seen += [c.id for c in page.conversations]
    while page.has_more and len(seen) < 10:  # bounded: a cursor that goes round in circles fails, never hangs
        page = await store.list_conversations(caller, 1, 0, before=ConversationKey.of(page.conversations[-1]))
        seen += [c.id for c in page.conversations]
    assert seen == in_order

    back = await store.list_conversations(caller, 2, 0, after=ConversationKey.of(page.conversations[0]))
    assert [c.id for c in back.conversations] == in_order[1:3] and back.has_more and back.total == 4


async def test_messages_tied_on_their_time_page_by_sequence_both_ways(
    store: Store, new_caller: Callable[[], Caller], execute: Callable[[str, tuple[Any, ...]], None]
) -> None:
    caller = new_caller()
    conversation = new_id()
    for text in ("one", "two"):
        new = NewRun(conversation, text, "AI Chat")
        assert (await store.begin_run(caller, new, TurnLimits(30, 3600), 10)).outcome == "started"
        execute("UPDATE api.agent_runs SET status = 'complete' WHERE id = %s", (new.id,))
    execute("UPDATE api.agent_messages SET created_at = %s WHERE conversation_id = %s", (SAME_TIME, conversation))
    everything = [m.id for m in (await store.message_page(caller, conversation, 10)).messages]
    assert len(everything) == 4

    forwards: list[str] = []
    cursor: MessageKey | None = None
    for _ in range(10):  # bounded: a cursor that goes round in circles fails, never hangs
        page = await store.message_page(caller, conversation, 1, after=cursor)
        forwards += [m.id for m in page.messages]
        cursor = page.newest
        if not page.has_more:
            break
    assert forwards == everything

    backwards: list[str] = []
    older: MessageKey | None = None
    for _ in range(10):
        page = await store.message_page(caller, conversation, 1, newest_first=True, before=older)
        backwards += [m.id for m in page.messages]
        older = page.oldest
        if not page.has_more:
            break
    assert backwards == everything[::-1]


async def test_search_keys_each_users_conversations_to_that_user(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    alice, bob = new_caller(), new_caller()
    await store.create_conversation(alice, "Gazebo for Alice")
    mine = await store.create_conversation(bob, "Porch for Bob")
    assert (await store.list_conversations(bob, 10, 0, search="gazebo")).conversations == []
    found = await store.list_conversations(bob, 10, 0, search="porch")
    assert [c.id for c in found.conversations] == [mine.id] and found.total == 1


async def test_a_sqlite_file_from_before_search_is_indexed_when_it_migrates(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    before_search = MIGRATIONS[: MIGRATIONS.index(sqlite_listing.MIGRATION)]
    with sqlite3.connect(path) as db:
        for number, script in enumerate(before_search, start=1):
            db.executescript(f"{script}; PRAGMA user_version = {number};")
        db.execute(
            "INSERT INTO agent_conversations (id, user_id, title, created_at, updated_at, message_count, metadata)"
            " VALUES ('c1', 'u1', 'Kitchen repaint', ?, ?, 0, '{}')",
            (SAME_TIME, SAME_TIME),
        )
        db.execute(
            "INSERT INTO agent_messages (id, conversation_id, role, content, metadata, created_at)"
            " VALUES ('m1', 'c1', 'user', 'two coats of eggshell', '{}', ?)",
            (SAME_TIME,),
        )
    store = SQLiteStore(str(path))
    await store.open()
    try:
        for words in ("kitchen", "eggshell"):
            page = await store.list_conversations(Caller("u1"), 10, 0, search=words)
            assert [c.id for c in page.conversations] == ["c1"]
    finally:
        await store.aclose()


async def test_the_sqlite_message_index_stays_true_to_text_written_as_it_streams(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "fts.db"))
    await store.open()
    caller = Caller("u1")
    try:
        new = NewRun("c1", "which finish", "AI Chat")
        assert (await store.begin_run(caller, new, TurnLimits(30, 3600), 10)).outcome == "started"
        for text in ("Two", "Two coats", "Two coats of eggshell"):  # a run's text saves: UPDATEs of content
            saved = RunUpdate(caller, new.id, new.assistant_message_id, content=text, metadata={"status": "streaming"})
            await store.flush_runs([saved])
        for words, found in (("eggshell", ["c1"]), ("coats", ["c1"]), ("which", ["c1"]), ("zebra", [])):
            page = await store.list_conversations(caller, 10, 0, search=words)
            assert [c.id for c in page.conversations] == found, words
        with sqlite3.connect(tmp_path / "fts.db") as db:
            db.execute("INSERT INTO agent_message_words (agent_message_words, rank) VALUES ('integrity-check', 1)")
            indexed = db.execute("SELECT m.content, w.words FROM agent_messages m"
                                 " JOIN agent_message_words w ON w.rowid = m.seq ORDER BY m.seq").fetchall()
            assert indexed == [(text, sqlite_listing.indexed_words(1, text))
                               for text in ("which finish", "Two coats of eggshell")]
        await store.delete_conversation(caller, "c1")
        with sqlite3.connect(tmp_path / "fts.db") as db:
            for table in ("agent_message_words", "agent_title_words", "agent_conversation_search_keys"):
                assert db.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table
    finally:
        await store.aclose()


async def test_a_sqlite_search_costs_what_the_callers_own_words_cost_whatever_the_others_wrote(tmp_path: Path) -> None:
    """Counted in SQLite virtual-machine steps, not time: each token is led by its owner's key, so a one-letter prefix
    reads the caller's words alone. (Matching over every user's index, then filtering by owner, cost this user's
    search in proportion to everyone's messages: 0.34 CPU-s with 200,000 of them.)"""
    path = tmp_path / "cost.db"
    store = SQLiteStore(str(path))
    await store.open()
    await store.aclose()
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    db.create_function(sqlite_listing.WORDS_FUNCTION, 2, sqlite_listing.indexed_words, deterministic=True)

    def write(user: str, conversations: int) -> None:
        with db:
            for c in range(conversations):
                conversation = f"{user}-{c}"
                db.execute("INSERT INTO agent_conversations (id, user_id, title, created_at, updated_at)"
                           " VALUES (?, ?, ?, ?, ?)", (conversation, user, f"kitchen {c}", SAME_TIME, SAME_TIME))
                db.executemany("INSERT INTO agent_messages (id, conversation_id, role, content, created_at)"
                               " VALUES (?, ?, 'user', ?, ?)",
                               [(f"{conversation}-{m}", conversation, f"keep kale k{c}x{m} karma", SAME_TIME)
                                for m in range(10)])

    def steps(query: str) -> int:
        counted = [0]

        def count() -> int:
            counted[0] += 1
            return 0

        db.set_progress_handler(count, 100)
        try:
            page = sqlite_listing.list_conversations(db, Caller("me"), 20, 0, None, None, query)
        finally:
            db.set_progress_handler(None, 0)
        assert page.total == 3, query
        return counted[0]

    write("me", 3)
    write("other-0", 20)
    alone = {query: steps(query) for query in ("k", "kitch k", "ka")}
    for n in range(1, 11):
        write(f"other-{n}", 200)  # 20,000 more messages of others, every word of them starting with "k"
    crowded = {query: steps(query) for query in alone}
    db.close()
    for query, cost in alone.items():
        assert crowded[query] <= cost * 1.5 + 20, (query, cost, crowded[query])


# -- the indexes are the ones the queries use -----------------------------------------------------------------------


async def test_sqlite_pages_read_their_index_in_order(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "plan.db"))
    await store.open()
    await store.aclose()
    key = ("2026-01-02T03:04:05.123456Z", new_id())
    queries = [
        (f"SELECT id FROM agent_conversations WHERE user_id = ? AND {sqlite_listing._OLDER}"
         " ORDER BY updated_at DESC, id LIMIT 51", ("u", key[0], key[0], key[1])),
        (f"SELECT id FROM agent_conversations WHERE user_id = ? AND {sqlite_listing._NEWER}"
         " ORDER BY updated_at, id DESC LIMIT 51", ("u", key[0], key[0], key[1])),
        ("SELECT id FROM agent_messages WHERE conversation_id = ? AND seq < ? ORDER BY seq DESC LIMIT 51", ("c", 9)),
    ]
    with sqlite3.connect(tmp_path / "plan.db") as db:
        for query, params in queries:
            plan = " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {query}", params))
            assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
            assert "TEMP B-TREE" not in plan, plan  # read in order from the index, never sorted


def test_postgres_search_finds_words_through_its_indexes(pg_cluster: Any) -> None:
    """The search function's own statements, as PostgreSQL plans them inside it (auto_explain's nested plans), match
    the stored words (007) and never parse text again (to_tsvector), whichever way the planner goes for the data at
    hand; and a match on the stored words can be served by their indexes (with seq scans priced out, it is)."""
    user = new_id()
    with pg_cluster.connect(DATABASE) as db:
        db.execute("insert into auth.users (id) values (%s)", (user,))
        notices: list[str] = []
        db.add_notice_handler(lambda notice: notices.append(notice.message_primary or ""))
        db.execute("load 'auto_explain'")
        db.execute("set auto_explain.log_min_duration = 0")
        db.execute("set auto_explain.log_nested_statements = on")
        db.execute("set client_min_messages = log")
        db.execute("set enable_seqscan = off")
        act_as(db, user, local=False)
        db.execute("select api.agent_conversations_search(array['eggs', 'kitch'], 10)")
        db.execute("reset role")
        for table, index in (("agent_messages", "agent_messages_words_idx"),
                             ("agent_conversations", "agent_conversations_words_idx")):
            plan = " ".join(row[0] for row in db.execute(
                f"explain select id from api.{table} where words @@ to_tsquery('simple', 'eggs:*')"))
            assert index in plan, plan
    plans = " ".join(n for n in notices if "agent_messages" in n)
    assert "(words @@" in plans and "to_tsvector" not in plans, plans


# -- the Supabase side: the fake's logic trees and the migration ----------------------------------------------------


async def test_fake_reads_logic_trees_like_postgrest(
    fake_postgrest: Any, supabase_url: str, register_user: Callable[[str], None]
) -> None:
    user = new_id()
    register_user(user)
    caller = Caller(user, mint(user))
    titles = ["a, b", "c.d", "e"]
    headers = {"apikey": TEST_PUBLISHABLE_KEY, "Authorization": f"Bearer {caller.access_token}"}

    for title in titles:
        created = httpx.post(f"{supabase_url}/rest/v1/rpc/agent_conversation_create", headers=headers,
                             json={"p_id": new_id(), "p_title": title})
        assert created.json()["outcome"] == "done", created.text

    def read(**params: str) -> Any:
        response = httpx.get(f"{supabase_url}/rest/v1/agent_conversations", headers=headers,
                             params={"select": "title", "order": "title", **params})
        return response.status_code, [row["title"] for row in response.json()] if response.is_success else None

    assert read(**{"or": '(title.eq."a, b",title.eq.e)'}) == (200, ["a, b", "e"])
    assert read(**{"or": '(title.eq."c.d",and(title.neq.e,title.like.x))'}) == (400, None)  # no like here
    assert read(**{"or": '(title.eq."c.d",and(title.neq.e,title.not.is.null))'}) == (200, ["a, b", "c.d"])
    assert read(**{"or": "(title.eq.e,not.or(title.eq.e,title.is.null))"}) == (200, titles)
    assert read(**{"and": "(title.gt.a,title.lt.e)"}) == (200, ["a, b", "c.d"])
    assert read(**{"or": "title.eq.e"})[0] == 400


def test_the_search_migration_gives_every_conversation_an_activity_time(pg_cluster: Any) -> None:
    name = "legacy_activity"
    create_supabase_database(pg_cluster, name, migrate=False)
    user, conversation = new_id(), new_id()
    with pg_cluster.connect(name) as db:
        db.execute(LEGACY_SCHEMA)
        db.execute("insert into auth.users (id) values (%s)", (user,))
        db.execute("insert into api.agent_conversations (id, user_id, title, updated_at) values (%s, %s, 'old', null)",
                   (conversation, user))
        apply_migrations(db, times=2)
        row = db.execute("select updated_at = created_at from api.agent_conversations where id = %s", (conversation,))
        assert row.fetchone() == (True,)
        nullable = db.execute("select is_nullable from information_schema.columns where table_schema = 'api'"
                              " and table_name = 'agent_conversations' and column_name = 'updated_at'")
        assert nullable.fetchone() == ("NO",)


def test_the_folding_migration_rebuilds_the_words_007_made_once(pg_cluster: Any) -> None:
    """A project that ran 001-007 has words from the text-search parser, under its locale (C here: "İstanbul" stayed
    as it was, so a search folded by Unicode's rules missed it). 008 rebuilds them from search_lexemes, once: running
    every file again leaves the column as it is."""
    name = "before_folding"
    create_supabase_database(pg_cluster, name, migrate=False)
    user = new_id()
    with pg_cluster.connect(name) as db:
        for script in migration_sql()[:7]:
            db.execute(script)
        db.execute("insert into auth.users (id) values (%s)", (user,))
        db.execute("insert into api.agent_conversations (id, user_id, title) values (%s, %s, 'Trip to İstanbul')",
                   (new_id(), user))
        words = "select words::text from api.agent_conversations"
        column = ("select attnum from pg_attribute where attrelid = 'api.agent_messages'::regclass"
                  " and attname = 'words'")
        assert "İstanbul" in db.execute(words).fetchone()[0]
        for script in migration_sql()[7:19]:  # through 019: 008's words (020 keeps the dot above in its word)
            db.execute(script)
        assert db.execute(words).fetchone()[0] == "'i' 'stanbul' 'to' 'trip'"
        apply_migrations(db)
        rebuilt = db.execute(column).fetchone()
        apply_migrations(db)
        assert db.execute(column).fetchone() == rebuilt
        act_as(db, user, local=False)
        found = db.execute("select api.agent_conversations_search(array['İSTANBUL'], 10)").fetchone()[0]
        assert found["total"] == 1

