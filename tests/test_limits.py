"""Per-user rate limits and the open-stream cap, shared through the store by several workers.

"Two workers" are two app instances, each with its own uvicorn server, store connections and memory, on one
SQLite file or one Supabase project (the fake PostgREST over real PostgreSQL, limits kept by the RPC functions of
``migrations/003_rate_limits.sql`` and ``004_agent_runs.sql``): what ``uvicorn --workers 2`` runs. Windows are shortened to 2 s so recovery is
quick to show.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from app import create_app
from services.store import Caller
from services.store.sqlite.store import SQLiteStore
from tests.pg import RUN_SECRET, SERVICE, act_as
from tests.scripted_model import ScriptedModel
from tests.support import LiveServer, chunks, make_settings, new_id, serve, window_room
from tests.tokens import TEST_JWT_SECRET, TEST_PUBLISHABLE_KEY, bearer, mint

WINDOW = 2


def at_window_start(window: int = WINDOW) -> None:
    """Wait until a fixed window has just begun, so a burst of requests cannot straddle two windows."""
    time.sleep(window_room(window, window))


def chat(url: str, user: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"message": "hello", "conversation_id": new_id(), "user_id": user, "history": []}
    return httpx.post(f"{url}/api/chat/stream", json=body, headers=headers, timeout=20)


@dataclass(frozen=True)
class Backend:
    """Where two workers keep their shared limits, and how a request authenticates there."""

    env: dict[str, str]
    headers: Callable[[str], dict[str, str]]


@pytest.fixture(params=["sqlite", "supabase"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "sqlite":
        return Backend({}, lambda user: {})  # auth off: the claimed user_id is counted
    request.getfixturevalue("fake_postgrest")
    url: str = request.getfixturevalue("supabase_url")
    register: Callable[[str], None] = request.getfixturevalue("register_user")
    env = {"STORE": "supabase", "SUPABASE_URL": url, "SUPABASE_PUBLISHABLE_KEY": TEST_PUBLISHABLE_KEY,
           "SUPABASE_JWT_SECRET": TEST_JWT_SECRET, "SUPABASE_RUN_SECRET": RUN_SECRET}

    def headers(user: str) -> dict[str, str]:
        register(user)
        return bearer(mint(user, TEST_JWT_SECRET, issuer=f"{url}/auth/v1"))

    return Backend(env, headers)


@contextlib.contextmanager
def two_workers(tmp_path: Path, model: Any = None, **env: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    settings = make_settings(tmp_path, RATE_LIMIT_WINDOW_SECONDS=str(WINDOW), **env)
    with serve(create_app(settings, model=model)) as first, serve(create_app(settings, model=model)) as second:
        yield first, second


def assert_rate_limited(response: httpx.Response, limit: str = "chat") -> int:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "RATE_LIMIT_EXCEEDED" and error["retryable"] is True
    assert error["limit"] == limit  # which limit was hit
    assert 1 <= int(response.headers["retry-after"]) <= WINDOW
    assert error["retryAfter"] == int(response.headers["retry-after"]) == int(response.headers["ratelimit-reset"])
    assert response.headers["ratelimit-remaining"] == "0" and int(response.headers["ratelimit-limit"]) >= 1
    return int(response.headers["retry-after"])


def test_chat_limit_is_shared_by_two_workers_and_recovers_after_the_window(tmp_path: Path, backend: Backend) -> None:
    user, other = new_id(), new_id()
    mine, theirs = backend.headers(user), backend.headers(other)
    with two_workers(tmp_path, RATE_LIMIT_CHAT_PER_MINUTE="3", **backend.env) as (first, second):
        at_window_start()
        assert [chat(url, user, mine).status_code for url in (first.url, second.url, first.url)] == [200, 200, 200]
        retry_after = assert_rate_limited(chat(second.url, user, mine))  # the 4th turn, on the other worker
        assert_rate_limited(chat(first.url, user, mine))
        assert chat(first.url, other, theirs).status_code == 200  # limits are per user
        deadline = time.monotonic() + retry_after + 1
        while (response := chat(second.url, user, mine)).status_code == 429:
            assert time.monotonic() < deadline, "still limited after Retry-After"
            time.sleep(0.2)
    assert chunks(response.text)[-1]["type"] == "complete"


def test_other_api_requests_have_their_own_limit(tmp_path: Path) -> None:
    user = new_id()
    settings = make_settings(tmp_path, RATE_LIMIT_API_PER_MINUTE="3", RATE_LIMIT_WINDOW_SECONDS=str(WINDOW))
    with TestClient(create_app(settings)) as client:
        at_window_start()
        responses = [client.get("/api/conversations", params={"user_id": user}) for _ in range(4)]
        statuses = [response.status_code for response in responses]
        assert_rate_limited(responses[-1], "api")  # type: ignore[arg-type]
        chat_status = client.post(
            "/api/chat/stream", json={"message": "hi", "conversation_id": new_id(), "user_id": user}
        ).status_code
        health = client.get("/health").status_code  # not an /api route: never limited
    assert statuses == [200, 200, 200, 429]
    assert chat_status == 200 and health == 200


def test_repeated_and_refused_turns_count_as_api_requests(tmp_path: Path) -> None:
    """A repeated client_message_id attaches without a second turn, and a refused turn (409, 404) starts nothing,
    but each is a request: a client sending them in a loop (435 a second in a review) meets the API limit."""
    user, other = new_id(), new_id()
    settings = make_settings(tmp_path, RATE_LIMIT_API_PER_MINUTE="3", RATE_LIMIT_WINDOW_SECONDS=str(WINDOW))
    body = {"message": "hi", "conversation_id": new_id(), "user_id": user, "client_message_id": new_id()}
    with TestClient(create_app(settings)) as client:
        at_window_start()
        theirs = new_id()
        assert client.post("/api/chat/stream", json={**body, "user_id": other, "conversation_id": theirs,
                                                     "client_message_id": new_id()}).status_code == 200
        statuses = [client.post("/api/chat/stream", json=body).status_code]  # the turn: a chat turn, not a request
        statuses += [client.post("/api/chat/stream", json=body).status_code for _ in range(2)]  # repeats
        statuses.append(client.post("/api/chat/stream", json={**body, "message": "other"}).status_code)  # 409
        refused = client.post("/api/chat/stream", json={**body, "conversation_id": theirs, "client_message_id": None})
    assert statuses == [200, 200, 200, 409]
    assert_rate_limited(refused, "api")  # type: ignore[arg-type]  # the fourth request: over, not a 404


def test_failed_authentication_is_limited_by_client_address(tmp_path: Path) -> None:
    user = new_id()
    settings = make_settings(
        tmp_path, SUPABASE_JWT_SECRET=TEST_JWT_SECRET, RATE_LIMIT_API_PER_MINUTE="2",
        RATE_LIMIT_WINDOW_SECONDS=str(WINDOW),
    )
    with TestClient(create_app(settings)) as client:
        at_window_start()
        forged = bearer(mint(user, secret="x" * 40))
        statuses = [client.get("/api/conversations", params={"user_id": user}, headers=forged).status_code
                    for _ in range(3)]
        genuine = client.get("/api/conversations", params={"user_id": user}, headers=bearer(mint(user)))
    assert statuses == [401, 401, 429]
    assert genuine.status_code == 200  # the signed-in user has an allowance of their own


def bad_requests(method: str, path: str, user: str) -> list[dict[str, Any]]:
    """Requests to one route, each failing its own way before the route calls a service: a body that is not JSON, not
    an object or not sent as JSON; a user_id missing, malformed or someone else's; a malformed path id."""
    ids = dict.fromkeys(("run_id", "conversation_id", "action_id"), new_id())
    url = path.format(**ids)
    if method in ("GET", "DELETE"):  # the third: a valid token naming someone else
        kinds: list[dict[str, Any]] = [{"params": {}}, {"params": {"user_id": "nope"}},
                                       {"params": {"user_id": new_id()}}]
        named = {"params": {"user_id": user}}
    else:
        kinds = [{"content": b"{not json"}, {"content": b"[]"}, {"json": {"user_id": "nope"}},
                 {"json": {"user_id": new_id()}}, {"content": b"{}", "headers": {"Content-Type": "text/plain"}}]
        named = {"json": {"user_id": user}}
    if "{" in path:
        kinds.append({**named, "url": path.format(**dict.fromkeys(ids, "not-a-uuid"))})
    return [{"url": url, **kind} for kind in kinds]


