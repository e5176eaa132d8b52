"""``GET /openapi.json`` describes the API as the code implements it, and stays so (``web/openapi.py``).

- **Drift.** The document's operations are exactly ``app.routes``. Every query parameter and header a route function
  reads is declared for its operation, and every declared one is read: the routes run behind a wrapper that records
  the names they look up. A route reads its body only through its declaration in ``web/inputs.py`` (an undeclared
  name is a ``KeyError``), the same declaration the body schema is built from, so the code cannot read a field the
  schema lacks; every declared field is read, as a value of the wrong type for it is refused naming it. Every declared
  bound (integer range, length, choices) is probed over HTTP on both sides of its edge.
- **Real responses.** Each route is exercised over HTTP on both stores with auth on, successes and failures (400,
  401, 403, 404, 405, 409, 413, 415, 422, 429; a confirmed action and its repeat; 409 ``RUN_IN_PROGRESS``, a resume
  and a stop while a slow scripted model streams), and every body is validated (jsonschema, formats checked) against the schema of its status, its error code
  against the codes that response lists, its headers against the declared ones; SSE events and chunks against
  ``StreamEvent`` and ``StreamChunk``.
- **Valid OpenAPI 3.1** (openapi-spec-validator).
- **Fuzz.** schemathesis generates valid and invalid requests for every operation against a live uvicorn server, a
  bounded number per operation with a fixed seed: in development (no auth), and on the Supabase store over real
  PostgreSQL as a signed-in user: no 5xx, every status documented, every body, content type and required header
  conforms.
- **/docs** is one self-contained page under a nonce-only CSP; in Chromium it renders every operation and schema.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from jsonschema import Draft202012Validator
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

import app as app_module
from app import VERSION, create_app
from settings import Settings
from tests.conftest import AuthHeaders
from tests.pg import RUN_SECRET
from tests.scripted_model import ScriptedCalls, ScriptedModel
from tests.support import make_settings, new_id, parse_sse, serve
from tests.tokens import TEST_JWT_SECRET, TEST_PUBLISHABLE_KEY, bearer, mint
from web.openapi import document

ROOT = Path(__file__).resolve().parent.parent
DOC = document(VERSION)
METHODS = ("get", "post", "put", "patch", "delete")
# Read by every route through the middleware or auth, and declared elsewhere: the security scheme, the body's type.
HEADERS_NOT_PARAMETERS = {"authorization", "content-type"}


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOC["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = functools.reduce(lambda at, key: at[key], node["$ref"][2:].split("/"), DOC)
    return node


def parameters(operation: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    found = (resolve(p) for p in operation.get("parameters", []))
    return {p["name"]: p for p in found if p["in"] == where}


def body_schema(operation: dict[str, Any]) -> dict[str, Any] | None:
    body = operation.get("requestBody")
    return resolve(resolve(body)["content"]["application/json"]["schema"]) if body else None


def schema_errors(schema: Any, instance: Any) -> list[str]:
    """jsonschema (2020-12, formats asserted) against the document, so ``#/components/...`` references resolve."""
    root = {"components": DOC["components"], "allOf": [schema]}
    validator = Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)
    return [f"{list(error.absolute_path)}: {error.message}" for error in validator.iter_errors(instance)]


def example(schema: Any, user: str) -> Any:
    """A small valid instance of a request schema: required properties only, ids fresh, the caller's user_id."""
    schema = resolve(schema)
    if "anyOf" in schema:
        return example(schema["anyOf"][0], user)
    if schema.get("type") == "object":
        return {name: user if name == "user_id" else example(schema["properties"][name], user)
                for name in schema.get("required", [])}
    if schema.get("format") == "uuid":
        return new_id()
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("type") == "integer":
        return schema.get("minimum", 0)
    assert schema.get("type") == "string", schema
    return "Kitchen repaint"


