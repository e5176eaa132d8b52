"""The Supabase store and its PostgREST plumbing, against the PostgREST stand-in over real PostgreSQL 15.

Four groups: the fake's pinned PostgREST behaviours (so the store is tested against the real contract, not against
whatever the fake happens to do); the plumbing's error translation, retries and Content-Range parsing; the store's
semantics (the same as SQLite's); and the migration itself (triggers, grants, re-runs, upgrading the earlier schema).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from errors import (
    AppError,
    Forbidden,
    NotFound,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from services.postgrest import PostgrestStore, utc_timestamp
from services.postgrest_client import PostgrestClient, parse_total
from services.retry import RetryPolicy
from services.store import Caller, NewMessage
from settings import ConfigError
from tests.conftest import DATABASE
from tests.fake_postgrest import FakePostgrest
from tests.pg import apply_migrations, create_supabase_database
from tests.support import new_id, serve
from tests.tokens import TEST_JWT_SECRET, TEST_PUBLISHABLE_KEY, encode, mint

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(attempts=3, base_delay=0, max_delay=0, max_total=5)
REST = "/rest/v1/"


@pytest.fixture
def new_caller(register_user: Callable[[str], None]) -> Callable[[], Caller]:
    def make() -> Caller:
        user = new_id()
        register_user(user)
        return Caller(user, mint(user))

    return make


@pytest.fixture
async def store(fake_postgrest: FakePostgrest, supabase_url: str) -> AsyncIterator[PostgrestStore]:
    client = PostgrestClient(supabase_url, "api", TEST_PUBLISHABLE_KEY, retry=FAST, timeout=10)
    store = PostgrestStore(client)
    await store.open()
    yield store
    await store.aclose()


@pytest.fixture
def raw(supabase_url: str) -> Callable[..., httpx.Response]:
    """Talk to the fake directly, as any client of a Supabase project could."""

    def request(method: str, table: str, token: str | None = None, apikey: str | None = TEST_PUBLISHABLE_KEY,
                **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if apikey is not None:
            headers["apikey"] = apikey
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.request(method, f"{supabase_url}{REST}{table}", headers=headers, timeout=10, **kwargs)

    return request


# -- the fake's pinned PostgREST behaviours ------------------------------------------------------------------------


async def _conversations(store: PostgrestStore, caller: Caller, count: int) -> list[str]:
    return [(await store.create_conversation(caller, f"c{i}")).id for i in range(count)]


@pytest.mark.parametrize(
    ("params", "prefer", "status", "content_range"),
    [
        ({"limit": "2"}, None, 200, "0-1/*"),
        ({"limit": "2"}, "count=exact", 206, "0-1/3"),
        ({}, "count=exact", 200, "0-2/3"),
        ({"offset": "3"}, "count=exact", 206, "*/3"),
        ({"offset": "3"}, None, 200, "*/*"),
        ({"offset": "1", "limit": "1"}, "count=planned", 206, "1-1/3"),
    ],
)
async def test_fake_pins_content_range_and_partial_content(
    store: PostgrestStore, new_caller: Callable[[], Caller], raw: Any, params: dict[str, str], prefer: str | None,
    status: int, content_range: str,
) -> None:
    caller = new_caller()
    await _conversations(store, caller, 3)
    headers = {"Prefer": prefer} if prefer else {}
    response = raw("GET", "agent_conversations", caller.access_token, params={"select": "id", **params},
                   headers=headers)
    assert (response.status_code, response.headers["content-range"]) == (status, content_range)
    assert response.headers["content-type"] == "application/json; charset=utf-8"


async def test_fake_pins_offset_past_the_end_and_empty_counts(
    store: PostgrestStore, new_caller: Callable[[], Caller], raw: Any
) -> None:
    caller = new_caller()
    await _conversations(store, caller, 1)
    past = raw("GET", "agent_conversations", caller.access_token, params={"offset": "5"},
               headers={"Prefer": "count=exact"})
    assert past.status_code == 416 and past.json()["code"] == "PGRST103"
    assert set(past.json()) == {"code", "message", "details", "hint"}
    empty = raw("GET", "agent_messages", caller.access_token, headers={"Prefer": "count=exact"})
    assert (empty.status_code, empty.headers["content-range"], empty.json()) == (200, "*/0", [])


async def test_fake_pins_gateway_and_jwt_errors(raw: Any, new_caller: Callable[[], Caller]) -> None:
    caller = new_caller()
    missing = raw("GET", "agent_conversations", caller.access_token, apikey=None)
    assert missing.status_code == 401 and "code" not in missing.json()
    wrong = raw("GET", "agent_conversations", caller.access_token, apikey="sb_publishable_other")
    assert wrong.status_code == 401 and wrong.json()["message"] == "Invalid API key"
    forged = raw("GET", "agent_conversations", mint(caller.user_id, "x" * 40))
    assert (forged.status_code, forged.json()["code"]) == (401, "PGRST301")
    assert forged.headers["www-authenticate"].startswith("Bearer")
    expired = raw("GET", "agent_conversations", mint(caller.user_id, exp=int(time.time()) - 60))
    assert (expired.status_code, expired.json()["code"], expired.json()["message"]) == (401, "PGRST303", "JWT expired")


async def test_fake_pins_schema_errors(raw: Any, new_caller: Callable[[], Caller]) -> None:
    token = new_caller().access_token
    unknown = raw("GET", "no_such_table", token)
    assert (unknown.status_code, unknown.json()["code"]) == (404, "PGRST205")
    hidden = raw("GET", "agent_conversations", token, headers={"Accept-Profile": "auth"})
    assert (hidden.status_code, hidden.json()["code"]) == (406, "PGRST106")


async def test_fake_forwards_postgresql_errors_with_postgrests_statuses(
    store: PostgrestStore, raw: Any, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    conversation = (await store.create_conversation(caller, "t")).id
    bad_uuid = raw("GET", "agent_conversations", caller.access_token, params={"id": "eq.not-a-uuid"})
    assert (bad_uuid.status_code, bad_uuid.json()["code"]) == (400, "22P02")
    duplicate = raw("POST", "agent_conversations", caller.access_token,
                    json={"id": conversation, "user_id": caller.user_id})
    assert (duplicate.status_code, duplicate.json()["code"]) == (409, "23505")
    anon = raw("GET", "agent_conversations")
    assert (anon.status_code, anon.json()["code"]) == (401, "42501")  # nothing is granted to anon
    unknown_key = raw("POST", "agent_conversations", caller.access_token, json={"nope": 1})
    assert (unknown_key.status_code, unknown_key.json()["code"]) == (400, "PGRST204")
    mixed = raw("POST", "agent_conversations", caller.access_token, json=[{"title": "a"}, {"id": new_id()}])
    assert (mixed.status_code, mixed.json()["code"]) == (400, "PGRST102")


async def test_fake_reports_pre_v13_codes_when_asked(pg_cluster: Any, new_caller: Callable[[], Caller]) -> None:
    fake = FakePostgrest(pg_cluster, DATABASE, jwt_secret=TEST_JWT_SECRET, publishable_key=TEST_PUBLISHABLE_KEY,
                         pre_v13=True)
    with serve(fake.app()) as live:
        headers = {"apikey": TEST_PUBLISHABLE_KEY}
        expired = httpx.get(f"{live.url}{REST}agent_conversations",
                            headers={**headers, "Authorization": f"Bearer {mint(new_id(), exp=1)}"})
        assert (expired.status_code, expired.json()["code"]) == (401, "PGRST301")
        missing = httpx.get(f"{live.url}{REST}nothing", headers=headers)
        assert (missing.status_code, missing.json()["code"]) == (404, "42P01")


# -- plumbing: error translation, Content-Range, retries --------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "total"),
    [("0-24/3573458", 3573458), ("*/0", 0), ("*/*", None), ("0-14/*", None), ("*/12", 12), (None, None), ("", None)],
)
def test_content_range_totals(header: str | None, total: int | None) -> None:
    assert parse_total(header) == total


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-24T01:49:20.911133+00:00", "2026-11-24T01:49:20.911133Z"),
        ("2026-11-24T01:49:20.9111+00:00", "2026-11-24T01:49:20.911100Z"),
        ("2026-11-24T01:49:20+00:00", "2026-11-24T01:49:20.000000Z"),
        ("2026-11-24T03:49:20.5+02:00", "2026-11-24T01:49:20.500000Z"),
        ("2026-11-24T01:49:20.911133Z", "2026-11-24T01:49:20.911133Z"),
        (None, None),
    ],
)
def test_timestamps_are_normalised_to_the_sqlite_format(value: str | None, expected: str | None) -> None:
    assert utc_timestamp(value) == expected


def _mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> PostgrestClient:
    return PostgrestClient("https://p.supabase.co", "api", "sb_publishable_x", retry=FAST,
                           transport=httpx.MockTransport(handler))


def _pgrst(status: int, code: str, message: str = "m", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"code": code, "message": message, "details": None, "hint": None},
                          headers=headers)


CALLER = Caller("00000000-0000-4000-8000-000000000001", "user-token")


@pytest.mark.parametrize(
    ("response", "kind", "code"),
    [
        (_pgrst(401, "PGRST303", "JWT expired"), Unauthorized, "EXPIRED_TOKEN"),
        (_pgrst(401, "PGRST301", "JWT expired"), Unauthorized, "EXPIRED_TOKEN"),  # pre-v13
        (_pgrst(401, "PGRST301", "JWT cryptographic operation failed"), Unauthorized, "INVALID_TOKEN"),
        (_pgrst(401, "PGRST303", "JWT not in audience"), Unauthorized, "INVALID_TOKEN"),
        (_pgrst(403, "42501", 'new row violates row-level security policy for table "t"'), Forbidden,
         "STORE_FORBIDDEN"),
        (_pgrst(403, "42501", "permission denied for table t"), UpstreamError, "STORE_PERMISSION_DENIED"),
        (httpx.Response(401, json={"message": "Invalid API key"}), UpstreamError, "STORE_MISCONFIGURED"),
        (_pgrst(404, "PGRST205"), UpstreamError, "STORE_SCHEMA"),
        (_pgrst(404, "42P01"), UpstreamError, "STORE_SCHEMA"),  # pre-v13
        (_pgrst(406, "PGRST106"), UpstreamError, "STORE_SCHEMA"),
        (_pgrst(400, "PGRST204"), UpstreamError, "STORE_SCHEMA"),
        (_pgrst(406, "PGRST116"), NotFound, "NOT_FOUND"),
        (_pgrst(409, "23505"), UpstreamError, "STORE_ERROR"),
        (_pgrst(400, "22P02"), UpstreamError, "STORE_ERROR"),
        (_pgrst(500, "57014", "canceling statement due to statement timeout"), UpstreamTimeout, "STORE_TIMEOUT"),
        (_pgrst(500, "XX000"), UpstreamError, "STORE_ERROR"),
        (_pgrst(503, "PGRST002", headers={"Retry-After": "7"}), UpstreamUnavailable, "STORE_UNAVAILABLE"),
        (_pgrst(503, "08006"), UpstreamUnavailable, "STORE_UNAVAILABLE"),
        (_pgrst(504, "PGRST003"), UpstreamTimeout, "STORE_TIMEOUT"),
        (httpx.Response(520, text="<html>520</html>"), UpstreamUnavailable, "STORE_UNAVAILABLE"),
        (httpx.Response(414, text="URI too long"), UpstreamError, "STORE_ERROR"),
        (httpx.Response(200, text="not json"), UpstreamError, "STORE_BAD_RESPONSE"),
    ],
)
async def test_postgrest_errors_translate_once_to_ours(response: httpx.Response, kind: type[AppError], code: str) -> None:
    client = _mock_client(lambda request: response)
    with pytest.raises(kind) as caught:
        await client.select(CALLER, "t", {})
    assert type(caught.value) is kind and caught.value.code == code
    assert "m" != caught.value.message  # our own words, never the upstream text
    if code == "STORE_UNAVAILABLE" and response.headers.get("retry-after"):
        assert caught.value.retry_after == 7
    await client.aclose()


@pytest.mark.parametrize(
    ("failures", "method", "idempotent", "attempts"),
    [
        ([_pgrst(503, "PGRST002")], "GET", None, 2),
        ([_pgrst(504, "PGRST003")], "DELETE", None, 2),
        ([httpx.Response(520, text="x")], "PATCH", None, 2),
        ([_pgrst(503, "PGRST002")], "POST", True, 2),
        ([_pgrst(503, "PGRST002")], "POST", None, 1),  # a plain insert is never replayed
        ([_pgrst(500, "XX000")], "GET", None, 1),
        ([_pgrst(401, "PGRST303", "JWT expired")], "GET", None, 1),
        ([_pgrst(409, "23505")], "POST", True, 1),
        ([_pgrst(503, "PGRST002")] * 3, "GET", None, 3),  # the policy's attempt limit
    ],
)
async def test_only_transient_failures_of_idempotent_requests_are_retried(
    failures: list[httpx.Response], method: str, idempotent: bool | None, attempts: int
) -> None:
    answers = [*failures, httpx.Response(200, json=[])]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    client = _mock_client(handler)
    try:
        await client.request(CALLER, method, "t", idempotent=idempotent)
    except AppError:
        pass
    assert len(seen) == attempts
    await client.aclose()


@pytest.mark.parametrize(
    ("error", "retried", "kind"),
    [
        (httpx.ConnectError("refused"), True, UpstreamUnavailable),
        (httpx.RemoteProtocolError("Server disconnected"), True, UpstreamUnavailable),
        (httpx.ConnectTimeout("slow"), True, UpstreamTimeout),
        (httpx.ReadTimeout("slow"), False, UpstreamTimeout),
    ],
)
async def test_connection_errors_are_translated_and_retried_when_nothing_may_have_run(
    error: Exception, retried: bool, kind: type[AppError]
) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return httpx.Response(200, json=[{"id": "x"}])

    client = _mock_client(handler)
    if retried:
        assert (await client.select(CALLER, "t", {})).rows == [{"id": "x"}]
    else:
        with pytest.raises(kind):
            await client.select(CALLER, "t", {})
    assert len(calls) == (2 if retried else 1)
    await client.aclose()


@pytest.mark.parametrize("key", ["sb_secret_abc", encode({"role": "service_role", "iss": "supabase"})])
def test_secret_and_service_role_keys_are_refused(key: str) -> None:
    with pytest.raises(ConfigError, match="secret"):
        PostgrestClient("https://p.supabase.co", "api", key, retry=FAST)


async def test_a_caller_without_a_token_is_never_sent_as_anon() -> None:
    client = _mock_client(lambda request: pytest.fail("no request may be sent"))  # type: ignore[arg-type]
    with pytest.raises(Unauthorized):
        await client.select(Caller(CALLER.user_id), "t", {})
    await client.aclose()


# -- the store ---------------------------------------------------------------------------------------------------


async def test_every_request_acts_as_the_user_with_the_publishable_key(
    store: PostgrestStore, fake_postgrest: FakePostgrest, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    conversation = await store.ensure_conversation(caller, new_id(), "AI Chat")
    await store.add_message(caller, NewMessage(conversation.id, "user", "hello"))
    await store.list_messages(caller, conversation.id, 10, 0)
    await store.list_conversations(caller, 10, 0)
    await store.delete_conversation(caller, conversation.id)
    assert len(fake_postgrest.requests) >= 6
    for request in fake_postgrest.requests:
        assert request.headers["apikey"] == TEST_PUBLISHABLE_KEY
        assert request.headers["authorization"] == f"Bearer {caller.access_token}"
        profile = request.headers.get("accept-profile") or request.headers.get("content-profile")
        assert profile == "api"


async def test_conversation_rows_have_the_sqlite_shape(store: PostgrestStore, new_caller: Callable[[], Caller]) -> None:
    caller = new_caller()
    created = await store.create_conversation(caller, "Kitchen")
    assert created.user_id == caller.user_id and created.title == "Kitchen"
    assert created.message_count == 0 and created.last_message_at is None and created.metadata == {}
    assert created.created_at.endswith("Z") and len(created.created_at) == len("2026-11-24T01:49:20.911133Z")
    assert await store.get_conversation(caller, created.id) == created


async def test_list_is_by_latest_activity_with_a_total_and_tolerates_offsets_past_the_end(
    store: PostgrestStore, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    first, second, third = await _conversations(store, caller, 3)
    await store.add_message(caller, NewMessage(first, "user", "bump"))
    page = await store.list_conversations(caller, 2, 0)
    assert [c.id for c in page.conversations] == [first, third] and page.total == 3
    assert [c.id for c in (await store.list_conversations(caller, 2, 2)).conversations] == [second]
    beyond = await store.list_conversations(caller, 10, 50)
    assert beyond.conversations == [] and beyond.total == 3


async def test_trigger_keeps_counters_and_messages_read_oldest_first(
    store: PostgrestStore, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    conversation = await store.ensure_conversation(caller, new_id(), "AI Chat")
    saved = [await store.add_message(caller, NewMessage(conversation.id, "user" if i % 2 == 0 else "assistant",
                                                         f"m{i}")) for i in range(5)]
    after = await store.get_conversation(caller, conversation.id)
    assert after.message_count == 5 and after.last_message_at == saved[-1].created_at
    assert after.updated_at >= saved[-1].created_at
    assert [m.content for m in await store.list_messages(caller, conversation.id, 10, 0)] == [f"m{i}" for i in range(5)]
    assert [m.content for m in await store.list_messages(caller, conversation.id, 2, 1)] == ["m1", "m2"]
    assert [m.content for m in await store.recent_messages(caller, conversation.id, 2)] == ["m3", "m4"]


async def test_same_timestamp_messages_keep_insertion_order(
    store: PostgrestStore, new_caller: Callable[[], Caller], pg_cluster: Any
) -> None:
    caller = new_caller()
    conversation = await store.ensure_conversation(caller, new_id(), "AI Chat")
    with pg_cluster.connect(DATABASE) as db, db.transaction():  # one transaction: one now() for every row
        for i in range(6):
            db.execute("insert into api.agent_messages (id, conversation_id, role, content) values (%s, %s, 'user', %s)",
                       (new_id(), conversation.id, f"m{i}"))
    expected = [f"m{i}" for i in range(6)]
    assert [m.content for m in await store.list_messages(caller, conversation.id, 10, 0)] == expected
    assert [m.content for m in await store.recent_messages(caller, conversation.id, 3)] == expected[3:]


async def test_add_message_is_idempotent_by_its_id(store: PostgrestStore, new_caller: Callable[[], Caller]) -> None:
    caller = new_caller()
    conversation = await store.ensure_conversation(caller, new_id(), "AI Chat")
    message = NewMessage(conversation.id, "assistant", "once", agent_type="supervisor", metadata={"status": "complete"})
    first = await store.add_message(caller, message)
    again = await store.add_message(caller, message)
    assert first == again and first.metadata == {"status": "complete"} and first.agent_type == "supervisor"
    assert (await store.get_conversation(caller, conversation.id)).message_count == 1


async def test_a_write_whose_response_was_lost_is_retried_without_duplicating(
    store: PostgrestStore, fake_postgrest: FakePostgrest, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    conversation = await store.ensure_conversation(caller, new_id(), "AI Chat")
    fake_postgrest.fail_next(503, method="POST", after=True)  # committed, then the answer is a 503
    saved = await store.add_message(caller, NewMessage(conversation.id, "user", "exactly once"))
    assert saved.content == "exactly once"
    assert [r.method for r in fake_postgrest.requests].count("POST") >= 3  # ensure + lost insert + replay
    assert (await store.get_conversation(caller, conversation.id)).message_count == 1
    fake_postgrest.fail_next(520, method="GET")
    assert len(await store.list_messages(caller, conversation.id, 10, 0)) == 1


async def test_ensure_conversation_on_another_users_id_writes_nothing(
    store: PostgrestStore, new_caller: Callable[[], Caller]
) -> None:
    alice, bob = new_caller(), new_caller()
    conversation = await store.create_conversation(alice, "Alice's")
    with pytest.raises(NotFound) as caught:
        await store.ensure_conversation(bob, conversation.id, "AI Chat")
    assert caught.value.code == "CONVERSATION_NOT_FOUND"
    with pytest.raises(NotFound):
        await store.add_message(bob, NewMessage(conversation.id, "user", "sneaky"))
    assert await store.get_conversation(alice, conversation.id) == conversation


async def test_missing_conversations_are_not_found_everywhere(
    store: PostgrestStore, new_caller: Callable[[], Caller]
) -> None:
    caller, missing = new_caller(), new_id()
    for call in (
        store.get_conversation(caller, missing),
        store.delete_conversation(caller, missing),
        store.list_messages(caller, missing, 10, 0),
        store.recent_messages(caller, missing, 10),
        store.add_message(caller, NewMessage(missing, "user", "x")),
    ):
        with pytest.raises(NotFound) as caught:
            await call
        assert caught.value.code == "CONVERSATION_NOT_FOUND"


async def test_delete_cascades_to_messages(
    store: PostgrestStore, new_caller: Callable[[], Caller], pg_cluster: Any
) -> None:
    caller = new_caller()
    conversation = await store.ensure_conversation(caller, new_id(), "AI Chat")
    await store.add_message(caller, NewMessage(conversation.id, "user", "x"))
    await store.delete_conversation(caller, conversation.id)
    with pg_cluster.connect(DATABASE) as db:
        left = db.execute("select count(*) from api.agent_messages where conversation_id = %s", (conversation.id,))
        assert left.fetchone() == (0,)


async def test_ping_is_healthy_and_reports_outages(store: PostgrestStore, fake_postgrest: FakePostgrest) -> None:
    await store.ping()
    fake_postgrest.fail_next(503, times=3)
    with pytest.raises(UpstreamUnavailable):
        await store.ping()


async def test_an_expired_token_at_postgrest_is_expired_token(
    store: PostgrestStore, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    with pytest.raises(Unauthorized) as caught:
        await store.list_conversations(Caller(caller.user_id, mint(caller.user_id, exp=int(time.time()) - 60)), 5, 0)
    assert caught.value.code == "EXPIRED_TOKEN"


# -- the migration ------------------------------------------------------------------------------------------------


def test_grants_go_to_authenticated_only_and_protect_counters(pg_cluster: Any) -> None:
    with pg_cluster.connect(DATABASE) as db:
        for table in ("api.agent_conversations", "api.agent_messages"):
            for privilege in ("select", "insert", "update", "delete"):
                assert db.execute("select has_table_privilege('anon', %s, %s)", (table, privilege)).fetchone() == (
                    False,
                )
            assert db.execute("select has_table_privilege('authenticated', %s, 'select')", (table,)).fetchone() == (
                True,
            )
        for column in ("message_count", "user_id", "updated_at", "created_at"):
            assert db.execute(
                "select has_column_privilege('authenticated', 'api.agent_conversations', %s, 'update')", (column,)
            ).fetchone() == (False,)
        policies = db.execute("select count(*) from pg_policies where schemaname = 'api'").fetchone()
        assert policies == (8,)  # applied twice, still one policy per table and command


async def test_users_cannot_forge_counters_through_postgrest(
    store: PostgrestStore, raw: Any, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    conversation = await store.create_conversation(caller, "t")
    forged = raw("PATCH", "agent_conversations", caller.access_token, params={"id": f"eq.{conversation.id}"},
                 json={"message_count": 999})
    assert (forged.status_code, forged.json()["code"]) == (403, "42501")
    renamed = raw("PATCH", "agent_conversations", caller.access_token, params={"id": f"eq.{conversation.id}"},
                  json={"title": "renamed"}, headers={"Prefer": "return=representation"})
    assert renamed.status_code == 200 and renamed.json()[0]["title"] == "renamed"
    assert renamed.headers["content-range"] == "0-0/*"


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
    agent_type text check (agent_type in ('supervisor','invoices')),
    metadata jsonb default '{}', created_at timestamptz default now());
create function public.update_agent_conversation_on_message() returns trigger language plpgsql as $$
begin
  update api.agent_conversations set updated_at = now(), last_message_at = new.created_at,
         message_count = message_count + 1 where id = new.conversation_id;
  return new;
end $$;
create trigger update_agent_conversation_on_message_trigger after insert on api.agent_messages
  for each row execute function public.update_agent_conversation_on_message();
alter table api.agent_conversations enable row level security;
create policy "Enable all for authenticated users" on api.agent_conversations for all using (true);
grant usage on schema api to anon, authenticated;
grant select on all tables in schema api to anon;
"""