def test_every_api_request_counts_against_its_caller_before_its_input_is_checked(tmp_path: Path) -> None:
    """Whatever fails (the body, the user named, a path id), the request was counted against the token's user first:
    once over the API limit the answer is the 429, not a 4xx about the input. Every /api route, each as a new user."""
    window = 10
    settings = make_settings(tmp_path, SUPABASE_JWT_SECRET=TEST_JWT_SECRET, RATE_LIMIT_API_PER_MINUTE="3",
                             RATE_LIMIT_WINDOW_SECONDS=str(window))
    app = create_app(settings)
    served = [(method, route.path) for route in app.routes if isinstance(route, Route) and route.path.startswith("/api")
              for method in sorted(route.methods or ()) if method != "HEAD"]
    assert len(served) == 13
    with serve(app) as live, httpx.Client(base_url=live.url, timeout=10) as client:
        time.sleep(window_room(window, 5))  # the whole walk (about 80 requests) in one window
        for method, path in served:
            user = new_id()
            headers = {**bearer(mint(user)), "Content-Type": "application/json"}
            statuses = []
            for bad in bad_requests(method, path, user):
                bad["headers"] = {**headers, **bad.get("headers", {})}
                response = client.request(method, **bad)
                statuses.append(response.status_code)
            where = f"{method} {path}: {statuses}"
            assert all(400 <= status < 500 and status != 429 for status in statuses[:3]), where
            assert set(statuses[3:]) <= {429}, where
            valid = client.request(method, path.format(run_id=new_id(), conversation_id=new_id(), action_id=new_id()),
                                   params={"user_id": user}, json={"user_id": user}, headers=headers)
            assert valid.status_code == 429, where  # the user's own allowance is spent, whatever they send
            error = valid.json()["error"]
            assert (error["code"], error["limit"]) == ("RATE_LIMIT_EXCEEDED", "api"), where
            assert valid.headers["ratelimit-limit"] == "3" and 1 <= int(valid.headers["retry-after"]) <= window


