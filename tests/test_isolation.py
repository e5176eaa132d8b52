"""Tenant isolation: user B can never list, read, append to, rename or delete user A's conversations or records.

Two layers are attacked. Through the service's API (on both stores, with real tokens), by every route and by
guessing ids. And directly at the Data API with B's own valid token, the way any Supabase client could call it:
there the only guard is PostgreSQL's row-level security from the migration, running for real under the fake
PostgREST's role switch, so these tests fail if a policy or grant is wrong.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from services.agents.tools import run_tool, tools_for
from services.domains import DOMAINS
from services.store import Caller
from services.store import sample_data
from tests.conftest import DATABASE, AuthHeaders
from tests.pg import SERVICE
from tests.support import chunks, new_id
from tests.tokens import TEST_PUBLISHABLE_KEY, mint

REST = "/rest/v1/"


def _chat(client: TestClient, auth: AuthHeaders, user: str, conversation: str, text: str) -> httpx.Response:
    body = {"message": text, "conversation_id": conversation, "user_id": user}
    return client.post("/api/chat/stream", json=body, headers=auth(user))


def _alice_with_history(client: TestClient, auth: AuthHeaders) -> tuple[str, str]:
    alice, conversation = new_id(), new_id()
    response = _chat(client, auth, alice, conversation, "alice's private question")
    assert response.status_code == 200 and chunks(response.text)[-1]["type"] == "complete"
    return alice, conversation


# -- through the service ------------------------------------------------------------------------------------------


def test_bob_cannot_reach_alices_conversation_by_any_route(client: TestClient, auth_headers: AuthHeaders) -> None:
    alice, conversation = _alice_with_history(client, auth_headers)
    bob = new_id()
    as_bob = {"params": {"user_id": bob}, "headers": auth_headers(bob)}

    listed = client.get("/api/conversations", **as_bob).json()  # type: ignore[arg-type]
    assert (listed["conversations"], listed["total"]) == ([], 0)
    for method in ("GET", "DELETE"):
        response = client.request(method, f"/api/conversations/{conversation}", **as_bob)  # type: ignore[arg-type]
        assert (response.status_code, response.json()["error"]["code"]) == (404, "CONVERSATION_NOT_FOUND")
    appended = _chat(client, auth_headers, bob, conversation, "bob writes into alice's chat")
    assert (appended.status_code, appended.json()["error"]["code"]) == (404, "CONVERSATION_NOT_FOUND")

    mine = client.get(f"/api/conversations/{conversation}", params={"user_id": alice}, headers=auth_headers(alice))
    body = mine.json()
    assert body["message_count"] == 2 and body["title"] == "alice's private question"  # titled by its first message
    assert [m["content"] for m in body["messages"] if m["role"] == "user"] == ["alice's private question"]


def test_bob_cannot_act_as_alice_with_his_own_token(client: TestClient, auth_headers: AuthHeaders) -> None:
    alice, conversation = _alice_with_history(client, auth_headers)
    bob_headers = auth_headers(new_id())
    as_alice_with_bobs_token = [
        client.get("/api/conversations", params={"user_id": alice}, headers=bob_headers),
        client.get(f"/api/conversations/{conversation}", params={"user_id": alice}, headers=bob_headers),
        client.delete(f"/api/conversations/{conversation}", params={"user_id": alice}, headers=bob_headers),
        client.post("/api/conversations", json={"user_id": alice}, headers=bob_headers),
        client.post("/api/chat/stream", json={"message": "x", "conversation_id": conversation, "user_id": alice},
                    headers=bob_headers),
    ]
    assert [r.status_code for r in as_alice_with_bobs_token] == [403] * 5
    assert {r.json()["error"]["code"] for r in as_alice_with_bobs_token} == {"USER_ID_MISMATCH"}


def test_guessed_ids_reveal_nothing(client: TestClient, auth_headers: AuthHeaders) -> None:
    alice, conversation = _alice_with_history(client, auth_headers)
    bob = new_id()
    guesses = [conversation, conversation.upper(), new_id()]
    answers = [
        client.get(f"/api/conversations/{guess}", params={"user_id": bob}, headers=auth_headers(bob))
        for guess in guesses
    ]
    # A real id of someone else's and an id nobody uses look exactly alike.
    assert {(r.status_code, r.json()["error"]["code"], r.json()["error"]["message"]) for r in answers} == {
        (404, "CONVERSATION_NOT_FOUND", "Conversation not found.")
    }


def test_tools_act_only_on_the_callers_own_records(client: TestClient, auth_headers: AuthHeaders) -> None:
    """Every tool, run as Bob through the service's store with Bob's own token, on Alice's records in every domain:
    nothing is listed, read, changed or deleted (on Supabase under real row-level security; the Data API tests below
    show the policies hold without the store's own owner filters)."""
    alice, bob = _caller(auth_headers, new_id()), _caller(auth_headers, new_id())
    store = client.app_state["store"]
    assert client.portal is not None
    run = functools.partial(client.portal.call, run_tool, store)
    for domain in DOMAINS:
        list_tool, get_tool, create_tool, update_tool, delete_tool = tools_for(domain)
        created = run(alice, create_tool, sample_data.SAMPLE[domain.agent_type][0])
        assert created.status == "success", created.content
        record = created.content["created"]
        assert run(bob, list_tool, {}).content == {"table": domain.table, "count": 0, "rows": []}
        changes = {domain.required[0]: "Bob was here"}
        attempts = ((get_tool, {"id": record["id"]}), (update_tool, {"id": record["id"], "changes": changes}),
                    (delete_tool, {"id": record["id"]}))  # not even kept as a pending action: not Bob's record
        for tool, arguments in attempts:
            refused = run(bob, tool, arguments)
            assert refused.status == "error" and "No " in refused.content["error"], (tool.name, refused.content)
        assert run(alice, get_tool, {"id": record["id"]}).content == {"record": record}  # untouched
        assert [r["id"] for r in run(alice, list_tool, {}).content["rows"]] == [record["id"]]


def _caller(auth: AuthHeaders, user: str) -> Caller:
    token = auth(user).get("Authorization", "").removeprefix("Bearer ") or None
    return Caller(user_id=user, access_token=token)


# -- directly at the Data API with Bob's own valid token (real row-level security) -------------------------------


@pytest.fixture
def data_api(supabase_url: str, fake_postgrest: Any, register_user: Callable[[str], None]) -> Callable[..., Any]:
    def call(method: str, table: str, user: str | None, **kwargs: Any) -> httpx.Response:
        headers = {"apikey": TEST_PUBLISHABLE_KEY, "Prefer": "return=representation", **kwargs.pop("headers", {})}
        if user is not None:
            register_user(user)
            headers["Authorization"] = f"Bearer {mint(user)}"
        return httpx.request(method, f"{supabase_url}{REST}{table}", headers=headers, timeout=10, **kwargs)

    return call


@pytest.fixture
def alices(data_api: Callable[..., httpx.Response]) -> tuple[str, str, str]:
    """Alice's conversation with her message in it, written as the service writes a turn: through agent_run_begin."""
    alice, conversation, message = new_id(), new_id(), new_id()
    begun = data_api("POST", "rpc/agent_run_begin", alice, headers=SERVICE, json={
        "p_run_id": new_id(), "p_conversation_id": conversation, "p_text": "secret", "p_title": "A",
        "p_user_message_id": message, "p_assistant_message_id": new_id(), "p_stale_seconds": 30,
        "p_events_ttl": 3600, "p_window_seconds": 60, "p_history_limit": 10, "p_write_key": "k" * 64})
    assert begun.status_code == 200 and begun.json()["outcome"] == "started", begun.text
    return alice, conversation, message


def test_rls_hides_alices_rows_from_bobs_reads(data_api: Callable[..., httpx.Response], alices: Any) -> None:
    _, conversation, message = alices
    bob = new_id()
    reads = [
        data_api("GET", "agent_conversations", bob),
        data_api("GET", "agent_conversations", bob, params={"id": f"eq.{conversation}"}),
        data_api("GET", "agent_messages", bob),
        data_api("GET", "agent_messages", bob, params={"conversation_id": f"eq.{conversation}"}),
        data_api("GET", "agent_messages", bob, params={"id": f"eq.{message}"}),
    ]
    assert [(r.status_code, r.json()) for r in reads] == [(200, [])] * 5
    counted = data_api("GET", "agent_messages", bob, headers={"Prefer": "count=exact"})
    assert counted.headers["content-range"] == "*/0"


def test_rls_stops_bobs_writes_to_alices_rows(
    data_api: Callable[..., httpx.Response], alices: Any, pg_cluster: Any
) -> None:
    """The chat tables take no write through the Data API at all (007; tests/test_data_api.py tries every one): Bob's
    attempts are refused outright, whether or not row-level security would have hidden the row."""
    alice, conversation, message = alices
    bob = new_id()
    attempts = [
        data_api("PATCH", "agent_conversations", bob, params={"id": f"eq.{conversation}"}, json={"title": "B"}),
        data_api("PATCH", "agent_messages", bob, params={"id": f"eq.{message}"}, json={"content": "B"}),
        data_api("DELETE", "agent_conversations", bob, params={"id": f"eq.{conversation}"}),
        data_api("DELETE", "agent_messages", bob, params={"id": f"eq.{message}"}),
        # Appending to Alice's conversation (the foreign key alone would allow it), posing as her, taking her id.
        data_api("POST", "agent_messages", bob, headers={"Prefer": "return=minimal"},
                 json={"id": new_id(), "conversation_id": conversation, "role": "user", "content": "B"}),
        data_api("POST", "agent_conversations", bob, json={"id": new_id(), "user_id": alice},
                 headers={"Prefer": "return=minimal"}),
        data_api("POST", "agent_conversations", bob, json={"id": conversation, "user_id": bob, "title": "B"},
                 params={"on_conflict": "id"},
                 headers={"Prefer": "return=representation,resolution=merge-duplicates"}),
    ]
    assert [(r.status_code, r.json()["code"]) for r in attempts] == [(403, "42501")] * len(attempts)
    # Through the functions, Alice's ids are simply not Bob's.
    renamed = data_api("POST", "rpc/agent_conversation_rename", bob, json={"p_id": conversation, "p_title": "B"})
    deleted = data_api("POST", "rpc/agent_conversation_delete", bob, json={"p_id": conversation})
    taken = data_api("POST", "rpc/agent_conversation_create", bob, json={"p_id": conversation, "p_title": "B"})
    assert [r.json() for r in (renamed, deleted, taken)] == [None, False, {"outcome": "not_found"}]

    with pg_cluster.connect(DATABASE) as db:
        row = db.execute("select user_id::text, title, message_count from api.agent_conversations where id = %s",
                         (conversation,)).fetchone()
        content = db.execute("select content from api.agent_messages where conversation_id = %s and role = 'user'",
                             (conversation,))
        assert row == (alice, "A", 2) and content.fetchall() == [("secret",)]


def test_the_publishable_key_alone_reads_and_writes_nothing(
    data_api: Callable[..., httpx.Response], alices: Any
) -> None:
    _, conversation, _ = alices
    for method, table, kwargs in [
        ("GET", "agent_conversations", {}),
        ("GET", "agent_messages", {}),
        ("POST", "agent_conversations", {"json": {"id": new_id(), "user_id": new_id()}}),
        ("DELETE", "agent_conversations", {"params": {"id": f"eq.{conversation}"}}),
    ]:
        response = data_api(method, table, None, **kwargs)
        assert (response.status_code, response.json()["code"]) == (401, "42501"), (method, table)


@pytest.mark.parametrize("domain", DOMAINS, ids=[d.table for d in DOMAINS])
def test_rls_keeps_every_business_table_per_user(data_api: Callable[..., httpx.Response], domain: Any) -> None:
    """Bob, with his own token and no owner filter, cannot see, change, delete, hand over or forge Alice's records."""
    alice, bob = new_id(), new_id()
    record = {**sample_data.SAMPLE[domain.agent_type][0], "id": new_id(), "user_id": alice}
    created = data_api("POST", domain.table, alice, json=record)
    assert created.status_code == 201, created.text
    by_id = {"id": f"eq.{record['id']}"}
    change = {domain.required[0]: "Bob was here"}
    for method, kwargs in (("GET", {}), ("GET", {"params": by_id}), ("PATCH", {"params": by_id, "json": change}),
                           ("DELETE", {"params": by_id})):
        hidden = data_api(method, domain.table, bob, **{"params": {}, **kwargs})
        assert (hidden.status_code, hidden.json()) == (200, []), method
    forged = data_api("POST", domain.table, bob, json={**record, "id": new_id()}, headers={"Prefer": "return=minimal"})
    assert (forged.status_code, forged.json()["code"]) == (403, "42501")  # the insert policy: user_id must be his
    handed_over = data_api("PATCH", domain.table, alice, params=by_id, json={"user_id": bob})
    assert (handed_over.status_code, handed_over.json()["code"]) == (403, "42501")  # no update grant on user_id
    anon = data_api("GET", domain.table, None)
    assert (anon.status_code, anon.json()["code"]) == (401, "42501")
    mine = data_api("GET", domain.table, alice, params={**by_id, "select": f"user_id,{domain.required[0]}"})
    assert mine.json() == [{"user_id": alice, domain.required[0]: record[domain.required[0]]}]
