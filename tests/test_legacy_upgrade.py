"""Upgrades with existing data: the earlier FastAPI service's Supabase rows, migrated by every file in order, then
used through the service (the PostgREST stand-in over real PostgreSQL) by every route; nothing legacy is lost or
altered, and every answer is a documented shape."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from starlette.testclient import TestClient

from app import create_app
from tests.fake_postgrest import FakePostgrest
from tests.pg import apply_migrations, create_supabase_database, register_run_secret, RUN_SECRET
from tests.support import chunks, make_settings, new_id, serve
from tests.test_branches import NumberedModel
from tests.tokens import TEST_JWT_SECRET, TEST_PUBLISHABLE_KEY, bearer, mint

DATABASE = "legacy_data"

# The earlier service's schema as its SQL files made it (shared/reference/original-service-notes.md §4), with its
# later indexes and its conversation trigger on a function the project already had.
LEGACY_SCHEMA = """
create schema api;
create table api.agent_conversations (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null references auth.users(id) on delete cascade,
    title text, created_at timestamptz default now(), updated_at timestamptz default now(),
    last_message_at timestamptz, message_count integer default 0, metadata jsonb default '{}');
create table api.agent_messages (
    id uuid primary key default gen_random_uuid(),
    conversation_id uuid not null references api.agent_conversations(id) on delete cascade,
    content text not null, role text not null check (role in ('user','assistant')),
    agent_type text check (agent_type in ('supervisor','invoices','appointments','projects',
        'proposals','contacts','reviews','campaigns','tasks','settings')),
    metadata jsonb default '{}', created_at timestamptz default now());
create index idx_agent_conversations_user on api.agent_conversations (user_id, updated_at desc);
create index idx_agent_conversations_last_message on api.agent_conversations (last_message_at desc);
create index idx_agent_conversations_user_updated_count on api.agent_conversations (user_id, updated_at desc,
    message_count);
create index idx_agent_conversations_title_gin on api.agent_conversations
    using gin (to_tsvector('english', coalesce(title, '')));
create index idx_agent_messages_conversation on api.agent_messages (conversation_id, created_at desc);
create index idx_agent_messages_agent_type on api.agent_messages (agent_type) where agent_type is not null;
create index idx_agent_messages_role on api.agent_messages (role);
create index idx_agent_messages_conversation_covering on api.agent_messages (conversation_id, created_at asc)
    include (content, role, agent_type, metadata);
create index idx_agent_messages_content_gin on api.agent_messages using gin (to_tsvector('english', content));
create function public.update_updated_at_column() returns trigger language plpgsql as $$
begin new.updated_at = now(); return new; end $$;
create trigger update_agent_conversations_updated_at before update on api.agent_conversations
    for each row execute function public.update_updated_at_column();
create function public.update_agent_conversation_on_message() returns trigger language plpgsql as $$
begin
  update api.agent_conversations set updated_at = now(), last_message_at = new.created_at,
         message_count = message_count + 1 where id = new.conversation_id;
  return new;
end $$;
create trigger update_agent_conversation_on_message_trigger after insert on api.agent_messages
  for each row execute function public.update_agent_conversation_on_message();
