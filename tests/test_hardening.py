"""Findings of the outside security review (issue 11) at the HTTP edge: request bodies, query integers, ids,
disconnects, the ignored ``history``, what reaches the logs, and startup with an unusable SQLITE_PATH.

Each runs over the interface the finding was made on: HTTP through the shared fixtures (on every store), a raw
socket against a real uvicorn server, or the service started as a subprocess the way README starts it.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

import app as app_module
from app import create_app
from settings import Settings
from tests.conftest import AuthHeaders
from tests.support import free_port, make_settings, new_id, serve
from web.middleware import RequestContext

ROOT = Path(__file__).resolve().parent.parent
METRICS_TOKEN = "metrics-token-0123456789"


def post_raw(client: TestClient, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return client.post(path, content=body, headers={**headers, "content-type": "application/json"})


def conversations(client: TestClient, auth: AuthHeaders, user: str) -> dict[str, Any]:
    response = client.get("/api/conversations", params={"user_id": user}, headers=auth(user))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


# -- 1. lone surrogates -------------------------------------------------------------------------------------------


def _chat_body(user: str, conversation: str, message: str = '"hello"', history: str = "[]") -> bytes:
    text = (
        f'{{"message": {message}, "conversation_id": "{conversation}", "user_id": "{user}", "history": {history}}}'
    )
    return text.encode("utf-8")


@pytest.mark.parametrize(
    ("where", "status", "named"),
    [
        ("message", 422, "'message'"),
        ("history", 422, "'history'"),
        ("raw-bytes", 400, None),
    ],
)
def test_lone_surrogates_in_a_chat_body_are_refused_before_anything_is_written(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, where: str, status: int, named: str | None
) -> None:
    conversation = new_id()
    if where == "message":
        body = _chat_body(user_id, conversation, message=r'"hi \ud800 there"')
    elif where == "history":
        body = _chat_body(user_id, conversation, history=r'[{"role": "user", "content": "x\udfff"}]')
    else:  # an encoded surrogate (CESU-style): not UTF-8, though Python's json.loads on bytes lets it through
        body = _chat_body(user_id, conversation, message='"hi there"').replace(b"hi there", b"hi \xed\xa0\x80")
    response = post_raw(client, "/api/chat/stream", body, auth_headers(user_id))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == ("VALIDATION_ERROR" if status == 422 else "MALFORMED_JSON")
    if named is not None:
        assert named in error["message"]
    assert conversations(client, auth_headers, user_id)["total"] == 0
    stored = client.get(
        f"/api/conversations/{conversation}", params={"user_id": user_id}, headers=auth_headers(user_id)
    )
    assert stored.status_code == 404


@pytest.mark.parametrize("title", [r'"\ud800"', r'"Kitchen \udc00"', r'"\ud83d"'])
def test_a_lone_surrogate_in_a_title_is_a_422_naming_it(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, title: str
) -> None:
    body = f'{{"user_id": "{user_id}", "title": {title}}}'.encode()
    response = post_raw(client, "/api/conversations", body, auth_headers(user_id))
    assert response.status_code == 422, response.text
    assert "'title'" in response.json()["error"]["message"]
    assert conversations(client, auth_headers, user_id)["total"] == 0


def test_a_lone_surrogate_in_a_field_name_is_refused(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    body = f'{{"user_id": "{user_id}", "title": "t", "\\ud800": 1}}'.encode()
    response = post_raw(client, "/api/conversations", body, auth_headers(user_id))
    assert response.status_code == 422, response.text
    assert conversations(client, auth_headers, user_id)["total"] == 0


def test_escaped_surrogate_pairs_are_ordinary_text(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    body = f'{{"user_id": "{user_id}", "title": "Paint \\ud83c\\udfa8"}}'.encode()
    response = post_raw(client, "/api/conversations", body, auth_headers(user_id))
    assert response.status_code == 201, response.text
    assert response.json()["title"] == "Paint \N{ARTIST PALETTE}"


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe{\x00}\x00", '{"title": "caf\u00e9"}'.encode("latin-1"), b'{"user_id": NaN}', b'{"a": Infinity}'],
    ids=["utf-16", "latin-1", "nan", "infinity"],
)
def test_bodies_that_are_not_utf8_json_are_400(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, body: bytes
) -> None:
    response = post_raw(client, "/api/conversations", body, auth_headers(user_id))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "MALFORMED_JSON"


# -- 2. deep nesting ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [40, 1_000, 100_000])
def test_deeply_nested_json_is_a_400(client: TestClient, auth_headers: AuthHeaders, user_id: str, depth: int) -> None:
    # The token is checked before the body is read (a client without one gets a 401 and its body is never parsed,
    # see test_without_a_valid_token_the_body_is_never_waited_for); with one, the nesting is refused, not a 500.
    body = b'{"history": ' + b"[" * depth + b"]" * depth + b"}"
    response = post_raw(client, "/api/chat/stream", body, auth_headers(user_id))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "MALFORMED_JSON"


def test_ordinary_nesting_is_accepted(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    history = [{"role": "user", "content": "hi", "metadata": {"tags": [["a"]]}}]
    body = {"message": "hello", "conversation_id": new_id(), "user_id": user_id, "history": history}
    assert client.post("/api/chat/stream", json=body, headers=auth_headers(user_id)).status_code == 200


# -- 3. query integers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["9223372036854775808", "1000001", "99999999999999999999999", "1_0", " 1", "٣"])
def test_offsets_outside_the_bound_or_oddly_spelled_are_422(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, value: str
) -> None:
    headers = auth_headers(user_id)
    listed = client.get("/api/conversations", params={"user_id": user_id, "offset": value}, headers=headers)
    assert listed.status_code == 422, listed.text
    assert "'offset'" in listed.json()["error"]["message"]
    conversation = client.post("/api/conversations", json={"user_id": user_id}, headers=headers).json()["id"]
    messages = client.get(
        f"/api/conversations/{conversation}", params={"user_id": user_id, "message_offset": value}, headers=headers
    )
    assert messages.status_code == 422, messages.text
    assert "'message_offset'" in messages.json()["error"]["message"]


def test_the_largest_offset_is_an_empty_page(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    params = {"user_id": user_id, "offset": "1000000"}
    body = client.get("/api/conversations", params=params, headers=auth_headers(user_id)).json()
    assert (body["conversations"], body["offset"], body["has_more"]) == ([], 1_000_000, False)


# -- 4. a client that leaves before sending the body it announced ---------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _request_count(url: str, route: str) -> dict[str, float]:
    """``{status: count}`` of POST requests to ``route`` in the service's own metrics."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("canvalo_http_requests_total{") and f'route="{route}"' in line and 'method="POST"' in line:
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = float(line.rsplit(" ", 1)[1])
    return counts