class Contract:
    """Checks real responses against the document and remembers which (method, path, status) it has seen."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, str]] = set()

    def check(self, response: httpx.Response, method: str, path: str | None) -> list[dict[str, Any]]:
        """Validate ``response`` for ``method path`` (None: a path no route has); returns the SSE chunks, if any."""
        status = str(response.status_code)
        if path is None or (status == "405" and method.lower() not in DOC["paths"][path]):
            assert status in ("404", "405"), response.text
            spec = resolve(DOC["components"]["responses"][status])
        else:
            documented = DOC["paths"][path][method.lower()]["responses"]
            assert status in documented, f"{method} {path}: {status} is not documented ({response.text[:300]})"
            spec = resolve(documented[status])
            self.seen.add((method.upper(), path, status))
        for name, header in spec.get("headers", {}).items():
            header = resolve(header)
            value = response.headers.get(name)
            assert value is not None or not header.get("required"), f"{method} {path} {status}: no {name} header"
            if value is not None:
                coerced: Any = int(value) if resolve(header["schema"]).get("type") == "integer" else value
                assert not schema_errors(header["schema"], coerced), (name, value)
        media_type = response.headers["content-type"].split(";")[0].strip()
        assert media_type in spec.get("content", {}), f"{method} {path} {status}: {media_type} is not documented"
        content = spec["content"][media_type]
        if media_type == "application/json":
            assert not schema_errors(content["schema"], response.json()), (method, path, status, response.json())
            if "x-error-codes" in spec:  # the codes each error response lists are the ones it really carries
                assert response.json()["error"]["code"] in spec["x-error-codes"], (status, response.json())
            return []
        if media_type != "text/event-stream":
            return []
        event_schema = resolve(content["schema"])
        chunk_schema = event_schema["properties"]["data"]["contentSchema"]  # jsonschema only annotates contentSchema
        items = []
        for event in parse_sse(response.text):
            if event.data is None:
                continue  # a ": ping" comment
            fields = {"data": event.data, **({"id": event.id} if event.id is not None else {})}
            assert not schema_errors(event_schema, fields), fields
            items.append(event.json())
            assert not schema_errors(chunk_schema, items[-1]), (schema_errors(chunk_schema, items[-1]), items[-1])
        assert items and items[-1]["type"] in ("complete", "error")
        assert {item["run_id"] for item in items} == {response.headers["x-run-id"]}
        return items


# -- the document itself ------------------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1_and_is_what_the_service_serves(tmp_path: Path) -> None:
    from openapi_spec_validator import validate

    validate(DOC)
    assert DOC["openapi"].startswith("3.1.") and DOC["info"]["version"] == VERSION
    with TestClient(create_app(make_settings(tmp_path))) as client:
        served = client.get("/openapi.json")
    assert served.status_code == 200 and served.headers["content-type"] == "application/json"
    assert served.json() == json.loads(json.dumps(DOC))


def test_every_route_is_documented_and_every_documented_operation_is_a_route() -> None:
    routed = {(route.path, method.lower()) for route in app_module.routes for method in route.methods or ()
              if method != "HEAD"}  # Starlette answers HEAD for every GET route; it is not an operation of its own
    documented = {(path, method) for path, method, _ in operations()}
    assert routed - documented == set(), "routes missing from web/openapi.py"
    assert documented - routed == set(), "documented operations with no route"
    assert len({op["operationId"] for _, _, op in operations()}) == len(documented)


# -- drift: what the route functions read ---------------------------------------------------------------------------


class _RecordingQuery(QueryParams):
    seen: set[str]

    def __getitem__(self, key: str) -> str:
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.seen.add(key)
        return super().get(key, default)

    def getlist(self, key: Any) -> list[str]:
        self.seen.add(key)
        return super().getlist(key)

    def __contains__(self, key: Any) -> bool:
        self.seen.add(key)
        return super().__contains__(key)


class _RecordingHeaders(Headers):
    seen: set[str]

    def __getitem__(self, key: str) -> str:
        self.seen.add(key.lower())
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.seen.add(key.lower())
        return super().get(key, default)

    def getlist(self, key: str) -> list[str]:
        self.seen.add(key.lower())
        return super().getlist(key)

    def __contains__(self, key: Any) -> bool:
        self.seen.add(str(key).lower())
        return super().__contains__(key)


def recording_app(settings: Settings) -> tuple[Any, dict[tuple[str, str], tuple[set[str], set[str]]]]:
    """The app with each route's endpoint wrapped to record the query parameters and headers it looks up."""
    application = create_app(settings)
    reads: dict[tuple[str, str], tuple[set[str], set[str]]] = {}

    def recorded(endpoint: Callable[[Request], Any], key: tuple[str, str]) -> Callable[[Request], Any]:
        async def run(request: Request) -> Any:
            query, headers = reads.setdefault(key, (set(), set()))
            request._query_params = _RecordingQuery(request.scope["query_string"])
            request._query_params.seen = query
            request._headers = _RecordingHeaders(scope=request.scope)
            request._headers.seen = headers
            return await endpoint(request)

        return run

    wrapped = []
    for route in application.router.routes:
        assert isinstance(route, Route)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            wrapped.append(Route(route.path, recorded(route.endpoint, (route.path, method.lower())), methods=[method]))
    application.router.routes[:] = wrapped
    return application, reads


