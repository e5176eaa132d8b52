"""Nothing secret and no user content in logs or error answers: a class test over real service processes.

Each test starts the service as a process (uvicorn on 127.0.0.1, LOG_LEVEL=DEBUG, its stdout and stderr kept), puts
one marker, ``Qx7Sntl``, into every place user content or a secret can enter (message text, titles, search queries,
record values the assistant reads and writes, the model's tool arguments and error messages, query strings, headers,
bad bodies, the token and its claims, every secret and key it is configured with), drives many flows, failures
included, then shuts it down and checks that the marker (and each secret whole) is in no log line, no error answer
(body or header), no SSE error chunk, and neither /metrics nor /health. Successful answers do carry the user's own
content back to the user; those are not checked.

Two processes: the embedded default (SQLite, the local responder) and production's path (STORE=supabase through the
fake PostgREST over a real PostgreSQL, LLM_PROVIDER=bedrock against the fake Bedrock).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from botocore.credentials import Credentials

from services.agents.assistant import HANDOFF_TOOL
from tests.fake_bedrock import (FakeBedrock, Pause, Reply, error, exception, message_start, message_stop, metadata,
                                text_delta, text_reply, tool_use)
from tests.conftest import DATABASE
from tests.pg import register_run_secret
from tests.support import chunks, free_port, new_id, serve, wait_until_healthy
from tests.tokens import b64url, claims_for, encode

ROOT = Path(__file__).resolve().parent.parent
MARK = "Qx7Sntl"  # every planted value holds it; searched for case-insensitively
JWT_SECRET = f"{MARK}-jwt-secret-0123456789abcdefghijklmnop"
RUN_SECRET = f"{MARK}-run-secret-0123456789abcdefghijklmnop"
PUBLISHABLE_KEY = f"sb_publishable_{MARK}_key"
METRICS_TOKEN = f"{MARK}-metrics-token-0123456789abcdef"
AWS = Credentials(f"AKID{MARK}ACCESS", f"{MARK}AwsSecretKey0123456789", f"{MARK}AwsSessionToken0123456789")


@dataclass
class Probe:
    """A client of the service under test that keeps every answer the rule covers: errors (status >= 400, body and
    headers), SSE error chunks, and /health, /metrics and / whatever their status."""

    url: str
    exposed: list[str] = field(default_factory=list)
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        self.keep(response, path)
        return response

    def keep(self, response: httpx.Response, path: str) -> None:
        shown = path.split("?")[0] in ("/", "/health", "/metrics")
        if response.status_code >= 400 or shown:
            # The path is the test's own (it holds the marker on purpose); the answer is what is checked.
            self.exposed.append(f"{response.status_code} {json.dumps(dict(response.headers))} {response.text}")
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            for item in chunks(response.text):
                if item.get("type") == "error":
                    self.exposed.append(json.dumps(item))

    def chat(self, headers: dict[str, str], **body: Any) -> list[dict[str, Any]]:
        response = self.send("POST", "/api/chat/stream", json=body, headers=headers)
        return chunks(response.text) if response.status_code == 200 else []


def tokens_for(user_id: str, issuer: str | None) -> dict[str, str]:
    """The user's bearer header; the token carries the marker in a claim of its own, as a real one carries an email."""
    token = encode(claims_for(user_id, issuer=issuer, email=f"{MARK}.user@example.com"), JWT_SECRET)
    return {"Authorization": f"Bearer {token}"}


def bad_tokens(user_id: str, issuer: str | None) -> list[str]:
    forged = encode(claims_for(user_id, issuer=issuer, email=f"{MARK}@x.example"), f"{MARK}-not-the-secret-0123456")
    expired = encode(claims_for(user_id, issuer=issuer, lifetime=-3600, email=f"{MARK}@x.example"), JWT_SECRET)
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": MARK}).encode())
    return [forged, expired, f"{MARK}.{MARK}.{MARK}", f"{header}.{b64url(MARK.encode())}.{MARK}",
            encode(claims_for(MARK, issuer=issuer), JWT_SECRET), f"{MARK} with spaces"]