def test_a_client_that_lies_about_content_length_and_leaves_is_not_a_server_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, METRICS_TOKEN=METRICS_TOKEN)
    errors = _Records()
    with serve(create_app(settings)) as live:
        # uvicorn's loggers do not propagate to the root logger, so listen where it logs ASGI exceptions.
        watched = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "")]
        for logger in watched:
            logger.addHandler(errors)
        try:
            host, port = live.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    b"POST /api/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n" + b'{"user_id": '
                )
                time.sleep(0.2)
            deadline = time.monotonic() + 10
            while not (counts := _request_count(live.url, "/api/conversations")) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            for logger in watched:
                logger.removeHandler(errors)
    assert counts, "the abandoned request was never counted"
    assert "500" not in counts, counts
    assert [r.getMessage() for r in errors.records if r.levelno >= logging.ERROR] == []


# -- 6. ids that end in a newline -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["\n", "\r\n", " "])
def test_ids_with_trailing_characters_are_422_and_create_nothing(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, suffix: str
) -> None:
    headers = auth_headers(user_id)
    body = {"message": "hello", "conversation_id": new_id() + suffix, "user_id": user_id}
    assert client.post("/api/chat/stream", json=body, headers=headers).status_code == 422
    created = client.post("/api/conversations", json={"user_id": user_id + suffix}, headers=headers)
    assert created.status_code == 422
    listed = client.get("/api/conversations", params={"user_id": user_id + suffix}, headers=headers)
    assert listed.status_code == 422
    one = client.get(f"/api/conversations/{new_id()}%0A", params={"user_id": user_id}, headers=headers)
    assert one.status_code == 422
    assert conversations(client, auth_headers, user_id)["total"] == 0