def test_every_query_parameter_and_header_a_route_reads_is_declared_and_every_declared_one_is_read(
    tmp_path: Path,
) -> None:
    application, reads = recording_app(make_settings(tmp_path, METRICS_TOKEN="m" * 32))
    user = new_id()
    with TestClient(application) as client:
        for path, method, operation in operations():
            query = {name: user for name, p in parameters(operation, "query").items() if p.get("required")}
            url = path.format(**{name: new_id() for name in parameters(operation, "path")})
            schema = body_schema(operation)
            body = example(schema, user) if schema else None
            client.request(method.upper(), url, params=query, json=body)
    for path, method, operation in operations():
        query, headers = reads[(path, method)]
        where = f"{method.upper()} {path}"
        assert query == set(parameters(operation, "query")), f"{where}: read {sorted(query)}"
        declared = {name.lower() for name in parameters(operation, "header")}  # header names are case-insensitive
        assert headers - HEADERS_NOT_PARAMETERS == declared, f"{where}: read {sorted(headers)}"
    # The recording works: the parameters every version of the service has read were seen.
    assert {"user_id", "limit", "offset"} <= reads[("/api/conversations", "get")][0]
    assert {"after", "user_id"} <= reads[("/api/chat/runs/{run_id}/events", "get")][0]
    assert "last-event-id" in reads[("/api/chat/runs/{run_id}/events", "get")][1]
    assert "last-event-id" in reads[("/api/chat/stream", "post")][1]  # fetch-event-source resends the POST with it


def _edges(schema: dict[str, Any]) -> Iterator[tuple[Any, bool]]:
    """(value, accepted) on both sides of each bound the schema declares."""
    schema = resolve(schema)
    if "anyOf" in schema:
        schema = resolve(schema["anyOf"][0])
    if "minimum" in schema:
        yield schema["minimum"], True
        yield schema["minimum"] - 1, False
    if "maximum" in schema:
        yield schema["maximum"], True
        yield schema["maximum"] + 1, False
    if "maxLength" in schema:
        yield "x" * schema["maxLength"], True
        yield "x" * (schema["maxLength"] + 1), False
    if schema.get("minLength", 0) > 0:
        yield "x" * schema["minLength"], True
        yield "", False
    for choice in schema.get("enum", []):
        yield choice, True
    if "enum" in schema:
        yield "not-a-choice", False


def _refused_for(response: httpx.Response, name: str) -> bool:
    return response.status_code == 422 and f"'{name}'" in response.json()["error"]["message"]