def test_the_migration_upgrades_the_earlier_services_schema_and_keeps_history(pg_cluster: Any) -> None:
    name = "legacy_upgrade"
    create_supabase_database(pg_cluster, name, migrate=False)
    user, conversation = new_id(), new_id()
    with pg_cluster.connect(name) as db:
        db.execute(LEGACY_SCHEMA)
        db.execute("insert into auth.users (id) values (%s)", (user,))
        db.execute("insert into api.agent_conversations (id, user_id, title) values (%s, %s, 'old')", (conversation, user))
        for i in range(2):
            db.execute("insert into api.agent_messages (conversation_id, content, role, created_at)"
                       " values (%s, %s, 'user', now() - make_interval(secs => %s))", (conversation, f"old{i}", 10 - i))
        apply_migrations(db, times=2)
        db.execute("insert into api.agent_messages (conversation_id, content, role) values (%s, 'new', 'assistant')",
                   (conversation,))
        count = db.execute("select message_count from api.agent_conversations where id = %s", (conversation,))
        assert count.fetchone() == (3,)  # the earlier trigger is gone: one count per message, not two
        order = db.execute("select content from api.agent_messages where conversation_id = %s order by created_at, seq",
                           (conversation,))
        assert [row[0] for row in order.fetchall()] == ["old0", "old1", "new"]
        policies = db.execute("select policyname from pg_policies where schemaname = 'api'").fetchall()
        assert ("Enable all for authenticated users",) not in policies and len(policies) == 8
        assert db.execute("select has_table_privilege('anon', 'api.agent_messages', 'select')").fetchone() == (False,)