alter table api.agent_conversations enable row level security;
alter table api.agent_messages enable row level security;
create policy "Enable all for authenticated users" on api.agent_conversations for all using (true);
grant usage on schema api to anon, authenticated, service_role;
grant select, insert, update, delete on all tables in schema api to authenticated;
grant select on all tables in schema api to anon;
"""

ODD = "Ünïcödé 👩‍🎨 مرحبا e\u0301 \u200b\u2028\u2029 \x07\x1b tab\there \ufffe\uffff 𝔘 ﬁ ß İstanbul"
LONG = ("Painting estimate line. " * 5_000)[:100_000]  # long, and compressible: the earlier covering index took it
MANY = 3000


@dataclass
class Legacy:
    user: str
    ids: dict[str, str]
    contents: dict[str, list[tuple[str, str, str | None]]]  # conversation -> [(id, role, content)] oldest first
    client: TestClient
    model: NumberedModel

    def headers(self) -> dict[str, str]:
        return self.auth(self.user)

    def auth(self, user: str) -> dict[str, str]:
        return bearer(mint(user, TEST_JWT_SECRET, issuer=f"{self.url}/auth/v1"))

    url: str = ""


def _seed(db: Any, user: str, gone: str) -> tuple[dict[str, str], dict[str, list[tuple[str, str, str | None]]]]:
    ids = {name: new_id() for name in ("untitled", "long", "odd", "many", "ties", "failed", "empty", "nulls", "orphan")}
    contents: dict[str, list[tuple[str, str, str | None]]] = {}
    db.execute("insert into auth.users (id) values (%s), (%s)", (user, gone))
    # As the earlier service wrote them: title null (an explicit create without one) or "AI Chat" (auto-created),
    # updated_at null on some, metadata {} everywhere.
    for name, conversation in ids.items():
        owner = gone if name == "orphan" else user
        title = {"untitled": None, "nulls": None}.get(name, "AI Chat" if name != "odd" else ODD)
        db.execute("insert into api.agent_conversations (id, user_id, title, metadata, created_at) values"
                   " (%s, %s, %s, '{}', now() - interval '30 days')", (conversation, owner, title))

    def add(name: str, role: str, content: str, at: str, agent: str | None = None, metadata: Any = "{}") -> None:
        message = new_id()
        db.execute("insert into api.agent_messages (id, conversation_id, content, role, agent_type, metadata,"
                   " created_at) values (%s, %s, %s, %s, %s, %s, %s)",
                   (message, ids[name], content, role, agent, metadata, at))
        contents.setdefault(name, []).append((message, role, content))

    base = "2025-03-01 10:00:00+00"
    add("untitled", "user", "What invoices do I have?", base)
    add("untitled", "assistant", "You have 3 invoices.", "2025-03-01 10:00:05+00", "supervisor")
    add("long", "user", LONG, base)
    add("long", "assistant", LONG[::-1], "2025-03-01 10:00:09+00", "supervisor")
    add("odd", "user", ODD, base)
    add("odd", "assistant", ODD + " answer", "2025-03-01 10:00:01+00", "supervisor")
    # Identical created_at: the earlier service's DB default now() inside one transaction.
    for i in range(4):
        add("ties", "user" if i % 2 == 0 else "assistant", f"tie {i}", base, None if i % 2 == 0 else "supervisor")
    # The model failed: the user's message was saved, no answer (twice in a row, then an answer).
    add("failed", "user", "first try", base)
    add("failed", "user", "second try", "2025-03-01 10:01:00+00")
    add("failed", "assistant", "finally", "2025-03-01 10:01:05+00", "invoices")
    add("failed", "user", "and now?", "2025-03-01 10:02:00+00")
    add("nulls", "user", "metadata was null", base, metadata=None)
    add("nulls", "assistant", "so was this", "2025-03-01 10:00:02+00", "supervisor", metadata=None)
    add("orphan", "user", "a deleted user's words", base)
    rows = [(new_id(), ids["many"], f"message {i} of many", "user" if i % 2 == 0 else "assistant",
             None if i % 2 == 0 else "supervisor", f"2025-01-01 00:00:00+00", i) for i in range(MANY)]
    with db.cursor() as cursor:
        cursor.executemany("insert into api.agent_messages (id, conversation_id, content, role, agent_type,"
                           " created_at) values (%s, %s, %s, %s, %s, %s::timestamptz + make_interval(secs => %s))",
                           rows)
    contents["many"] = [(r[0], r[3], r[2]) for r in rows]
    db.execute("update api.agent_conversations set updated_at = null where id in (%s, %s)",
               (ids["untitled"], ids["nulls"]))
    db.execute("update api.agent_conversations set metadata = null where id = %s", (ids["nulls"],))
    # A user deleted from Supabase Auth in a project whose foreign key was dropped: their rows stay behind.
    db.execute("alter table api.agent_conversations drop constraint agent_conversations_user_id_fkey")
    db.execute("delete from auth.users where id = %s", (gone,))
    return ids, contents


@pytest.fixture(scope="module")
def legacy_db(pg_cluster: Any) -> Iterator[tuple[Any, str, str, dict[str, str], dict[str, Any], dict[str, Any]]]:
    create_supabase_database(pg_cluster, DATABASE, migrate=False)
    user, gone = new_id(), new_id()
    with pg_cluster.connect(DATABASE) as db:
        db.execute(LEGACY_SCHEMA)
        ids, contents = _seed(db, user, gone)
        before = {row[0]: row[1:] for row in db.execute(
            "select id::text, content, role, agent_type, metadata, created_at from api.agent_messages")}
        apply_migrations(db, times=2)
        register_run_secret(db)
    fake = FakePostgrest(pg_cluster, DATABASE, jwt_secret=TEST_JWT_SECRET, publishable_key=TEST_PUBLISHABLE_KEY)
    with serve(fake.app()) as live:
        yield fake, live.url, user, ids, contents, before


@pytest.fixture
def legacy(legacy_db: Any, tmp_path: Any) -> Iterator[Legacy]:
    _, url, user, ids, contents, _ = legacy_db
    env = {"STORE": "supabase", "SUPABASE_URL": url, "SUPABASE_PUBLISHABLE_KEY": TEST_PUBLISHABLE_KEY,
           "SUPABASE_JWT_SECRET": TEST_JWT_SECRET, "SUPABASE_RUN_SECRET": RUN_SECRET,
           "RETRY_BASE_DELAY": "0.01", "RETRY_MAX_DELAY": "0.05"}
    model = NumberedModel(pieces=[])
    with TestClient(create_app(make_settings(tmp_path, **env), model=model)) as client:
        yield Legacy(user, ids, contents, client, model, url=url)


def _conversation(legacy: Legacy, name: str, **params: Any) -> dict[str, Any]:
    response = legacy.client.get(f"/api/conversations/{legacy.ids[name]}",
                                 params={"user_id": legacy.user, **params}, headers=legacy.headers())
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_every_legacy_conversation_lists_pages_and_reads_whole(legacy: Legacy) -> None:
    listed = legacy.client.get("/api/conversations", params={"user_id": legacy.user, "limit": 100},
                               headers=legacy.headers())
    assert listed.status_code == 200, listed.text
    body = listed.json()
    mine = {name for name in legacy.ids if name != "orphan"}
    assert {c["id"] for c in body["conversations"]} == {legacy.ids[n] for n in mine}
    assert body["total"] == len(mine)
    for conversation in body["conversations"]:
        assert isinstance(conversation["metadata"], dict) and isinstance(conversation["message_count"], int)
        assert conversation["updated_at"].endswith("Z") and conversation["created_at"].endswith("Z")
    # Two at a time through the cursors: every conversation once.
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(len(mine)):
        params = {"user_id": legacy.user, "limit": 2, **({"before": cursor} if cursor else {})}
        page = legacy.client.get("/api/conversations", params=params, headers=legacy.headers())
        assert page.status_code == 200, page.text
        seen += [c["id"] for c in page.json()["conversations"]]
        if not page.json()["has_more"]:
            break
        cursor = page.json()["before_cursor"]
    assert sorted(seen) == sorted(legacy.ids[n] for n in mine)
    for name in mine:
        expected = legacy.contents.get(name, [])
        got: list[dict[str, Any]] = []
        params: dict[str, Any] = {"message_limit": 500}
        for _ in range(20):
            read = _conversation(legacy, name, **params)
            got += read["messages"]
            if not read["message_has_more"]:
                break
            params = {"message_limit": 500, "message_after": read["message_after_cursor"]}
        assert [(m["id"], m["role"], m["content"]) for m in got] == expected, name
        assert all(isinstance(m["metadata"], dict) for m in got)
        assert [m["parent_id"] for m in got] == ([None] + [m["id"] for m in got[:-1]] if got else [])


def test_search_finds_legacy_words(legacy: Legacy) -> None:
    for query, name in (("İSTANBUL", "odd"), ("estimate line", "long"), ("message 2999", "many"),
                        ("second try", "failed")):
        found = legacy.client.get("/api/conversations", params={"user_id": legacy.user, "q": query},
                                  headers=legacy.headers())
        assert found.status_code == 200, found.text
        assert legacy.ids[name] in [c["id"] for c in found.json()["conversations"]], query


def test_a_legacy_conversation_continues_regenerates_and_edits(legacy: Legacy) -> None:
    for name in ("failed", "many", "ties", "nulls", "odd", "untitled"):
        sent = legacy.client.post("/api/chat/stream", headers=legacy.headers(), json={
            "message": "Continue please", "conversation_id": legacy.ids[name], "user_id": legacy.user})
        assert sent.status_code == 200, sent.text
        assert chunks(sent.text)[-1]["type"] == "complete", (name, sent.text[-500:])
        path = _conversation(legacy, name, message_order="desc", message_limit=2)["messages"]
        assert [m["content"] for m in path][1] == "Continue please"
    # Regenerate and edit a message the earlier service wrote.
    ties = legacy.contents["ties"]
    regenerated = legacy.client.post("/api/chat/stream", headers=legacy.headers(), json={
        "conversation_id": legacy.ids["ties"], "user_id": legacy.user, "regenerate_message_id": ties[1][0]})
    assert regenerated.status_code == 200, regenerated.text
    assert chunks(regenerated.text)[-1]["type"] == "complete", regenerated.text[-500:]
    path = _conversation(legacy, "ties")["messages"]
    assert [m["content"] for m in path[:1]] == ["tie 0"] and path[1]["id"] != ties[1][0]
    assert set(path[1]["sibling_ids"]) >= {ties[1][0], path[1]["id"]}
    edited = legacy.client.post("/api/chat/stream", headers=legacy.headers(), json={
        "message": "edited", "conversation_id": legacy.ids["odd"], "user_id": legacy.user,
        "edit_message_id": legacy.contents["odd"][0][0]})
    assert edited.status_code == 200, edited.text
    assert chunks(edited.text)[-1]["type"] == "complete", edited.text[-500:]
    back = legacy.client.put(f"/api/conversations/{legacy.ids['odd']}/active-leaf", headers=legacy.headers(),
                             json={"user_id": legacy.user, "message_id": legacy.contents["odd"][0][0]})
    assert back.status_code == 200, back.text
    assert [m["content"] for m in _conversation(legacy, "odd")["messages"]][:2] == [ODD, ODD + " answer"]
    usage = legacy.client.get("/api/usage", params={"user_id": legacy.user, "period": "month"},
                              headers=legacy.headers())
    assert usage.status_code == 200, usage.text


def test_a_long_new_message_is_saved_beside_the_earlier_services_indexes(legacy: Legacy) -> None:
    """The earlier service's covering index held each message's content in a btree row (at most 2704 bytes after
    compression): left in place, it refused every longer message the new service saves (019 drops it)."""
    import random

    rng = random.Random(7)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(9000))
    sent = legacy.client.post("/api/chat/stream", headers=legacy.headers(), json={
        "message": text, "conversation_id": legacy.ids["untitled"], "user_id": legacy.user})
    assert sent.status_code == 200, sent.text
    assert chunks(sent.text)[-1]["type"] == "complete", sent.text[-500:]
    assert _conversation(legacy, "untitled", message_order="desc", message_limit=2)["messages"][1]["content"] == text


def test_legacy_rows_are_kept_unaltered_and_delete_works(legacy: Legacy, legacy_db: Any, pg_cluster: Any) -> None:
    before = legacy_db[5]
    with pg_cluster.connect(DATABASE) as db:
        after = {row[0]: row[1:] for row in db.execute(
            "select id::text, content, role, agent_type, metadata, created_at from api.agent_messages")}
    for message, row in before.items():
        assert message in after, message
        content, role, agent, metadata, at = row
        assert after[message][:3] == (content, role, agent) and after[message][4] == at
        assert after[message][3] == metadata
    deleted = legacy.client.delete(f"/api/conversations/{legacy.ids['long']}", params={"user_id": legacy.user},
                                   headers=legacy.headers())
    assert deleted.status_code == 200, deleted.text
    gone = legacy.client.get(f"/api/conversations/{legacy.ids['long']}", params={"user_id": legacy.user},
                             headers=legacy.headers())
    assert gone.status_code == 404


# -- running a file again ----------------------------------------------------------------------------------------

# What a database's migrations made: functions (their definitions and grants), triggers, policies, indexes, table
# grants and columns, in the service's two schemas.
SURFACE = """
select 'function ' || p.oid::regprocedure::text || ' ' || md5(pg_get_functiondef(p.oid)) || ' '
       || coalesce(array_to_string(p.proacl, ','), '')
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace
 where n.nspname in ('api', 'canvalo_private') and p.prokind <> 'a'