def test_every_declared_bound_is_the_code_s_bound(tmp_path: Path) -> None:
    """Each query and body bound, probed at its edge and one past it: accepted, then a 422 naming the field."""
    probed = 0
    with TestClient(create_app(make_settings(tmp_path))) as client:
        for path, method, operation in operations():
            user = new_id()
            url = path.format(**{name: new_id() for name in parameters(operation, "path")})
            base = {name: user for name, p in parameters(operation, "query").items() if p.get("required")}
            for name, parameter in parameters(operation, "query").items():
                for value, accepted in _edges(parameter["schema"]):
                    response = client.request(method.upper(), url, params={**base, name: value})
                    assert _refused_for(response, name) is not accepted, (method, path, name, value, response.text)
                    probed += 1
            schema = body_schema(operation)
            for name, field in (schema or {}).get("properties", {}).items():
                for value, accepted in _edges(field):
                    body = {**example(schema, user), name: value}
                    if path == "/api/chat/stream":
                        body["conversation_id"] = new_id()  # one run per conversation: no 409 between probes
                    response = client.request(method.upper(), url, json=body)
                    assert _refused_for(response, name) is not accepted, (method, path, name, value, response.text)
                    probed += 1
    assert probed >= 20


def _wrong_type(schema: dict[str, Any]) -> Any:
    """A JSON value of the wrong type for a body field's schema: a number for text or an id, else text."""
    schema = resolve(schema)
    if "anyOf" in schema:
        schema = resolve(schema["anyOf"][0])
    types = schema.get("type", "string")
    return 5 if "string" in ([types] if isinstance(types, str) else types) else "x"


def test_every_declared_body_field_is_read(tmp_path: Path) -> None:
    """The code reads a body only through its declaration, the one its schema comes from; and reads all of it."""
    checked = 0
    with TestClient(create_app(make_settings(tmp_path))) as client:
        for path, method, operation in operations():
            schema = body_schema(operation)
            url = path.format(**{name: new_id() for name in parameters(operation, "path")})
            for name, field in (schema or {}).get("properties", {}).items():
                body = {**example(schema, new_id()), name: _wrong_type(field)}
                response = client.request(method.upper(), url, json=body)
                assert _refused_for(response, name), (method, path, name, response.text)
                checked += 1
    assert checked >= 10  # chat's five fields, stop's two, create's and rename's two, confirm's one


# -- real responses -------------------------------------------------------------------------------------------------