def common_flows(probe: Probe, user: str, other: str, headers: dict[str, str], issuer: str | None) -> None:
    """Validation errors, bad tokens, bad bodies, headers and query strings: the same on every store and model."""
    send = probe.send
    conversation = new_id()
    send("GET", "/")
    send("GET", "/health")
    # Titles: a marked one, a rename, one too long, one blank.
    made = send("POST", "/api/conversations", json={"user_id": user, "title": f"{MARK} title"}, headers=headers)
    assert made.status_code == 201, made.text
    made_id = made.json()["id"]
    send("PATCH", f"/api/conversations/{made_id}", json={"user_id": user, "title": f"{MARK} renamed"}, headers=headers)
    send("PATCH", f"/api/conversations/{made_id}", json={"user_id": user, "title": MARK * 40}, headers=headers)
    send("POST", "/api/conversations", json={"user_id": user, "title": MARK * 40}, headers=headers)
    # Search and paging: a marked query, one too long, marked cursors and numbers.
    for params in ({"q": f"{MARK} invoices"}, {"q": MARK * 40}, {"before": MARK}, {"after": b64url(MARK.encode())},
                   {"limit": MARK}, {"offset": f"1{MARK}"}, {"before": b64url(json.dumps(["c", MARK, MARK]).encode())}):
        send("GET", "/api/conversations", params={"user_id": user, **params}, headers=headers)
    send("GET", f"/api/conversations/{made_id}", params={"user_id": user, "message_before": MARK,
                                                          "leaf": MARK, "message_order": MARK}, headers=headers)
    # Ids, user ids and unknown parameters that are the marker.
    send("GET", f"/api/conversations/{MARK}", params={"user_id": user}, headers=headers)
    send("GET", "/api/conversations", params={"user_id": MARK}, headers=headers)
    send("GET", "/api/conversations", params={"user_id": other}, headers=headers)  # someone else's id: 403
    send("GET", "/api/usage", params={"user_id": user, "period": MARK}, headers=headers)
    send("GET", f"/api/chat/runs/{new_id()}/events", params={"user_id": user, "after": MARK}, headers=headers)
    send("GET", f"/api/chat/runs/{new_id()}/events", params={"user_id": user},
         headers={**headers, "Last-Event-ID": MARK})
    send("POST", f"/api/actions/{MARK}/confirm", json={"user_id": user}, headers=headers)
    send("GET", f"/api/{MARK}/x", params={MARK: MARK}, headers=headers)
    send("DELETE", "/health", headers=headers)
    # Bad bodies: not JSON, not UTF-8, NUL, lone surrogate, deep, marked types, a chat body with marked fields.
    for content in (f'{{"user_id": "{user}", "title": "{MARK}', f"{MARK}".encode("utf-16"),
                    b'{"user_id": "' + user.encode() + b'", "title": "' + MARK.encode() + b'\xff\xfe"}',
                    json.dumps({"user_id": user, "title": f"{MARK}\u0000"}),
                    '{"user_id": "%s", "title": "%s\\ud800"}' % (user, MARK),
                    "[" * 100 + f'"{MARK}"' + "]" * 100, json.dumps({"user_id": user, "title": [MARK]}),
                    '{"user_id": "%s", "title": "%s", "n": NaN}' % (user, MARK)):
        send("POST", "/api/conversations", content=content,
             headers={**headers, "content-type": "application/json"})
    send("POST", "/api/conversations", content=f"user_id={MARK}", headers={**headers, "content-type": f"text/{MARK}"})
    send("POST", "/api/chat/stream", json={"message": MARK, "conversation_id": MARK, "user_id": user}, headers=headers)
    send("POST", "/api/chat/stream", headers=headers,
         json={"message": "\u0000" + MARK, "conversation_id": conversation, "user_id": user})
    send("POST", "/api/chat/stream", json={"message": MARK * 2000, "conversation_id": conversation, "user_id": user},
         headers=headers)
    send("POST", "/api/chat/stream", json={"message": f"{MARK}", "conversation_id": conversation, "user_id": user,
                                           "parent_message_id": new_id(), "edit_message_id": new_id()}, headers=headers)
    # Headers: bad tokens (marked claims, marked signature, marked garbage), a marked request id, origin and length.
    for token in bad_tokens(user, issuer):
        send("GET", "/api/conversations", params={"user_id": user}, headers={"Authorization": f"Bearer {token}"})
    send("GET", "/api/conversations", params={"user_id": user}, headers={"Authorization": f"Basic {MARK}"})
    send("GET", "/api/conversations", params={"user_id": user},
         headers={**headers, "X-Request-ID": f"{MARK} not a sane id {MARK}", "X-Forwarded-For": MARK})
    send("OPTIONS", "/api/conversations", headers={"Origin": f"https://{MARK}.example",
                                                   "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": f"x-{MARK}"})
    send("GET", "/api/conversations", params={"user_id": user},
         headers={**headers, "Origin": f"https://{MARK}.example"})
    send("GET", "/metrics", headers={"Authorization": f"Bearer {MARK}"})
    send("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})


def rate_limit_flows(probe: Probe, user: str, headers: dict[str, str], limit: int) -> None:
    """Past the API limit with marked requests: 429s, then the same marked requests again."""
    for _ in range(limit + 3):
        probe.send("GET", "/api/conversations", params={"user_id": user, "q": MARK}, headers=headers)
    assert any(text.startswith("429 ") for text in probe.exposed)


def assert_nothing_leaked(probe: Probe, log: str, secrets: list[str]) -> None:
    needles = [MARK.lower(), *(s.lower() for s in secrets)]
    found: dict[str, None] = {}  # each leaking line once, in order
    for where, text in [("log", log), *(("answer", t) for t in probe.exposed)]:
        for line in text.lower().splitlines():
            if any(n in line for n in needles):
                found[f"{where}: {re.sub(r'^[0-9-]+ [0-9:,]+ ', '', line)[:400]}"] = None  # once, whatever the time
    assert not found, "\n".join(list(found)[:40])
    assert "Traceback" not in log, log  # every failure driven here is an expected one, logged by its code


@dataclass
class Service:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log_path.read_text(errors="replace")


def start_service(tmp_path: Path, env: dict[str, str]) -> Service:
    port = free_port()
    log_path = tmp_path / "service.log"
    full = {
        "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
        "API_HOST": "127.0.0.1", "API_PORT": str(port), "LOG_LEVEL": "DEBUG", "LOCAL_TOKEN_DELAY": "0",
        "SQLITE_PATH": str(tmp_path / "canvalo.db"), "SUPABASE_JWT_SECRET": JWT_SECRET, "METRICS_TOKEN": METRICS_TOKEN,
        "AWS_ACCESS_KEY_ID": AWS.access_key, "AWS_SECRET_ACCESS_KEY": AWS.secret_key,
        "AWS_SESSION_TOKEN": AWS.token, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "SHUTDOWN_GRACE_SECONDS": "1", "RATE_LIMIT_CHAT_PER_MINUTE": "1000",
        **env,
    }
    command = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port),
               "--http", "web.tcp:NoDelayH11Protocol", "--log-level", "debug", "--timeout-graceful-shutdown", "1"]
    with log_path.open("wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=full, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
    except AssertionError:
        process.kill()
        raise AssertionError(log_path.read_text())
    return Service(url, process, log_path)


def shutdown_mid_stream(probe: Probe, service: Service, body: dict[str, Any], headers: dict[str, str]) -> None:
    """SIGTERM while a marked answer streams: the stream's last chunk is SERVER_SHUTTING_DOWN, and nothing leaks."""
    received = b""
    with probe.client.stream("POST", "/api/chat/stream", json=body, headers=headers) as response:
        pieces = response.iter_bytes()
        received += next(pieces)
        service.process.send_signal(signal.SIGTERM)
        received += b"".join(pieces)
    items = chunks(received.decode())
    assert items[-1]["type"] == "error" and items[-1]["code"] == "SERVER_SHUTTING_DOWN", items[-1]
    probe.exposed.extend(json.dumps(i) for i in items if i["type"] == "error")


@pytest.mark.parametrize(("message", "shown"), [
    ('invalid input syntax for type uuid: "Qx7Sntl-1"', 'invalid input syntax for type uuid: "<9 chars>"'),
    ('value "99999999999" is out of range for type integer', 'value "<11 chars>" is out of range for type integer'),
    ('"failed to parse filter (eq.Qx7Sntl)" (line 1, column 4)', '"<35 chars>" (<16 chars>)'),
    ('malformed array literal: "{Qx7Sntl', 'malformed array literal: "<8 chars>'),  # a quote left open
    ("permission denied for table invoices", "permission denied for table invoices"),
])
def test_postgrest_messages_are_logged_without_what_they_quote(message: str, shown: str) -> None:
    from services.store.postgrest.client import redacted

    assert redacted(message) == shown


def test_bedrock_error_types_not_on_aws_list_are_not_named() -> None:
    from services.model.bedrock_errors import bedrock_error

    assert "ValidationException" in bedrock_error("ValidationException", 400, f"Value '{MARK}'").message
    unknown = bedrock_error(f"{MARK}Exception:http://internal.amazon.com/coral/", 500, MARK)
    assert (unknown.code, MARK in unknown.message) == ("MODEL_INTERNAL_ERROR", False)


# -- the embedded default -------------------------------------------------------------------------------------------


def test_the_embedded_default_leaks_no_secret_and_no_content(tmp_path: Path) -> None:
    limit = 150
    # Slow enough tokens that SIGTERM comes mid-answer (the shutdown grace is 1 s).
    service = start_service(tmp_path, {"LOCAL_TOKEN_DELAY": "0.03", "RATE_LIMIT_API_PER_MINUTE": str(limit)})
    secrets = [JWT_SECRET, METRICS_TOKEN]
    probe = Probe(service.url)
    try:
        user, other, limited = new_id(), new_id(), new_id()
        headers = tokens_for(user, None)
        common_flows(probe, user, other, headers, None)
        # Records holding the marker, read and changed by the assistant.
        assert probe.send("POST", "/api/dev/sample-data", json={"user_id": user}, headers=headers).status_code == 200
        with sqlite3.connect(tmp_path / "canvalo.db") as db:
            db.execute("update invoices set client_name = ?, notes = ? where user_id = ?",
                       (f"{MARK} Client", f"{MARK} notes", user))
            db.execute("update invoices set invoice_number = ? where user_id = ? and invoice_number = 'INV-1043'",
                       (f"INV-{MARK}", user))
        conversation = new_id()
        for message in (f"What invoices do I have? {MARK}", f"Any {MARK} invoices?", f"Mark invoice INV-{MARK} as paid",
                        f"Delete the contact {MARK}", "hello " + MARK):
            items = probe.chat(headers, message=message, conversation_id=conversation, user_id=user)
            for item in items:
                action = (item.get("tool_call") or {}).get("action_id")
                if action:
                    probe.send("GET", f"/api/actions/{action}", params={"user_id": user}, headers=headers)
                    probe.send("POST", f"/api/actions/{action}/confirm", json={"user_id": user}, headers=headers)
                    probe.send("POST", f"/api/actions/{action}/confirm", json={"user_id": user}, headers=headers)
        probe.send("GET", f"/api/conversations/{conversation}", params={"user_id": user}, headers=headers)
        probe.send("GET", "/api/usage", params={"user_id": user}, headers=headers)
        assert not [t for t in probe.exposed if t.startswith("429")]  # every turn above was admitted
        rate_limit_flows(probe, limited, tokens_for(limited, None), limit)
        late = new_id()
        probe.send("POST", "/api/dev/sample-data", json={"user_id": late}, headers=tokens_for(late, None))
        shutdown_mid_stream(probe, service, {"message": f"What invoices do I have? {MARK}", "conversation_id": new_id(),
                                             "user_id": late}, tokens_for(late, None))
    finally:
        probe.client.close()
        log = service.stop()
    assert_nothing_leaked(probe, log, secrets)


# -- production's path: Supabase (PostgREST over PostgreSQL) and Bedrock --------------------------------------------

MODEL, FALLBACK = "amazon.nova-lite-v1:0", "amazon.nova-micro-v1:0"


def tool_turn(tool_id: str, name: str, arguments: dict[str, Any]) -> Reply:
    return Reply.stream([message_start(), *tool_use(0, tool_id, name, [json.dumps(arguments)]),
                         message_stop("tool_use"), metadata(30, 5)])


def postgres_says(cluster: Any, statement: str, value: str) -> dict[str, Any]:
    """PostgreSQL's own error for ``statement`` with ``value``, as PostgREST relays it (code, message, details)."""
    with cluster.connect(DATABASE) as db:
        try:
            db.execute(statement, (value,))
        except psycopg.Error as exc:
            return {"code": exc.sqlstate, "message": exc.diag.message_primary, "details": exc.diag.message_detail,
                    "hint": None}
    raise AssertionError(f"{statement} succeeded")


@pytest.fixture
def supabase(pg_cluster: Any) -> Iterator[tuple[Any, str]]:
    """A PostgREST stand-in of its own, with the marked JWT secret and publishable key, and the marked run secret
    registered with the database."""
    from tests.fake_postgrest import FakePostgrest

    with pg_cluster.connect(DATABASE) as db:
        register_run_secret(db, RUN_SECRET)
    fake = FakePostgrest(pg_cluster, DATABASE, jwt_secret=JWT_SECRET, publishable_key=PUBLISHABLE_KEY)
    with serve(fake.app()) as live:
        yield fake, live.url


def test_production_leaks_no_secret_and_no_content(tmp_path: Path, pg_cluster: Any, supabase: tuple[Any, str],
                                                   register_user: Any) -> None:
    fake_rest, rest_url = supabase
    bedrock = FakeBedrock(credentials=[AWS])
    limit = 150
    with serve(bedrock) as bedrock_live:
        service = start_service(tmp_path, {
            "STORE": "supabase", "SUPABASE_URL": rest_url, "SUPABASE_PUBLISHABLE_KEY": PUBLISHABLE_KEY,
            "SUPABASE_RUN_SECRET": RUN_SECRET, "LLM_PROVIDER": "bedrock", "BEDROCK_ENDPOINT_URL": bedrock_live.url,
            "BEDROCK_MODEL_ID": MODEL, "BEDROCK_FALLBACK_MODEL_IDS": FALLBACK, "RETRY_BASE_DELAY": "0.01",
            "RETRY_MAX_DELAY": "0.02", "BEDROCK_FIRST_EVENT_TIMEOUT": "2", "BEDROCK_IDLE_TIMEOUT": "1",
            "RATE_LIMIT_API_PER_MINUTE": str(limit), "BUDGET_DAY_TOKENS": "50000",
        })
        issuer = f"{rest_url}/auth/v1"
        quoted = [postgres_says(pg_cluster, "select %s::uuid", f"{MARK}-not-a-uuid"),
                  postgres_says(pg_cluster, "select %s::date", f"{MARK} 2026"),
                  postgres_says(pg_cluster, "select %s::timestamptz", "2026-02-30 10:00 99999999991"),
                  postgres_says(pg_cluster, "select %s::int", "99999999992")]
        secrets = [JWT_SECRET, RUN_SECRET, PUBLISHABLE_KEY, METRICS_TOKEN, AWS.access_key, AWS.secret_key, AWS.token,
                   "99999999991", "99999999992"]
        # PostgreSQL quotes the value in `message` itself, not only in `details`.
        assert all(MARK in q["message"] or "9999999999" in q["message"] for q in quoted), quoted
        probe = Probe(service.url)
        try:
            user, other, limited, spender = new_id(), new_id(), new_id(), new_id()
            for someone in (user, other, limited, spender):
                register_user(someone)
            headers = tokens_for(user, issuer)
            common_flows(probe, user, other, headers, issuer)
            chat = lambda **body: probe.chat(headers, user_id=user, conversation_id=new_id(),  # noqa: E731
                                             **{"message": f"What invoices do I have? {MARK}", **body})

            # Records holding the marker: loaded, then changed through the Data API as the app itself would.
            assert probe.send("POST", "/api/dev/sample-data", json={"user_id": user},
                              headers=headers).status_code == 200
            httpx.patch(f"{rest_url}/rest/v1/invoices", params={"user_id": f"eq.{user}"},
                        json={"client_name": f"{MARK} Client", "notes": f"{MARK} notes"},
                        headers={"apikey": PUBLISHABLE_KEY, "Content-Profile": "api", **headers}).raise_for_status()
            # Tool calls holding the marker: arguments, filters, unknown fields, a change to confirm, the answer.
            record = {"invoice_number": f"INV-{MARK}", "client_name": MARK, "due_date": "2026-12-31",
                      "total_amount": 10, "notes": MARK}
            bedrock.replies = [
                tool_turn("t0", HANDOFF_TOOL, {"agent": "invoices", "reason": MARK}),
                tool_turn("t1", "create_invoice", record),
                tool_turn("t2", "list_invoices", {"status": MARK, "client_name": MARK}),
                tool_turn("t3", "list_invoices", {f"{MARK}_field": MARK, "limit": MARK}),
                tool_turn("t4", f"{MARK}_tool", {"x": MARK}),
                tool_turn("t5", "update_invoice", {"id": new_id(), "changes": {"notes": MARK}}),
                Reply.stream(text_reply(f"Done {MARK}.")),
            ]
            chat()
            listed = probe.send("GET", "/api/conversations", params={"user_id": user}, headers=headers).json()
            assert listed["conversations"], listed
            # A change prepared on a real record, confirmed twice.
            rows = httpx.get(f"{rest_url}/rest/v1/invoices", params={"user_id": f"eq.{user}", "select": "id"},
                             headers={"apikey": PUBLISHABLE_KEY, **headers}).json()
            bedrock.replies = [tool_turn("u0", HANDOFF_TOOL, {"agent": "invoices"}),
                               tool_turn("u1", "update_invoice", {"id": rows[0]["id"], "changes": {"notes": MARK}}),
                               Reply.stream(text_reply(f"Confirm it {MARK}."))]
            bedrock.requests.clear()
            for item in chat():
                action = (item.get("tool_call") or {}).get("action_id")
                if action:
                    probe.send("GET", f"/api/actions/{action}", params={"user_id": user}, headers=headers)
                    for _ in range(2):
                        probe.send("POST", f"/api/actions/{action}/confirm", json={"user_id": user}, headers=headers)

            # Bedrock failures whose messages quote the input, before and during the answer.
            bedrock.requests.clear()
            failures = [
                [Reply.http_error(400, "ValidationException", f"1 validation error detected: Value '{MARK}' at "
                                  "'messages.1.member.content.1.member.text' failed to satisfy constraint")],
                [Reply.http_error(400, "ValidationException", f"Input is too long for requested model: {MARK}")],
                [Reply.http_error(403, "AccessDeniedException", f"User: arn:aws:iam::1:user/{MARK} is not authorized")],
                [Reply.http_error(429, "ThrottlingException", f"Too many tokens {MARK}")],
                [Reply.http_error(500, f"{MARK}Exception", f"{MARK}")],
                [Reply.http_error(503, "ServiceUnavailableException", MARK)],
                [Reply.stream([message_start(), text_delta(f"Partial {MARK} ")],
                              exception("modelStreamErrorException", f"Model failed on '{MARK}'"))],
                [Reply.stream([message_start(), text_delta(f"Partial {MARK} ")],
                              exception("validationException", f"Value '{MARK}' is invalid"))],
                [Reply.stream(exception("throttlingException", f"Slow down {MARK}"))],
                [Reply.stream([message_start(), text_delta(f"Partial {MARK} ")], error(f"{MARK}Code", f"{MARK} msg"))],
                [Reply.stream([message_start(), text_delta(f"Partial {MARK} ")], b"\x00\x00\x00\x20" + MARK.encode())],
                [Reply.stream([message_start(), text_delta(f"Partial {MARK} ")], Pause(1.5))],
                [Reply.stream(Pause(2.5))],
            ]
            for replies in failures:
                bedrock.replies = replies
                items = chat()
                assert items and items[-1]["type"] == "error", items[-1:]
            # Budgets: a turn the model reports as huge, then the next refused.
            bedrock.replies = [Reply.stream(text_reply(f"Big {MARK}", usage=(60000, 10)))]
            spent = tokens_for(spender, issuer)
            probe.chat(spent, user_id=spender, conversation_id=new_id(), message=f"Big {MARK}")
            refused = probe.send("POST", "/api/chat/stream", headers=spent, json={
                "message": f"Again {MARK}", "conversation_id": new_id(), "user_id": spender})
            assert refused.status_code == 429 and "BUDGET_EXCEEDED" in refused.text, refused.text
            # PostgREST refusing with PostgreSQL's own messages, which quote the values (and a gateway page).
            bedrock.replies = [Reply.stream(text_reply(f"Fine {MARK}."))]
            conversation = probe.send("POST", "/api/conversations", json={"user_id": user, "title": MARK},
                                      headers=headers).json()["id"]
            for body in [*quoted, f"<html>Bad gateway for /rest/v1/x?title=eq.{MARK}</html>"]:
                fake_rest.fail_next(400 if isinstance(body, dict) else 502, method="GET", path="agent_conversations",
                                    body=body)
                probe.send("GET", f"/api/conversations/{conversation}", params={"user_id": user}, headers=headers)
            fake_rest.fail_next(400, path="rpc/agent_conversations_search", body=quoted[0])
            probe.send("GET", "/api/conversations", params={"user_id": user, "q": MARK}, headers=headers)
            fake_rest.fail_next(400, path="rpc/agent_run_begin", body=quoted[1])
            chat()
            fake_rest.fail_next(400, path="invoices", method="POST", body=quoted[3])
            bedrock.replies = [tool_turn("v0", HANDOFF_TOOL, {"agent": "invoices"}),
                               tool_turn("v1", "create_invoice", record), Reply.stream(text_reply(f"Ok {MARK}."))]
            chat()
            # The database no longer knows the run secret: 502 STORE_MISCONFIGURED, the secret never shown.
            with pg_cluster.connect(DATABASE) as db:
                db.execute("delete from canvalo_private.run_secrets where hash = sha256(convert_to(%s, 'UTF8'))",
                           (RUN_SECRET,))
            try:
                chat()
            finally:
                with pg_cluster.connect(DATABASE) as db:
                    register_run_secret(db, RUN_SECRET)
            rate_limit_flows(probe, limited, tokens_for(limited, issuer), limit)
            probe.send("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
            slow = [step for _ in range(10) for step in (text_delta(f"Slow {MARK} "), Pause(0.5))]
            bedrock.replies = [Reply.stream(message_start(), *slow, message_stop(), metadata())]
            late = new_id()
            register_user(late)
            shutdown_mid_stream(probe, service, {"message": f"hello {MARK}", "conversation_id": new_id(),
                                                 "user_id": late}, tokens_for(late, issuer))
        finally:
            probe.client.close()
            log = service.stop()
    assert_nothing_leaked(probe, log, secrets)