@pytest.mark.anyio
@pytest.mark.parametrize(("supplied", "kept"), [(b"req-1", True), (b"req-1\n", False), (b"x" * 129, False)])
async def test_a_request_id_is_kept_only_when_it_is_entirely_sane(supplied: bytes, kept: bool) -> None:
    sent: list[dict[str, Any]] = []

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-request-id", supplied)]}
    await RequestContext(endpoint)(scope, receive, send)
    echoed = dict(sent[0]["headers"])[b"x-request-id"]
    assert (echoed == supplied) is kept
    assert b"\n" not in echoed


# -- 8. the ignored history --------------------------------------------------------------------------------------


@pytest.mark.parametrize("history", [[{"role": "user", "content": "m"}] * 101, [None] * 2_000, None, []])
def test_history_of_any_length_or_null_is_accepted_and_ignored(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, history: Any
) -> None:
    body = {"message": "hello", "conversation_id": new_id(), "user_id": user_id, "history": history}
    response = client.post("/api/chat/stream", json=body, headers=auth_headers(user_id))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("history", ["[]", {"role": "user"}, 3, True])
def test_history_that_is_neither_a_list_nor_null_is_422(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, history: Any
) -> None:
    body = {"message": "hello", "conversation_id": new_id(), "user_id": user_id, "history": history}
    response = client.post("/api/chat/stream", json=body, headers=auth_headers(user_id))
    assert response.status_code == 422, response.text
    assert "'history'" in response.json()["error"]["message"]


# -- 10. what reaches the logs ------------------------------------------------------------------------------------


@pytest.fixture
def app_logging() -> Iterator[None]:
    """The app's own logging setup, undone afterwards so other suites see the loggers as they were."""
    names = ("httpx", "httpcore", "uvicorn.access")
    levels = {name: logging.getLogger(name).level for name in names}
    app_module.configure_logging("INFO")
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _get(url: str, headers: dict[str, str]) -> int:
    # urllib logs nothing itself, so every captured record comes from the service.
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return int(response.status)


def test_query_string_values_never_reach_the_log(
    settings: Settings, auth_headers: AuthHeaders, user_id: str, app_logging: None, caplog: pytest.LogCaptureFixture
) -> None:
    with serve(create_app(settings)) as live, caplog.at_level(logging.INFO):
        headers = auth_headers(user_id)
        created = httpx.post(f"{live.url}/api/conversations", json={"user_id": user_id}, headers=headers)
        conversation = created.json()["id"]
        caplog.clear()
        assert _get(f"{live.url}/api/conversations?user_id={user_id}&limit=5", headers) == 200
        assert _get(f"{live.url}/api/conversations/{conversation}?user_id={user_id}", headers) == 200
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "GET /api/conversations 200" in logged  # the service's own request line is there, at INFO
    assert user_id not in logged and conversation not in logged, logged


def test_uvicorn_app_app_logs_no_request_line_with_its_query_string(
    service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        **service_env,
        "SQLITE_PATH": str(tmp_path / "canvalo.db"),
        "LOG_LEVEL": "INFO",
        "LOCAL_TOKEN_DELAY": "0",
    }
    command = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the service did not start"
                time.sleep(0.1)
        assert _get(f"{url}/api/conversations?user_id={user_id}&offset=0", auth_headers(user_id)) == 200
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "GET /api/conversations 200" in output, output  # logging is on, at INFO
    assert user_id not in output, output


# -- 12. an unusable SQLITE_PATH ----------------------------------------------------------------------------------