def test_real_responses_match_the_document(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, settings: Settings
) -> None:
    contract = Contract()
    auth = auth_headers(user_id)
    conversations = "/api/conversations"

    def call(method: str, path: str, url: str | None = None, *, headers: dict[str, str] | None = None,
             **kwargs: Any) -> tuple[httpx.Response, list[dict[str, Any]]]:
        response = client.request(method, url or path, headers=auth if headers is None else headers, **kwargs)
        return response, contract.check(response, method, path)

    # Service routes and pages.
    for path in ("/", "/health", "/openapi.json", "/docs", "/playground", "/metrics"):
        call("GET", path, headers={})
    # A conversation's life.
    created, _ = call("POST", conversations, json={"user_id": user_id, "title": "Kitchen repaint"})
    assert created.status_code == 201
    conversation = created.json()["id"]
    chat_body = {"message": "What invoices do I have?", "conversation_id": conversation, "user_id": user_id,
                 "history": [], "client_message_id": new_id()}
    streamed, items = call("POST", "/api/chat/stream", json=chat_body)
    assert streamed.status_code == 200 and items[-1]["type"] == "complete"
    run = streamed.headers["x-run-id"]
    events = f"/api/chat/runs/{run}/events"
    resumed, _ = call("GET", "/api/chat/runs/{run_id}/events", events, params={"user_id": user_id, "after": 1})
    assert resumed.status_code == 200
    stopped, _ = call("POST", "/api/chat/runs/{run_id}/stop", f"/api/chat/runs/{run}/stop",
                      json={"user_id": user_id, "seen_chars": 5})
    assert stopped.status_code == 200  # idempotent after the end: the saved message
    listed, _ = call("GET", conversations, params={"user_id": user_id, "limit": 1})
    assert listed.status_code == 200 and listed.json()["total"] == 1
    one = f"{conversations}/{conversation}"
    fetched, _ = call("GET", "/api/conversations/{conversation_id}", one, params={"user_id": user_id})
    assert [m["role"] for m in fetched.json()["messages"]] == ["user", "assistant"]
    regenerated, _ = call("POST", "/api/chat/stream", json={
        "conversation_id": conversation, "user_id": user_id, "regenerate_message_id": fetched.json()["leaf_id"]})
    assert regenerated.status_code == 200
    switched, _ = call("PUT", "/api/conversations/{conversation_id}/active-leaf", f"{one}/active-leaf",
                       json={"user_id": user_id, "message_id": fetched.json()["leaf_id"]})
    assert switched.json()["active_leaf_id"] == fetched.json()["leaf_id"]
    branch, _ = call("GET", "/api/conversations/{conversation_id}", one,
                     params={"user_id": user_id, "leaf": regenerated.headers["x-run-id"]})
    assert branch.status_code == 404 and branch.json()["error"]["code"] == "MESSAGE_NOT_FOUND"
    if "patch" in DOC["paths"]["/api/conversations/{conversation_id}"]:
        renamed, _ = call("PATCH", "/api/conversations/{conversation_id}", one,
                          json={"user_id": user_id, "title": "Deck stain"})
        assert renamed.status_code == 200
    usage, _ = call("GET", "/api/usage", params={"user_id": user_id, "period": "month"})
    assert usage.status_code == 200 and usage.json()["used"]["tokens"] > 0  # the two turns above, in the ledger
    loaded, _ = call("POST", "/api/dev/sample-data", json={"user_id": user_id})
    assert loaded.status_code == 200 and loaded.json()["written"] > 0
    # Failures, each in the envelope of its status: (status, method, path, headers (None: the caller's), request).
    refusals: list[tuple[int, str, str, dict[str, str] | None, dict[str, Any]]] = [
        (409, "POST", "/api/chat/stream", None, {"json": {**chat_body, "message": "something else"}}),
        (401, "GET", conversations, {}, {"params": {"user_id": user_id}}),
        (403, "GET", conversations, auth_headers(new_id()), {"params": {"user_id": user_id}}),
        (422, "GET", conversations, None, {"params": {"user_id": user_id, "limit": 101}}),
        (422, "POST", conversations, None, {"json": {"user_id": "not-a-uuid"}}),
        (415, "POST", conversations, {**auth, "content-type": "text/plain"}, {"content": b"{}"}),
        (400, "POST", conversations, {**auth, "content-type": "application/json"}, {"content": b"{"}),
        (413, "POST", conversations, None, {"json": {"user_id": user_id, "title": "x" * settings.max_request_bytes}}),
        (404, "GET", "/api/conversations/{conversation_id}", None, {"params": {"user_id": user_id}}),
        (404, "POST", "/api/chat/runs/{run_id}/stop", None, {"json": {"user_id": user_id}}),
        (404, "GET", "/api/chat/runs/{run_id}/events", None, {"params": {"user_id": user_id}}),
        (404, "POST", "/api/actions/{action_id}/confirm", None, {"json": {"user_id": user_id}}),
        (404, "GET", "/api/actions/{action_id}", None, {"params": {"user_id": user_id}}),
        (404, "DELETE", "/api/conversations/{conversation_id}", None, {"params": {"user_id": user_id}}),
        (404, "PUT", "/api/conversations/{conversation_id}/active-leaf", None,
         {"json": {"user_id": user_id, "message_id": new_id()}}),
        (422, "GET", "/api/chat/runs/{run_id}/events", {**auth, "Last-Event-ID": "x"},
         {"params": {"user_id": user_id}}),
        (422, "GET", "/api/usage", None, {"params": {"user_id": user_id, "period": "week"}}),
    ]
    for status, method, path, headers, kwargs in refusals:
        url = path.format(conversation_id=new_id(), run_id=new_id(), action_id=new_id())
        refused, _ = call(method, path, url, headers=headers, **kwargs)
        assert refused.status_code == status, (method, path, refused.text)
    wrong_method = client.put(conversations, headers=auth)
    contract.check(wrong_method, "PUT", conversations)
    assert wrong_method.status_code == 405 and "GET" in wrong_method.headers["allow"]
    contract.check(client.get("/api/nothing-here", headers=auth), "GET", None)
    deleted, _ = call("DELETE", "/api/conversations/{conversation_id}", one, params={"user_id": user_id})
    assert deleted.status_code == 200
    # Every operation answered at least one documented success here (metrics is off: its 200 has a test below).
    successes = {(m, p) for m, p, s in contract.seen if s.startswith("2")}
    missing = {(method.upper(), path) for path, method, _ in operations()} - successes
    actions = {("GET", "/api/actions/{action_id}"), ("POST", "/api/actions/{action_id}/confirm")}  # tested below
    assert missing <= {("GET", "/metrics"), *actions}, missing