def test_requests_naming_no_valid_user_count_against_the_address_with_auth_off(tmp_path: Path) -> None:
    """With auth off the caller is the user_id a request names: one that names none (a body that cannot be read, a
    malformed user_id) is counted against its address, whichever route it reached."""
    window, user = 10, new_id()
    settings = make_settings(tmp_path, RATE_LIMIT_API_PER_MINUTE="3", RATE_LIMIT_WINDOW_SECONDS=str(window))
    json_type = {"Content-Type": "application/json"}
    with serve(create_app(settings)) as live, httpx.Client(base_url=live.url, timeout=10) as client:
        time.sleep(window_room(window, 5))
        statuses = [
            client.post("/api/conversations", content=b"{not json", headers=json_type).status_code,
            client.get("/api/conversations", params={"user_id": "nope"}).status_code,
            client.post("/api/chat/stream", content=b"[]", headers=json_type).status_code,
        ]
        refused = [client.post("/api/conversations", content=b"{not json", headers=json_type) for _ in range(3)]
        refused.append(client.get(f"/api/chat/runs/{new_id()}/events"))  # no user_id at all
        named = client.get("/api/conversations", params={"user_id": user})
    assert statuses == [400, 422, 422]
    assert {response.status_code for response in refused} == {429}
    assert refused[-1].json()["error"]["limit"] == "api" and refused[-1].headers["ratelimit-limit"] == "3"
    assert named.status_code == 200  # a user the address named has an allowance of their own


def test_open_streams_are_capped_per_user_across_workers(tmp_path: Path, backend: Backend) -> None:
    user, other = new_id(), new_id()
    mine = backend.headers(user)
    model = ScriptedModel(pieces=[f"w{i} " for i in range(15)], pause=0.05)
    with two_workers(tmp_path, model=model, MAX_STREAMS_PER_USER="1", **backend.env) as (first, second):
        body = {"message": "long", "conversation_id": new_id(), "user_id": user, "history": []}
        with httpx.stream("POST", f"{first.url}/api/chat/stream", json=body, headers=mine, timeout=20) as open_stream:
            pieces = open_stream.iter_bytes()
            next(pieces)  # the stream is under way on the first worker
            refused = chat(second.url, user, mine)
            assert chat(second.url, other, backend.headers(other)).status_code == 200  # another user is not affected
            assert b'"type":"complete"' in b"".join(pieces)
        after = chat(second.url, user, mine)  # the slot freed with the run, before its complete chunk was sent
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert refused.json()["error"]["limit"] == "streams" and refused.headers["ratelimit-limit"] == "1"
    assert 1 <= int(refused.headers["retry-after"]) <= 30  # when the run would lapse if its worker died
    assert after.status_code == 200


