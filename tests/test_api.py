"""The conversation API and the error envelope, over HTTP. Runs against every store the fixtures provide."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from app import create_app
from tests.conftest import AuthHeaders
from tests.support import chunks, make_settings, new_id, serve

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
ENVELOPE_KEYS = {"code", "message", "userMessage", "suggestedActions", "retryable"}


def assert_envelope(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert ENVELOPE_KEYS <= set(error)
    assert isinstance(error["userMessage"], str) and isinstance(error["suggestedActions"], list)
    if code is not None:
        assert error["code"] == code
    return error  # type: ignore[no-any-return]


def create(client: TestClient, auth: AuthHeaders, user: str, title: str | None = "Kitchen repaint") -> dict[str, Any]:
    response = client.post("/api/conversations", json={"user_id": user, "title": title}, headers=auth(user))
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def chat(client: TestClient, auth: AuthHeaders, user: str, conversation: str, message: str) -> list[dict[str, Any]]:
    body = {"message": message, "conversation_id": conversation, "user_id": user, "history": []}
    response = client.post("/api/chat/stream", json=body, headers=auth(user))
    assert response.status_code == 200, response.text
    return chunks(response.text)


# -- health -------------------------------------------------------------------------------------------------------


def test_root_and_health_describe_the_service_without_secrets(client: TestClient) -> None:
    assert client.get("/").json()["status"] == "ok"
    health = client.get("/health")
    body = health.json()
    assert health.status_code == 200
    assert body["status"] == "healthy"
    assert body["store"]["reachable"] is True
    assert set(body["model"]) >= {"provider", "is_llm", "configured"}
    assert "mode" in body["auth"]
    assert "secret" not in health.text.lower() or "secret" in body["model"]["note"]


# -- conversations ------------------------------------------------------------------------------------------------


def test_create_returns_201_with_the_full_shape(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    conversation = create(client, auth_headers, user_id)
    assert set(conversation) == {
        "id", "user_id", "title", "created_at", "updated_at", "last_message_at", "message_count", "metadata",
        "active_leaf_id",
    }
    assert conversation["user_id"] == user_id and conversation["active_leaf_id"] is None
    assert conversation["title"] == "Kitchen repaint"
    assert conversation["message_count"] == 0 and conversation["last_message_at"] is None
    assert ISO_UTC.match(conversation["created_at"]) and ISO_UTC.match(conversation["updated_at"])
    assert conversation["metadata"] == {}


def test_title_is_optional(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    assert create(client, auth_headers, user_id, title=None)["title"] is None


def test_list_pages_most_recent_activity_first(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    first, second, third = (create(client, auth_headers, user_id, f"c{i}")["id"] for i in range(3))
    chat(client, auth_headers, user_id, first, "hello")  # activity moves the oldest to the top
    page = client.get("/api/conversations", params={"user_id": user_id, "limit": 2}, headers=auth_headers(user_id))
    body = page.json()
    assert [c["id"] for c in body["conversations"]] == [first, third]
    assert (body["total"], body["limit"], body["offset"], body["has_more"]) == (3, 2, 0, True)
    rest = client.get(
        "/api/conversations", params={"user_id": user_id, "limit": 2, "offset": 2}, headers=auth_headers(user_id)
    ).json()
    assert [c["id"] for c in rest["conversations"]] == [second]
    assert rest["has_more"] is False


def test_get_returns_messages_oldest_first_with_paging(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    conversation = new_id()
    chat(client, auth_headers, user_id, conversation, "first question")
    chat(client, auth_headers, user_id, conversation, "second question")
    body = client.get(
        f"/api/conversations/{conversation}", params={"user_id": user_id}, headers=auth_headers(user_id)
    ).json()
    assert body["message_count"] == 4
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant"]
    assert body["messages"][0]["content"] == "first question"
    # The earlier service's keys, and the tree's (issue 24): parent_id, and siblings in a conversation's messages.
    assert set(body["messages"][0]) == {"id", "role", "content", "agent_type", "timestamp", "metadata", "parent_id",
                                        "sibling_ids"}
    assert ISO_UTC.match(body["messages"][0]["timestamp"])
    page = client.get(
        f"/api/conversations/{conversation}",
        params={"user_id": user_id, "message_limit": 2, "message_offset": 2},
        headers=auth_headers(user_id),
    ).json()
    assert [m["content"] for m in page["messages"]][0] == "second question"
    assert len(page["messages"]) == 2


def test_delete_removes_the_conversation_and_its_messages(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    conversation = new_id()
    chat(client, auth_headers, user_id, conversation, "hello")
    params, headers = {"user_id": user_id}, auth_headers(user_id)
    deleted = client.delete(f"/api/conversations/{conversation}", params=params, headers=headers)
    assert deleted.json() == {"status": "deleted", "conversation_id": conversation}
    assert_envelope(client.get(f"/api/conversations/{conversation}", params=params, headers=headers), 404)
    assert_envelope(client.delete(f"/api/conversations/{conversation}", params=params, headers=headers), 404)


def test_unknown_conversation_is_404(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    response = client.get(f"/api/conversations/{new_id()}", params={"user_id": user_id}, headers=auth_headers(user_id))
    assert_envelope(response, 404, "CONVERSATION_NOT_FOUND")


# -- two users ----------------------------------------------------------------------------------------------------


def test_users_cannot_see_or_touch_each_others_conversations(client: TestClient, auth_headers: AuthHeaders) -> None:
    alice, bob = new_id(), new_id()
    conversation = new_id()
    chat(client, auth_headers, alice, conversation, "alice's private question")
    as_bob = {"params": {"user_id": bob}, "headers": auth_headers(bob)}

    listed = client.get("/api/conversations", **as_bob).json()  # type: ignore[arg-type]
    assert listed["conversations"] == [] and listed["total"] == 0
    assert_envelope(client.get(f"/api/conversations/{conversation}", **as_bob), 404)  # type: ignore[arg-type]
    assert_envelope(client.delete(f"/api/conversations/{conversation}", **as_bob), 404)  # type: ignore[arg-type]
    body = {"message": "bob writes into alice's chat", "conversation_id": conversation, "user_id": bob}
    assert_envelope(client.post("/api/chat/stream", json=body, headers=auth_headers(bob)), 404)

    alice_view = client.get(
        f"/api/conversations/{conversation}", params={"user_id": alice}, headers=auth_headers(alice)
    ).json()
    assert [m["content"] for m in alice_view["messages"] if m["role"] == "user"] == ["alice's private question"]
    assert alice_view["message_count"] == 2


# -- bad input ----------------------------------------------------------------------------------------------------

CHAT = "/api/chat/stream"


def _chat_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"message": "hi", "conversation_id": new_id(), "user_id": new_id(), "history": []}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (_chat_body(message=...), 422, "VALIDATION_ERROR"),
        (_chat_body(message=""), 422, "VALIDATION_ERROR"),
        (_chat_body(message="   "), 422, "VALIDATION_ERROR"),
        (_chat_body(message="x" * 10_001), 422, "VALIDATION_ERROR"),
        (_chat_body(message=42), 422, "VALIDATION_ERROR"),
        (_chat_body(conversation_id="invalid-uuid-format"), 422, "VALIDATION_ERROR"),
        (_chat_body(conversation_id=...), 422, "VALIDATION_ERROR"),
        (_chat_body(user_id=...), 422, "VALIDATION_ERROR"),
        (_chat_body(user_id="1; drop table"), 422, "VALIDATION_ERROR"),
        (_chat_body(history="not a list"), 422, "VALIDATION_ERROR"),
        (["a", "list"], 422, "VALIDATION_ERROR"),
    ],
)
def test_bad_chat_bodies_get_a_4xx_envelope(
    client: TestClient, auth_headers: AuthHeaders, body: Any, status: int, code: str
) -> None:
    # The token is checked before the body is read: it names a real user, whatever the body claims.
    claimed = body.get("user_id") if isinstance(body, dict) else None
    user = claimed if isinstance(claimed, str) and _is_uuid(claimed) else new_id()
    assert_envelope(client.post(CHAT, json=body, headers=auth_headers(user)), status, code)


def test_message_of_exactly_10000_characters_is_accepted(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    items = chat(client, auth_headers, user_id, new_id(), "x" * 10_000)
    assert items[-1]["type"] == "complete"


def test_malformed_json_is_400(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    headers = {"content-type": "application/json", **auth_headers(user_id)}
    assert_envelope(client.post(CHAT, content=b"{not json", headers=headers), 400, "MALFORMED_JSON")


def test_wrong_content_type_is_415(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    headers = {"content-type": "text/plain", **auth_headers(user_id)}
    assert_envelope(client.post(CHAT, content=b"hello", headers=headers), 415, "UNSUPPORTED_MEDIA_TYPE")


def test_oversize_body_is_413(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    body = _chat_body(user_id=user_id, history=[{"content": "x" * 9_000}] * 40)
    assert_envelope(client.post(CHAT, json=body, headers=auth_headers(user_id)), 413, "PAYLOAD_TOO_LARGE")


def test_oversize_chunked_body_is_413(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    def body() -> Any:
        for _ in range(40):
            yield b"x" * 10_000

    headers = {"content-type": "application/json", **auth_headers(user_id)}
    assert_envelope(client.post(CHAT, content=body(), headers=headers), 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"user_id": "nope"}, "user_id"),
        ({"user_id": None}, "user_id"),
    ],
)
def test_bad_list_queries_are_422(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, params: dict[str, Any], field: str
) -> None:
    query = {"user_id": user_id, **params}
    query = {k: v for k, v in query.items() if v is not None}
    error = assert_envelope(
        client.get("/api/conversations", params=query, headers=auth_headers(user_id)), 422, "VALIDATION_ERROR"
    )
    assert field in error["message"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"message_limit": "0"}, "message_limit"),
        ({"message_limit": "501"}, "message_limit"),
        ({"message_offset": "-5"}, "message_offset"),
    ],
)
def test_bad_message_paging_is_422(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, params: dict[str, Any], field: str
) -> None:
    conversation = create(client, auth_headers, user_id)["id"]
    response = client.get(
        f"/api/conversations/{conversation}", params={"user_id": user_id, **params}, headers=auth_headers(user_id)
    )
    assert field in assert_envelope(response, 422)["message"]


def test_non_uuid_conversation_path_is_422(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    for method in ("GET", "DELETE"):
        response = client.request(
            method, "/api/conversations/not-a-uuid", params={"user_id": user_id}, headers=auth_headers(user_id)
        )
        assert_envelope(response, 422, "VALIDATION_ERROR")


@pytest.mark.parametrize(
    "body",
    [{"title": "no user"}, {"user_id": "nope"}, {"user_id": None}],
)
def test_bad_create_bodies_are_422(client: TestClient, auth_headers: AuthHeaders, body: dict[str, Any]) -> None:
    assert_envelope(client.post("/api/conversations", json=body, headers=auth_headers(new_id())), 422)


def test_overlong_or_non_string_title_is_422(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    for title in ("t" * 201, " " + "t" * 201, 12):
        body = {"user_id": user_id, "title": title}
        assert_envelope(client.post("/api/conversations", json=body, headers=auth_headers(user_id)), 422)


def test_a_title_is_measured_once_trimmed(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    """README: 1..200 characters once trimmed; the spaces around it are not the title."""
    title = "t" * 200
    created = client.post("/api/conversations", json={"user_id": user_id, "title": f"  {title}\n"},
                          headers=auth_headers(user_id))
    assert created.status_code == 201 and created.json()["title"] == title
    renamed = client.patch(f"/api/conversations/{created.json()['id']}", json={"user_id": user_id, "title": f" {title} "},
                           headers=auth_headers(user_id))
    assert renamed.status_code == 200 and renamed.json()["title"] == title


def test_nul_is_refused_alike_on_both_stores(client: TestClient, auth_headers: AuthHeaders) -> None:
    user = new_id()
    headers = {**auth_headers(user), "Content-Type": "application/json"}
    bodies = [
        ("/api/chat/stream", {"message": "a\u0000b", "conversation_id": new_id(), "user_id": user}, "message"),
        ("/api/conversations", {"title": "a\u0000b", "user_id": user}, "title"),
    ]
    for path, body, field in bodies:
        response = client.post(path, content=json.dumps(body), headers=headers)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "VALIDATION_ERROR" and field in response.json()["error"]["message"]
    # A backslash and "u0000" typed as text are not a NUL.
    typed = client.post("/api/conversations", content=json.dumps({"title": "\\u0000", "user_id": user}),
                        headers=headers)
    assert typed.status_code == 201 and typed.json()["title"] == "\\u0000"


def test_unknown_route_and_wrong_method_use_the_envelope(client: TestClient) -> None:
    assert_envelope(client.get("/api/nothing-here"), 404, "NOT_FOUND")
    assert_envelope(client.put("/api/conversations"), 405, "METHOD_NOT_ALLOWED")
    assert_envelope(client.get("/api/chat/stream"), 405, "METHOD_NOT_ALLOWED")


def test_a_trailing_slash_is_an_unknown_route_on_every_route_never_a_redirect(tmp_path: Path) -> None:
    """Starlette would answer 307 with an empty body, to the other spelling on whatever Host the client sent."""
    app = create_app(make_settings(tmp_path))
    spelt = sorted(
        (method, route.path.format(**{name: new_id() for name in route.param_convertors}) + "/")
        for route in app.routes if isinstance(route, Route) and route.path != "/"
        for method in route.methods or () if method != "HEAD"  # a HEAD answer has no body to hold the envelope
    )
    assert ("POST", "/api/chat/stream/") in spelt and ("GET", "/health/") in spelt
    with serve(app) as live, httpx.Client(base_url=live.url, headers={"Host": "evil.example"}) as client:
        for method, path in spelt:
            response = client.request(method, path, params={"user_id": new_id()}, json={"user_id": new_id()})
            assert "location" not in response.headers, (method, path)
            assert_envelope(response, 404, "NOT_FOUND")


def test_a_control_character_after_a_path_never_reaches_the_route_without_it(tmp_path: Path) -> None:
    """Starlette's route patterns end in ``$``, which also matches before a final newline: ``/metrics%0A`` reached
    the metrics route, past a proxy's exact rule for ``/metrics``. A path ending in a control character is an unknown
    route, or, where the path ends in a parameter (an id), that parameter holds it and is refused as invalid."""
    app = create_app(make_settings(tmp_path))
    spelt = sorted(
        (method, route.path.format(**{name: new_id() for name in route.param_convertors}) + ending,
         route.path.endswith("}"))
        for route in app.routes if isinstance(route, Route)
        for method in route.methods or () if method != "HEAD"
        for ending in ("%0A", "%0D", "%0D%0A", "%00", "%09")
    )
    assert ("GET", "/metrics%0A", False) in spelt and ("GET", "/%0A", False) in spelt
    with serve(app) as live, httpx.Client(base_url=live.url) as client:
        for method, path, ends_in_id in spelt:
            response = client.request(method, path, params={"user_id": new_id()}, json={"user_id": new_id()})
            if ends_in_id:
                assert_envelope(response, 422, "VALIDATION_ERROR")
            else:
                assert_envelope(response, 404, "NOT_FOUND")


def test_errors_never_carry_internals(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    headers = {"content-type": "application/json", **auth_headers(user_id)}
    text = client.post(CHAT, content=b'{"message": ', headers=headers).text
    for leak in ("Traceback", "json.decoder", "Expecting value", "sqlite", ".py"):
        assert leak not in text


def test_json_responses_carry_security_headers_and_a_request_id(client: TestClient) -> None:
    response = client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert response.headers["x-content-type-options"] == "nosniff"
    generated = client.get("/health", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


def test_cors_allows_configured_origins_only(client: TestClient) -> None:
    allowed = client.get("/health", headers={"Origin": "http://localhost:5173"})
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:5173"
    denied = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in denied.headers