def _start(sqlite_path: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "SQLITE_PATH": sqlite_path, "API_PORT": str(free_port())}
    return subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("under", ["file", "proc", "directory"])
def test_an_unusable_sqlite_path_is_one_line_and_exit_status_2(tmp_path: Path, under: str) -> None:
    (tmp_path / "file.txt").write_text("not a directory")
    (tmp_path / "db.sqlite").mkdir()
    path = {
        "file": str(tmp_path / "file.txt" / "db.sqlite"),
        "proc": "/proc/x/y.db",
        "directory": str(tmp_path / "db.sqlite"),
    }[under]
    finished = _start(path)
    assert finished.returncode == 2, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    assert "SQLITE_PATH" in lines[0] and path in lines[0]
    assert not (tmp_path / "file.txt").is_dir()


# -- slow clients: the token before the body, and a deadline on the body -------------------------------------------


def _send_head(url: str, path: str, headers: dict[str, str], content_length: int, first_bytes: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
             f"Content-Length: {content_length}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + first_bytes)
    return sock


def _status_within(sock: socket.socket, seconds: float) -> int:
    sock.settimeout(seconds)
    head = sock.recv(65536).decode("latin-1")
    return int(head.split(" ", 2)[1])


@pytest.mark.parametrize("authorization", [None, "Bearer not.a.token", "Basic dXNlcjpwYXNz"])
def test_without_a_valid_token_the_body_is_never_waited_for(tmp_path: Path, authorization: str | None) -> None:
    settings = make_settings(tmp_path, SUPABASE_JWT_SECRET="t" * 40)
    headers = {"Authorization": authorization} if authorization else {}
    with serve(create_app(settings)) as live:
        for path in ("/api/chat/stream", "/api/conversations"):
            # 200 KB announced, nothing sent: the answer must not wait for it.
            with _send_head(live.url, path, headers, 200_000) as sock:
                assert _status_within(sock, 2) == 401


def test_a_body_that_does_not_arrive_in_time_is_a_408(tmp_path: Path) -> None:
    from tests.tokens import bearer, mint

    secret = "t" * 40
    settings = make_settings(tmp_path, SUPABASE_JWT_SECRET=secret, BODY_READ_TIMEOUT="0.5")
    user = new_id()
    with serve(create_app(settings)) as live:
        started = time.monotonic()
        with _send_head(live.url, "/api/conversations", bearer(mint(user, secret)), 5_000, b'{"user_id": "') as sock:
            assert _status_within(sock, 5) == 408
        assert time.monotonic() - started < 3
        # The same request, sent whole, goes through.
        whole = httpx.post(f"{live.url}/api/conversations", json={"user_id": user}, headers=bearer(mint(user, secret)))
        assert whole.status_code == 201


# -- the envelope where Starlette would answer in plain text --------------------------------------------------------


def test_a_refused_cors_preflight_is_in_the_envelope(client: TestClient) -> None:
    refused = client.options("/api/conversations", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "X-Not-Allowed",
    })
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "CORS_PREFLIGHT_REFUSED"
    assert "origin" in refused.json()["error"]["message"] and "headers" in refused.json()["error"]["message"]
    allowed = client.options("/api/conversations", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Content-Type, Authorization, Last-Event-ID",
    })
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://localhost:5173"