def test_counting_is_atomic_across_store_instances(tmp_path: Path) -> None:
    """40 simultaneous hits through two stores (two workers' connections) on one file: exactly the limit passes."""
    caller = Caller(new_id())
    results: list[bool] = []
    lock = threading.Lock()

    async def migrate() -> None:  # once, first: concurrent first-time migration is not what this test is about
        store = SQLiteStore(str(tmp_path / "shared.db"))
        await store.open()
        await store.aclose()

    anyio.run(migrate)

    def worker() -> None:
        async def hits() -> None:
            store = SQLiteStore(str(tmp_path / "shared.db"))
            await store.open()
            try:
                async with anyio.create_task_group() as group:
                    for _ in range(20):
                        group.start_soon(one, store)
            finally:
                await store.aclose()

        async def one(store: SQLiteStore) -> None:
            allowed, _ = await store.rate_limit_hit(caller, "chat", 3600, 10)
            with lock:
                results.append(allowed)

        anyio.run(hits)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 40 and results.count(True) == 10


# -- the Postgres functions (migrations/003_rate_limits.sql, 004_agent_runs.sql) on real PostgreSQL, as Supabase's users


def test_postgres_rate_limit_function_counts_per_user(pg_cluster: Any) -> None:
    from tests.conftest import DATABASE

    alice, bob = new_id(), new_id()

    def hit(user: str, window: int = 3600, limit: int = 2) -> tuple[bool, float]:
        with pg_cluster.connect(DATABASE) as db, db.transaction():
            act_as(db, user)
            row = db.execute("select allowed, retry_after from api.rate_limit_hit('chat', %s, %s)", [window, limit])
            return row.fetchone()  # type: ignore[no-any-return]

    results = [hit(alice)[0], hit(alice)[0], hit(alice)[0]]
    hit(alice, window=1)  # another window length is another row: calling it directly cannot reset the count
    assert results == [True, True, False] and hit(alice)[0] is False
    assert hit(bob)[0] is True
    assert 0 < hit(alice)[1] <= 3600


def test_postgres_running_runs_are_the_stream_slots_under_a_per_user_lock(pg_cluster: Any) -> None:
    """``api.agent_run_begin`` (migrations/004_agent_runs.sql) counts the user's running runs as their stream slots.
    Two begins at once queue on a per-user lock, so they cannot both take the last slot; a run whose heartbeat
    lapsed ends and frees its slot; anonymous callers may not begin at all."""
    import psycopg

    from tests.conftest import DATABASE

    user = new_id()
    with pg_cluster.connect(DATABASE) as db:
        db.execute("insert into auth.users (id) values (%s)", [user])

    def begin(db: Any, who: str | None = user) -> Any:
        act_as(db, who, headers=SERVICE)
        call = ("select api.agent_run_begin(%s, %s, 'hi', 'AI Chat', %s, %s, 30, 3600, 60, 50, repeat('k', 64),"
                " p_stream_limit => 1)")
        return db.execute(call, [new_id(), new_id(), new_id(), new_id()]).fetchone()[0]

    def begin_alone(who: str | None = user) -> Any:
        with pg_cluster.connect(DATABASE) as db, db.transaction():
            return begin(db, who)

    outcomes: list[str] = []
    with pg_cluster.connect(DATABASE) as first:
        with first.transaction():
            outcomes.append(begin(first)["outcome"])  # the slot is taken, and the lock held, until this commits
            second = threading.Thread(target=lambda: outcomes.append(begin_alone()["outcome"]))
            second.start()
            time.sleep(0.3)
            assert second.is_alive()  # queued behind the first begin
        second.join(timeout=10)
    assert outcomes == ["started", "streams_full"]

    with pg_cluster.connect(DATABASE) as db:  # the first run's worker died: its heartbeat lapses
        db.execute("update api.agent_runs set heartbeat_at = now() - interval '1 minute' where user_id = %s", [user])
    assert begin_alone()["outcome"] == "started"
    with pg_cluster.connect(DATABASE) as db:
        statuses = db.execute("select status from api.agent_runs where user_id = %s order by created_at", [user])
        assert [row[0] for row in statuses] == ["interrupted", "running"]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        begin_alone(who=None)