def test_confirming_an_action_and_its_tool_call_chunks_match_the_document(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    from services.model import Stop, TextDelta, ToolUse
    from tests.test_actions import add_contacts, caller_for, finished_calls
    from tests.test_agents import handoff

    from services.domains import BY_AGENT
    from tests.test_actions import on_store

    settings = make_settings(tmp_path, **service_env)
    caller = caller_for(auth_headers, user_id)
    maria, ben = add_contacts(settings, caller, "Maria Lopez", "Ben Carter")
    model = ScriptedCalls([handoff("contacts"),
                           [ToolUse("d", "delete_contact", {"id": maria}),
                            ToolUse("u", "update_contact", {"id": ben, "changes": {"phone": "555-0100"}}),
                            Stop("tool_use")],
                           [TextDelta("Confirm it."), Stop("end_turn")]])
    contract = Contract()
    with TestClient(create_app(settings, model=model)) as client:
        body = {"message": "delete Maria", "conversation_id": new_id(), "user_id": user_id}
        streamed = client.post("/api/chat/stream", json=body, headers=auth_headers(user_id))
        items = contract.check(streamed, "POST", "/api/chat/stream")
        (pending,) = finished_calls(items, "delete_contact")
        (update,) = finished_calls(items, "update_contact")
        on_store(settings, lambda store: store.update_record(caller, BY_AGENT["contacts"], ben, {"phone": "555-0199"}))
        path = "/api/actions/{action_id}/confirm"
        for action, status in ((pending, 200), (pending, 409), (update, 409)):  # the last RECORD_CHANGED
            url = path.format(action_id=action["action_id"])
            confirmed = client.post(url, json={"user_id": user_id}, headers=auth_headers(user_id))
            contract.check(confirmed, "POST", path)
            assert confirmed.status_code == status, confirmed.text
        for action, state in ((pending, "done"), (update, "pending")):
            kept = client.get(f"/api/actions/{action['action_id']}", params={"user_id": user_id},
                              headers=auth_headers(user_id))
            contract.check(kept, "GET", "/api/actions/{action_id}")
            assert kept.status_code == 200 and kept.json()["status"] == state, kept.text


def test_metrics_rate_limits_and_a_run_in_progress_match_the_document(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    """429 with its headers, 409 RUN_IN_PROGRESS (runId) while a slow run streams, a resume and a stop mid-run."""
    settings = make_settings(tmp_path, **service_env, METRICS_TOKEN="m" * 32, RATE_LIMIT_API_PER_MINUTE="8",
                             RATE_LIMIT_WINDOW_SECONDS="3600")
    contract = Contract()
    auth = auth_headers(user_id)
    model = ScriptedModel(pieces=[f"w{i} " for i in range(60)], pause=0.05)
    with serve(create_app(settings, model=model)) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        scraped = http.get("/metrics", headers={"Authorization": f"Bearer {'m' * 32}"})
        contract.check(scraped, "GET", "/metrics")
        contract.check(http.get("/metrics"), "GET", "/metrics")  # 401 without the token
        body = {"message": "hello", "conversation_id": new_id(), "user_id": user_id}
        with http.stream("POST", "/api/chat/stream", json=body, headers=auth) as first:
            assert first.status_code == 200
            run = first.headers["x-run-id"]
            lines = first.iter_lines()
            next(lines)  # the run has begun
            busy = http.post("/api/chat/stream", json={**body, "message": "again"}, headers=auth)
            contract.check(busy, "POST", "/api/chat/stream")
            assert busy.status_code == 409 and busy.json()["error"]["runId"] == run
            resumed: list[httpx.Response] = []
            follower = threading.Thread(target=lambda: resumed.append(httpx.get(  # a client of its own
                f"{live.url}/api/chat/runs/{run}/events", params={"user_id": user_id},
                headers={**auth, "Last-Event-ID": "1"}, timeout=30)))
            follower.start()
            time.sleep(0.2)
            stopped = http.post(f"/api/chat/runs/{run}/stop", json={"user_id": user_id, "seen_chars": 4},
                                headers=auth)
            contract.check(stopped, "POST", "/api/chat/runs/{run_id}/stop")
            assert stopped.json()["metadata"]["status"] == "stopped"
            follower.join(timeout=30)
            items = contract.check(resumed[0], "GET", "/api/chat/runs/{run_id}/events")
            assert items[-1]["type"] == "complete" and items[-1]["status"] == "stopped"
            rest = "\n".join(lines)
        tail = [event.json() for event in parse_sse(rest) if event.data is not None]
        assert tail[-1]["status"] == "stopped"
        for _ in range(10):
            limited = http.get("/api/conversations", params={"user_id": user_id}, headers=auth)
            contract.check(limited, "GET", "/api/conversations")
            if limited.status_code == 429:
                break
        assert limited.status_code == 429 and limited.json()["error"]["limit"] == "api"
        assert int(limited.headers["retry-after"]) >= 1 and limited.headers["ratelimit-remaining"] == "0"


# -- schemathesis -------------------------------------------------------------------------------------------------

EXAMPLES_PER_OPERATION = 10  # per generation mode (valid and invalid requests): about 250 requests in all


def test_schemathesis_finds_no_undocumented_response(tmp_path: Path) -> None:
    # Development without auth settings: no token needed. High limits: the fuzz must not be throttled.
    service = make_settings(tmp_path, MAX_STREAMS_PER_USER="1000", RATE_LIMIT_CHAT_PER_MINUTE="100000",
                            RATE_LIMIT_API_PER_MINUTE="100000")
    _fuzz(service, {}, None)


def test_schemathesis_finds_no_undocumented_response_on_supabase_with_auth(
    tmp_path: Path, fake_postgrest: Any, supabase_url: str, register_user: Callable[[str], None]
) -> None:
    """The production store behind the same fuzz, as a signed-in user: each generated request carries the user's
    token, and a valid one names that user, so requests reach PostgREST and PostgreSQL rather than stopping at 403."""
    service = make_settings(tmp_path, STORE="supabase", SUPABASE_URL=supabase_url,
                            SUPABASE_PUBLISHABLE_KEY=TEST_PUBLISHABLE_KEY, SUPABASE_JWT_SECRET=TEST_JWT_SECRET,
                            SUPABASE_RUN_SECRET=RUN_SECRET, MAX_STREAMS_PER_USER="1000",
                            RATE_LIMIT_CHAT_PER_MINUTE="100000", RATE_LIMIT_API_PER_MINUTE="100000")
    user = new_id()
    register_user(user)
    token = mint(user, TEST_JWT_SECRET, issuer=f"{supabase_url.rstrip('/')}/auth/v1")
    _fuzz(service, bearer(token), user)
    reached = {r.path.removeprefix("/rest/v1/") for r in fake_postgrest.requests}
    assert {"agent_conversations", "rpc/agent_run_begin", "rpc/agent_usage_report"} <= reached  # not stopped at auth


def _fuzz(service: Settings, headers: dict[str, str], user: str | None) -> None:
    """schemathesis over every operation, valid and invalid requests, with ``headers`` on each; a valid request's
    ``user_id`` (query or body) is ``user`` when given."""
    import schemathesis
    from schemathesis import GenerationMode, checks

    chosen = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
              checks.response_schema_conformance, checks.response_headers_conformance]
    failures: list[str] = []
    started = time.monotonic()
    with serve(create_app(service)) as live:
        schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
        fuzzed: set[str] = set()
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @hypothesis_settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                                     database=None, phases=[Phase.explicit, Phase.generate],
                                     suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode))
                def exchange(case: Any) -> None:
                    case.headers = {**(case.headers or {}), **headers}
                    if user is not None and mode is GenerationMode.POSITIVE:
                        _as_user(case, user)
                    case.call_and_validate(base_url=live.url, checks=chosen, timeout=30)

                try:
                    exchange()
                except Unsatisfiable:
                    assert mode is GenerationMode.NEGATIVE  # no parameter and no body: nothing to make invalid
                except Exception as exc:  # noqa: BLE001 - every operation's failure is reported, not only the first
                    failures.append(f"{operation.label} ({mode.value}): {exc}")
            fuzzed.add(operation.label)
    assert not failures, "\n\n".join(failures)
    # schemathesis leaves out the operation that served it the document (the other tests check that one).
    assert fuzzed == {f"{method.upper()} {path}" for path, method, _ in operations()} - {"GET /openapi.json"}
    assert time.monotonic() - started < 120  # seconds in practice; a bound so a slow regression is noticed