def test_every_method_a_route_serves_passes_a_browsers_preflight(client: TestClient) -> None:
    """Walks the routes table, so a route added with a new method cannot be unreachable from the browser."""
    served = {(route.path, method) for route in client.app.routes  # type: ignore[attr-defined]
              for method in getattr(route, "methods", None) or () if method != "HEAD"}
    assert ("/api/conversations/{conversation_id}/active-leaf", "PUT") in served
    for path, method in sorted(served):
        preflight = client.options(path, headers={
            "Origin": "http://localhost:5173", "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        })
        assert preflight.status_code == 200, (path, method, preflight.text)
        assert method in preflight.headers["access-control-allow-methods"]


# Headers a browser reads without being told (CORS-safelisted), or that speak to the browser or a proxy, not to scripts.
NOT_FOR_SCRIPTS = {"cache-control", "content-language", "content-length", "content-type", "expires", "last-modified",
                   "pragma", "vary", "x-content-type-options", "x-frame-options", "referrer-policy",
                   "content-security-policy", "x-accel-buffering", "date", "server", "connection"}


def assert_scripts_may_read_every_header(response: httpx.Response) -> None:
    exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
    sent = {name.lower() for name in response.headers} - NOT_FOR_SCRIPTS
    sent = {name for name in sent if not name.startswith("access-control-")}
    assert sent <= exposed, sent - exposed


def test_a_browsers_script_may_read_every_header_the_service_sends(tmp_path: Path, auth_headers: AuthHeaders) -> None:
    """A stream (X-Run-ID), a rate-limit refusal (RateLimit-*, Retry-After) and a budget refusal (X-Budget-*), each from
    an allowed origin: whatever the service sends for the client to read, the browser lets the page read."""
    origin = {"Origin": "http://localhost:5173"}
    user = new_id()
    limited = make_settings(tmp_path, RATE_LIMIT_CHAT_PER_MINUTE="1", BUDGET_DAY_TOKENS="100000")
    with TestClient(create_app(limited)) as client:
        body = {"message": "hello", "user_id": user, "conversation_id": new_id()}
        stream = client.post("/api/chat/stream", json=body, headers={**auth_headers(user), **origin})
        assert stream.status_code == 200 and "x-run-id" in stream.headers
        assert_scripts_may_read_every_header(stream)
        refused = client.post("/api/chat/stream", json={**body, "conversation_id": new_id()},
                              headers={**auth_headers(user), **origin})
        assert refused.status_code == 429 and "ratelimit-limit" in refused.headers
        assert_scripts_may_read_every_header(refused)
    spent = make_settings(tmp_path / "spent", BUDGET_DAY_TOKENS="1")
    with TestClient(create_app(spent)) as client:
        over = client.post("/api/chat/stream", json={"message": "hello", "user_id": user, "conversation_id": new_id()},
                           headers={**auth_headers(user), **origin})
        assert over.status_code == 429 and over.json()["error"]["code"] == "BUDGET_EXCEEDED"
        assert "x-budget-used" in over.headers
        assert_scripts_may_read_every_header(over)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/api/conversations", {"GET", "POST"}),
        ("POST", "/api/chat/runs/00000000-0000-0000-0000-000000000000/events", {"GET"}),
        ("GET", "/api/chat/stream", {"POST"}),
    ],
)
def test_a_wrong_method_lists_every_method_of_the_path(client: TestClient, method: str, path: str, allowed: set[str]) -> None:
    response = client.request(method, path)
    assert response.status_code == 405 and response.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    listed = {m.strip() for m in response.headers["allow"].split(",")}
    assert allowed <= listed and method not in listed


def test_a_plain_options_is_answered_with_the_paths_methods_on_every_path(tmp_path: Path) -> None:
    """Not a CORS preflight (no Access-Control-Request-Method): a 204 whose Allow is the one a wrong method gets, so
    OPTIONS is never both listed and refused. Preflights are the test above's."""
    app = create_app(make_settings(tmp_path))
    paths = sorted({route.path.format(**{name: new_id() for name in route.param_convertors})
                    for route in app.routes if isinstance(route, Route)})
    with serve(app) as live, httpx.Client(base_url=live.url) as client:
        for path in paths:
            wrong = client.request("TRACE", path)  # a method no path has
            assert wrong.status_code == 405, path
            for headers in ({}, {"Origin": "http://localhost:5173"}):
                answered = client.options(path, headers=headers)
                assert answered.status_code == 204 and answered.content == b"", (path, answered.text)
                assert answered.headers["allow"] == wrong.headers["allow"]
                assert "OPTIONS" in answered.headers["allow"].split(", ")
            assert answered.headers["access-control-allow-origin"] == "http://localhost:5173"