def test_forged_tokens_are_refused_in_process_before_they_reach_supabase_auth(tmp_path: Path) -> None:
    """Supabase Auth limits by the service's address: a flood of forged tokens must stop at the service, after the
    address's allowance, without another call to Auth (which would break sign-in checks for everyone)."""
    calls: list[str] = []

    async def user_endpoint(request: Request) -> JSONResponse:
        calls.append(request.headers.get("authorization", ""))
        return JSONResponse({"code": 403, "error_code": "bad_jwt", "msg": "invalid JWT"}, status_code=403)

    fake_auth = Starlette(routes=[Route("/auth/v1/user", user_endpoint)])
    window, user = 10, new_id()  # 20 requests fit in one window even on a busy machine (in a 2 s one they may not)
    with serve(fake_auth) as auth_server:
        settings = make_settings(tmp_path, SUPABASE_URL=auth_server.url, AUTH_VERIFY="remote",
                                 SUPABASE_PUBLISHABLE_KEY="sb_publishable_x",
                                 RATE_LIMIT_API_PER_MINUTE="5", RATE_LIMIT_WINDOW_SECONDS=str(window))
        with serve(create_app(settings)) as live:
            at_window_start(window)
            statuses = []
            for i in range(20):
                token = forged_es256(user, i, f"{auth_server.url}/auth/v1")
                response = httpx.get(f"{live.url}/api/conversations", params={"user_id": user},
                                     headers={"Authorization": f"Bearer {token}"})
                statuses.append(response.status_code)
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    assert len(calls) == 5


def test_calls_to_supabase_auth_are_bounded_overall_whatever_the_number_of_addresses(tmp_path: Path) -> None:
    """Twelve client addresses (127.0.0.2-13), each within its own allowance, rotating forged tokens: the service
    calls Supabase Auth at most AUTH_LOOKUPS_PER_MINUTE times per window, then answers 503 AUTH_BUSY itself."""
    calls: list[str] = []

    async def user_endpoint(request: Request) -> JSONResponse:
        calls.append(request.headers.get("authorization", ""))
        return JSONResponse({"code": 403, "error_code": "bad_jwt", "msg": "invalid JWT"}, status_code=403)

    window, user = 10, new_id()  # 36 requests fit in one window even on a busy machine
    with serve(Starlette(routes=[Route("/auth/v1/user", user_endpoint)])) as auth_server:
        settings = make_settings(tmp_path, SUPABASE_URL=auth_server.url, AUTH_VERIFY="remote",
                                 SUPABASE_PUBLISHABLE_KEY="sb_publishable_x",
                                 RATE_LIMIT_API_PER_MINUTE="3", RATE_LIMIT_WINDOW_SECONDS=str(window),
                                 AUTH_LOOKUPS_PER_MINUTE="10", AUTH_LOOKUP_CONCURRENCY="2")
        with serve(create_app(settings)) as live:
            at_window_start(window)
            codes = []
            for address in range(2, 14):
                with httpx.Client(transport=httpx.HTTPTransport(local_address=f"127.0.0.{address}")) as client:
                    for i in range(3):  # each address stays within its own allowance of failures
                        token = forged_es256(user, address * 10 + i, f"{auth_server.url}/auth/v1")
                        response = client.get(f"{live.url}/api/conversations", params={"user_id": user},
                                              headers={"Authorization": f"Bearer {token}"})
                        codes.append(response.json()["error"]["code"])
    assert len(calls) == 10
    assert codes == ["INVALID_TOKEN"] * 10 + ["AUTH_BUSY"] * 26


def forged_es256(user: str, index: int, issuer: str) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = int(time.time())
    header = {"alg": "ES256", "kid": "key-1", "typ": "JWT"}
    claims = {"sub": user, "role": "authenticated", "aud": "authenticated", "iat": now, "exp": now + 3600, "iss": issuer,
              "session_id": str(index)}
    return f"{part(header)}.{part(claims)}.{base64.urlsafe_b64encode(b'r' * 64).rstrip(b'=').decode()}"


def test_rate_limit_rows_of_past_windows_are_pruned(tmp_path: Path) -> None:
    from services.store.sqlite import limits as sqlite_limits

    async def scenario() -> int:
        store = SQLiteStore(str(tmp_path / "prune.db"))
        await store.open()
        try:
            for i in range(50):  # fifty addresses that failed once, a long time ago
                await store.rate_limit_hit(Caller(f"addr:10.0.0.{i}"), "api", 1, 5)
            await anyio.sleep(2.1)  # two 1-second windows later
            await store.rate_limit_hit(Caller(new_id()), "api", 1, 5)  # a new window: the old rows go
        finally:
            await store.aclose()
        with contextlib.closing(sqlite3.connect(tmp_path / "prune.db")) as db:
            return int(db.execute("SELECT count(*) FROM rate_limits").fetchone()[0])

    assert sqlite_limits.PRUNE_BATCH >= 50
    assert anyio.run(scenario) == 1