def _as_user(case: Any, user: str) -> None:
    if isinstance(case.query, dict) and "user_id" in case.query:
        case.query["user_id"] = user
    if isinstance(case.body, dict) and "user_id" in case.body:
        case.body["user_id"] = user


# -- /docs --------------------------------------------------------------------------------------------------------


def test_docs_is_one_self_contained_page_under_a_nonce_policy_in_every_environment(tmp_path: Path) -> None:
    # Production settings proper need Supabase and Bedrock; these routes read no setting at all.
    production = dataclasses.replace(make_settings(tmp_path), environment="production")
    with TestClient(create_app(production)) as client:
        first, second = client.get("/docs"), client.get("/docs")
        assert client.get("/openapi.json").status_code == 200
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/html")
    policy = first.headers["content-security-policy"]
    nonce = policy.split("'nonce-")[1].split("'")[0]
    assert f"script-src 'nonce-{nonce}'" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy
    assert second.headers["content-security-policy"] != policy  # a fresh nonce per response
    html = first.text
    assert html.count("<script") == html.count(f'<script nonce="{nonce}">') == 1
    assert " src=" not in html and "http://" not in html and "https://" not in html and "{{nonce}}" not in html
    assert not re.search(r"\son[a-z]+\s*=", html) and not re.search(r"\sstyle\s*=", html)  # the CSP forbids both
    assert "innerHTML" not in html and "eval(" not in html  # text goes in with textContent only


