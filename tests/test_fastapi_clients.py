"""What a client written against the earlier FastAPI service sends, on both stores: the habits FastAPI accepted keep
working, and the mistakes a frontend developer makes in their first hour get a 4xx envelope that says what to fix.

FastAPI read a body as JSON when its type was ``application/json`` or ``application/<anything>+json``, with any
parameters, and also when it had no ``Content-Type`` at all. That last one stays a 415 (docs/api.md, Errors): a
browser sends a body without a type and without a CORS preflight, so with authentication off any site's page could
write as any user.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.conftest import AuthHeaders
from tests.support import chunks, new_id


def _chat(user_id: str, **changes: Any) -> dict[str, Any]:
    return {"message": "hello", "conversation_id": new_id(), "user_id": user_id, "history": [], **changes}


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "application/merge-patch+json",
        "application/vnd.canvalo+json; charset=utf-8",
    ],
)
def test_a_json_body_is_read_as_fastapi_read_it(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, content_type: str | None
) -> None:
    headers = auth_headers(user_id) | ({"Content-Type": content_type} if content_type else {})
    created = client.post("/api/conversations", content=json.dumps({"user_id": user_id, "title": "t"}),
                          headers=headers)
    assert created.status_code == 201, created.text
    streamed = client.post("/api/chat/stream", content=json.dumps(_chat(user_id)), headers=headers)
    assert streamed.status_code == 200, streamed.text
    assert chunks(streamed.text)[-1]["type"] == "complete"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (None, b"hello"),  # no Content-Type, and not JSON either: say which type to send
        (None, b"{}"),  # JSON without a type: what a cross-site Blob body sends without preflight
        ("text/plain;charset=UTF-8", b"{}"),  # fetch with a string body and no headers
        ("application/x-www-form-urlencoded", b"user_id=x"),  # curl -d, an HTML form
        ("application/jsonx", b"{}"),
        ("application/json-seq", b"{}"),
    ],
)
def test_a_body_that_is_not_json_is_a_415_naming_the_type_to_send(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, content_type: str | None, body: bytes
) -> None:
    headers = auth_headers(user_id) | ({"Content-Type": content_type} if content_type else {})
    response = client.post("/api/conversations", content=body, headers=headers)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert "application/json" in response.json()["error"]["message"]


def test_fields_fastapi_ignored_or_took_as_null_are_accepted(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    headers = auth_headers(user_id)
    created = client.post("/api/conversations", json={"user_id": user_id, "title": None, "metadata": {}},
                          headers=headers)
    assert created.status_code == 201 and created.json()["title"] is None
    body = _chat(user_id, history=None, client_message_id=None, agent_type="supervisor")
    assert client.post("/api/chat/stream", json=body, headers=headers).status_code == 200


@pytest.mark.parametrize(
    "request_args",
    [
        ("GET", "/api/conversations", {}),
        ("GET", f"/api/conversations/{new_id()}", {}),
        ("DELETE", f"/api/conversations/{new_id()}", {}),
        ("GET", "/api/usage", {}),
        ("GET", "/api/conversations", {"user_id": ""}),  # URLSearchParams of an empty variable
    ],
)
def test_a_missing_user_id_says_it_is_required(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, request_args: tuple[str, str, dict[str, Any]]
) -> None:
    method, path, params = request_args
    response = client.request(method, path, params=params, headers=auth_headers(user_id))
    assert response.status_code == 422
    assert response.json()["error"]["message"] == "'user_id' is required."


def test_a_user_id_that_is_not_a_uuid_says_so(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    response = client.get("/api/conversations", params={"user_id": "me"}, headers=auth_headers(user_id))
    assert response.status_code == 422
    assert response.json()["error"]["message"] == "'user_id' must be a UUID."