union all select 'trigger ' || tgrelid::regclass || ' ' || tgname || ' ' || md5(pg_get_triggerdef(oid))
  from pg_trigger where not tgisinternal
union all select 'policy ' || schemaname || '.' || tablename || ' ' || policyname || ' '
       || md5(coalesce(qual, '') || coalesce(with_check, '') || roles::text || cmd) from pg_policies
union all select 'index ' || schemaname || '.' || indexname || ' ' || md5(indexdef)
  from pg_indexes where schemaname in ('api', 'canvalo_private')
union all select 'grants ' || c.oid::regclass || ' ' || coalesce(array_to_string(c.relacl, ','), '')
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
 where n.nspname in ('api', 'canvalo_private') and c.relkind in ('r', 'v')
union all select 'column ' || attrelid::regclass || ' ' || attname || ' ' || format_type(atttypid, atttypmod)
       || ' ' || attnotnull::text
  from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
 where n.nspname in ('api', 'canvalo_private') and c.relkind = 'r' and attnum > 0 and not attisdropped
"""


def test_a_file_run_again_then_every_later_file_leaves_the_database_as_it_was(pg_cluster: Any) -> None:
    """docs/production.md: running one file again alone can bring back its own version of a function a later file
    replaced (007's flush, granted to `authenticated` only, stops every answer being saved), so every later file is run
    again after it. For each file: the database after that is exactly the one every file in order made."""
    from tests.pg import MIGRATIONS_DIR

    files = sorted(MIGRATIONS_DIR.glob("*.sql"))
    create_supabase_database(pg_cluster, "rerun_base")
    with pg_cluster.connect("rerun_base") as db:
        expected = {row[0] for row in db.execute(SURFACE)}
    with pg_cluster.connect() as admin:
        for path in files:
            admin.execute(f'create database "rerun_{path.name[:3]}" template rerun_base')
    changed = []
    for index, path in enumerate(files):
        with pg_cluster.connect(f"rerun_{path.name[:3]}") as db:
            db.execute(path.read_text())  # type: ignore[arg-type]
            if {row[0] for row in db.execute(SURFACE)} != expected:
                changed.append(path.name[:3])
            for later in files[index + 1:]:
                db.execute(later.read_text())  # type: ignore[arg-type]
            assert {row[0] for row in db.execute(SURFACE)} == expected, path.name
    # The files whose rerun alone changes something (docs/production.md names each, and what to run after it).
    assert changed == ["001", "003", "004", "005", "006", "007", "008", "009", "012", "013", "014", "015"]


# -- a project migrated part-way, runs in flight while the next files are applied ----------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("upto", ["013", "016", "017"])  # the earliest this version runs on: 013
async def test_runs_begun_before_a_later_file_is_applied_are_saved_after_it(pg_cluster: Any, upto: str) -> None:
    """Answers streaming while 0NN..019 are applied: their keys, flushes and ends keep working."""
    from services.retry import RetryPolicy
    from services.store import CallUsage, NewRun, RunUpdate, TurnLimits
    from services.store.postgrest.client import PostgrestClient
    from services.store.postgrest.store import PostgrestStore
    from tests.pg import MIGRATIONS_DIR
    from services.store import Caller

    name = f"inflight_{upto}"
    files = sorted(MIGRATIONS_DIR.glob("*.sql"))
    create_supabase_database(pg_cluster, name, migrate=False)
    user = new_id()
    with pg_cluster.connect(name) as db:
        for path in files:
            if path.name[:3] < upto or path.name[:3] == upto:
                db.execute(path.read_text())  # type: ignore[arg-type]
        if upto >= "017":
            register_run_secret(db)
        db.execute("insert into auth.users (id) values (%s)", (user,))
    fake = FakePostgrest(pg_cluster, name, jwt_secret=TEST_JWT_SECRET, publishable_key=TEST_PUBLISHABLE_KEY)
    with serve(fake.app()) as live:
        retry = RetryPolicy(attempts=2, base_delay=0, max_delay=0, max_total=5)
        store = PostgrestStore(PostgrestClient(live.url, "api", TEST_PUBLISHABLE_KEY, retry=retry, timeout=10),
                               RUN_SECRET)
        await store.open()
        caller = Caller(user, mint(user, TEST_JWT_SECRET, issuer=f"{live.url}/auth/v1"))
        try:
            begun = await store.begin_run(caller, NewRun(new_id(), "hello", "AI Chat"),
                                          TurnLimits(stale_seconds=30, events_ttl=3600), 50)
            assert begun.outcome == "started" and begun.run is not None
            run = begun.run
            await store.flush_runs([RunUpdate(caller, run.id, run.assistant_message_id, content="half",
                                              metadata={"status": "streaming", "run_id": run.id})])
            with pg_cluster.connect(name) as db:
                for path in files:
                    if path.name[:3] > upto:
                        db.execute(path.read_text())  # type: ignore[arg-type]
                register_run_secret(db)
            await store.flush_runs([RunUpdate(caller, run.id, run.assistant_message_id, content="half and done",
                                              metadata={"status": "complete", "run_id": run.id},
                                              agent_type="supervisor", final_status="complete")])
            view = await store.read_run(caller, run.id, None)
            assert view.message.content == "half and done" and view.run.status == "complete"
            again = await store.begin_run(caller, NewRun(run.conversation_id, "next", "AI Chat"),
                                          TurnLimits(stale_seconds=30, events_ttl=3600), 50)
            assert again.outcome == "started", again
            assert [m.content for m in again.history][:2] == ["hello", "half and done"]
        finally:
            await store.aclose()