@pytest.mark.system  # Chromium
def test_docs_renders_every_operation_and_schema_in_a_browser(tmp_path: Path) -> None:
    from tests.test_playground import CHROMIUM, CHROMIUM_ARGS

    if CHROMIUM is None:
        pytest.skip("no Chromium: /usr/bin/chromium is missing and none is on PATH (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with serve(create_app(make_settings(tmp_path))) as live, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            requested: list[str] = []
            page.on("request", lambda request: None if request.url.endswith("/favicon.ico") else requested.append(
                request.url))
            page.goto(f"{live.url}/docs")
            page.wait_for_selector("body[data-rendered=true]", timeout=10_000)
            assert page.locator("section.operation").count() == len(list(operations()))
            assert page.locator("section.schema").count() == len(DOC["components"]["schemas"])
            chat = page.locator("#op-streamChat")
            assert "ChatRequest" in chat.inner_text() and "StreamChunk" in chat.inner_text()
            listed = page.locator("#op-listConversations").inner_text()
            assert "limit" in listed and "1..100" in listed
            # Descriptions are CommonMark: rendered, never shown as raw markup.
            shown = page.evaluate("() => Array.from(document.querySelectorAll('.prose, td'), e => e.textContent)")
            assert not [text for text in shown if "**" in text or "`" in text]
            assert page.locator("#about strong").all_inner_texts()[:3] == ["Authentication.", "Errors.", "Streams."]
            assert "Authorization: Bearer <Supabase access token>" in page.locator("#about code").all_inner_texts()
            assert page.locator("#about p").count() == DOC["info"]["description"].strip().count("\n\n") + 1
        finally:
            browser.close()
    assert problems == []
    assert requested == [f"{live.url}/docs", f"{live.url}/openapi.json"]
