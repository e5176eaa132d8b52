"""The multi-agent assistant: routing, the tool loop, its limits, failures, and the stream it produces."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from app import create_app
from services.agents.assistant import HANDOFF_TOOL, LOOP_LIMIT_NOTE
from services.agents.tools import run_tool, tools_for
from services.domains import BY_AGENT, DOMAINS
from services.model import Stop, TextDelta, ToolUse, Usage
from services.store import Caller
from services.store import sample_data
from settings import Settings
from tests.conftest import AuthHeaders
from tests.scripted_model import ScriptedCalls
from tests.support import chunks, new_id, streamed_text


def handoff(agent: str) -> list[Any]:
    return [ToolUse("h1", HANDOFF_TOOL, {"agent": agent}), Stop("tool_use"), Usage(10, 3)]


def send(client: TestClient, auth: AuthHeaders, user: str, message: str, conversation: str | None = None) -> list[dict]:  # type: ignore[type-arg]
    body = {"message": message, "conversation_id": conversation or new_id(), "user_id": user}
    response = client.post("/api/chat/stream", json=body, headers=auth(user))
    assert response.status_code == 200, response.text
    return chunks(response.text)


@pytest.fixture
def scripted(settings: Settings) -> Iterator[Any]:
    """A client factory for an app whose model plays a script."""
    clients: list[TestClient] = []

    def make(model: ScriptedCalls) -> TestClient:
        client = TestClient(create_app(settings, model=model))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


# -- on the embedded default (local responder) -------------------------------------------------------------------


def test_local_invoice_question_answers_from_the_users_rows(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    seed(client, auth_headers, user_id)
    items = send(client, auth_headers, user_id, "What invoices do I have?")
    kinds = [(i["type"], i["tool_name"], (i["tool_call"] or {}).get("status"), i["agent_type"]) for i in items]
    assert kinds[:3] == [
        ("tool_call", HANDOFF_TOOL, "success", "supervisor"),
        ("tool_call", "list_invoices", "started", "invoices"),
        ("tool_call", "list_invoices", "success", "invoices"),
    ]
    assert {k[0] for k in kinds[3:-1]} == {"token"} and all(k[3] == "invoices" for k in kinds[3:])
    assert kinds[-1][0] == "complete"
    text = streamed_text(items)
    assert "INV-1042" in text and "INV-1043" in text and "INV-1041" in text
    assert "not an AI model" in text


def test_local_status_words_become_filters(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    seed(client, auth_headers, user_id)
    items = send(client, auth_headers, user_id, "Do I have any overdue invoices?")
    assert items[1]["tool_call"]["arguments"] == {"status": "overdue"}
    text = streamed_text(items)
    assert "INV-1042" in text and "INV-1043" not in text


def test_local_routing_by_keywords(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    routed = {agent: send(client, auth_headers, user_id, f"show my {domain.keywords[0]}")
              for agent, domain in BY_AGENT.items()}
    for agent, items in routed.items():
        assert items[0]["tool_call"] == {"status": "success", "agent": agent}, agent
        assert items[-1]["agent_type"] == agent
    ambiguous = send(client, auth_headers, user_id, "show my invoices and projects")
    assert ambiguous[0]["type"] == "token" and streamed_text(ambiguous).startswith("Do you mean your invoices or projects")
    greeting = send(client, auth_headers, user_id, "hello there")
    assert {i["agent_type"] for i in greeting} == {"supervisor"} and "Hello" in streamed_text(greeting)


def test_answer_is_stored_with_its_agent_and_a_tool_summary(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    conversation = new_id()
    send(client, auth_headers, user_id, "list my tasks", conversation)
    stored = client.get(f"/api/conversations/{conversation}", params={"user_id": user_id}, headers=auth_headers(user_id))
    answer = stored.json()["messages"][-1]
    assert answer["agent_type"] == "tasks"
    calls = answer["metadata"]["tool_calls"]
    assert [(c["name"], c["agent"], c["status"]) for c in calls] == [("list_tasks", "tasks", "success")]
    assert isinstance(calls[0]["duration_ms"], int)


def test_tools_never_reach_another_users_rows(client: TestClient, auth_headers: AuthHeaders) -> None:
    alice, bob = new_id(), new_id()
    seed(client, auth_headers, alice)
    text = streamed_text(send(client, auth_headers, bob, "What invoices do I have?"))
    assert "INV-10" not in text and "don't have any invoices" in text


# -- with a scripted model: the loop, its cap, failures ------------------------------------------------------------


def test_one_specialist_loop_per_turn_with_tool_results_fed_back(
    scripted: Any, auth_headers: AuthHeaders, user_id: str
) -> None:
    model = ScriptedCalls([
        handoff("invoices"),
        [ToolUse("t1", "list_invoices", {"status": "overdue"}), Stop("tool_use"), Usage(50, 5)],
        [TextDelta("One overdue "), TextDelta("invoice."), Stop("end_turn"), Usage(80, 4)],
    ])
    client = scripted(model)
    items = send(client, auth_headers, user_id, "overdue?")
    assert len(model.requests) == 3  # supervisor, specialist with tools, specialist after the tool result
    supervisor, first, second = model.requests
    assert [t["toolSpec"]["name"] for t in supervisor.tools] == [HANDOFF_TOOL]
    assert "list_invoices" in [t["toolSpec"]["name"] for t in first.tools]
    assert second.messages[-2]["content"][0]["toolUse"]["name"] == "list_invoices"
    result = second.messages[-1]["content"][0]["toolResult"]
    assert result["toolUseId"] == "t1" and result["status"] == "success"
    assert result["content"][0]["json"] == {"table": "invoices", "count": 0, "rows": []}
    assert streamed_text(items) == "One overdue invoice."
    assert items[-1]["usage"] == {"input_tokens": 140, "output_tokens": 12, "cost": None}  # the scripted model: no price
    assert items[-1]["agent_type"] == "invoices"


def test_tool_loop_stops_at_the_iteration_cap(scripted: Any, auth_headers: AuthHeaders, user_id: str) -> None:
    forever = [ToolUse("t", "list_tasks", {}), Stop("tool_use")]
    model = ScriptedCalls([handoff("tasks"), forever])
    items = send(scripted(model), auth_headers, user_id, "loop")
    assert len(model.requests) == 1 + 6
    assert streamed_text(items) == LOOP_LIMIT_NOTE
    assert items[-1]["type"] == "complete" and items[-1]["stop_reason"] == "max_iterations"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (ToolUse("t", "get_invoice", {"id": "00000000-0000-4000-8000-000000000000"}), "No invoice with that id"),
        (ToolUse("t", "get_invoice", {"id": "1 OR 1=1"}), "must be a record id"),
        (ToolUse("t", "create_invoice", {"client_name": "X"}), "invoice_number is required"),
        (ToolUse("t", "update_invoice", {"id": "00000000-0000-4000-8000-000000000000",
                                         "changes": {"user_id": "someone-else"}}), "user_id is not a known field"),
        # The model cannot confirm anything: the flag it once set is no longer an argument (issue 11).
        (ToolUse("t", "delete_invoice", {"id": "00000000-0000-4000-8000-000000000000", "confirm": True}),
         "input.confirm is not a known field"),
        (ToolUse("t", "delete_invoice", {"id": "00000000-0000-4000-8000-000000000000"}), "No invoice with that id"),
        (ToolUse("t", "list_invoices", {"limit": 500}), "at most 100"),
        (ToolUse("t", "drop_tables", {}), "no tool named"),
    ],
)
def test_failing_tools_return_safe_errors_to_the_model(
    scripted: Any, auth_headers: AuthHeaders, user_id: str, call: ToolUse, message: str
) -> None:
    model = ScriptedCalls([handoff("invoices"), [call, Stop("tool_use")], [TextDelta("Sorry."), Stop("end_turn")]])
    items = send(scripted(model), auth_headers, user_id, "do it")
    finished = [i for i in items if i["type"] == "tool_call" and i["tool_call"]["status"] not in ("started",)][-1]
    assert finished["tool_call"]["status"] == "error"
    result = model.requests[-1].messages[-1]["content"][0]["toolResult"]
    assert result["status"] == "error" and message in result["content"][0]["json"]["error"]
    assert items[-1]["type"] == "complete"


def test_create_and_update_through_tools(scripted: Any, auth_headers: AuthHeaders, user_id: str) -> None:
    new = {"invoice_number": "INV-2001", "client_name": "Ada", "due_date": "2026-12-01", "total_amount": 120}
    model = ScriptedCalls([handoff("invoices"), [ToolUse("c", "create_invoice", new), Stop("tool_use")],
                           [TextDelta("Created."), Stop("end_turn")]])
    client = scripted(model)
    send(client, auth_headers, user_id, "create")
    created = model.requests[-1].messages[-1]["content"][0]["toolResult"]["content"][0]["json"]["created"]
    assert created["status"] == "draft" and created["amount_paid"] == 0  # defaults applied
    assert "user_id" not in created
    record_id = created["id"]
    model.calls[1:] = [[ToolUse("u", "update_invoice", {"id": record_id, "changes": {"notes": "Gate code 1234"}}),
                        Stop("tool_use")], [TextDelta("Updated."), Stop("end_turn")]]
    model.requests.clear()
    send(client, auth_headers, user_id, "add a note")
    prepared = model.requests[-1].messages[-1]["content"][0]["toolResult"]["content"][0]["json"]
    assert prepared["status"] == "confirmation_required"  # every change waits for the user (services/agents/actions.py)
    done = client.post(f"/api/actions/{prepared['action_id']}/confirm", json={"user_id": user_id},
                       headers=auth_headers(user_id))
    updated = done.json()["result"]["updated"]
    assert updated["notes"] == "Gate code 1234" and updated["invoice_number"] == "INV-2001"


# -- what tool results may add to a prompt (services/agents/results.py) -------------------------------------------

TEXT = "x" * 2000  # a text column at the tools' own bound (MAX_TEXT)


def _caller(auth: AuthHeaders, user: str) -> Caller:
    return Caller(user, auth(user).get("Authorization", "").removeprefix("Bearer ") or None)


def seed_invoices(client: TestClient, auth: AuthHeaders, user: str, count: int, **values: Any) -> list[str]:
    """``count`` invoices of the user's, straight into the app's store."""
    caller, ids = _caller(auth, user), [new_id() for _ in range(count)]
    for n, record_id in enumerate(ids):
        row = {"id": record_id, "invoice_number": f"INV-{n:04}", "client_name": "Ada", "due_date": "2026-12-01",
               "total_amount": 1, "status": "draft", "line_items": [], **values}
        store = client.app_state["store"]  # type: ignore[index]
        client.portal.call(store.insert_record, caller, BY_AGENT["invoices"], row)  # type: ignore[union-attr]
    return ids


def listed(client: TestClient, auth: AuthHeaders, user: str) -> list[str]:
    """The ids of the user's invoices in the list's order, as the store answers them."""
    rows = client.portal.call(client.app_state["store"].list_records, _caller(auth, user),  # type: ignore[union-attr]
                              BY_AGENT["invoices"], {}, 100)
    return [row["id"] for row in rows]


def tool_results(request: Any) -> dict[str, dict[str, Any]]:
    return {block["toolResult"]["toolUseId"]: block["toolResult"]["content"][0]["json"]
            for message in request.messages for block in message["content"] if "toolResult" in block}


def test_a_turns_tool_results_are_cut_each_and_together_to_what_a_prompt_may_carry(
    scripted: Any, auth_headers: AuthHeaders, user_id: str
) -> None:
    """Unbounded, 100 invoices of 2,000-character texts and two list calls send 3.7 million characters in one call."""
    from services.agents.results import MAX_RESULT_CHARS, MAX_TURN_CHARS, SPENT, size
    from services.model import prompt_tokens

    client = scripted(ScriptedCalls([]))
    seed_invoices(client, auth_headers, user_id, 30, client_name=TEXT, notes=TEXT, terms=TEXT)
    listing = [ToolUse(f"l{n}", "list_invoices", {"limit": 100}) for n in range(8)]
    model = ScriptedCalls([handoff("invoices"), [*listing, Stop("tool_use")],
                           [ToolUse("g", "get_invoice", {"id": new_id()}), Stop("tool_use")],
                           [TextDelta("done"), Stop("end_turn")]])
    client = scripted(model)
    items = send(client, auth_headers, user_id, "Show my invoices")
    results = tool_results(model.requests[-1])
    assert all(size(result) <= MAX_RESULT_CHARS for result in results.values())
    # Only the short refusals once the turn's share is spent (SPENT) may pass what was left.
    assert sum(size(result) for result in results.values()) <= MAX_TURN_CHARS + 1_000
    first = results["l0"]
    assert first["truncated"] is True and first["found"] == 30 and 0 < first["count"] == len(first["rows"]) < 30
    assert [row["id"] for row in first["rows"]] == listed(client, auth_headers, user_id)[:first["count"]]
    assert "Narrow the query" in first["note"]
    assert results["l7"] == results["g"] == {"error": SPENT}  # the turn's share was spent: neither ran
    assert [i["tool_call"]["status"] for i in items if i["type"] == "tool_call"][-2:] == ["started", "error"]
    assert prompt_tokens(model.requests[-1]) < (MAX_TURN_CHARS + 20_000) // 4  # tools, prompt and tool schemas


def test_a_record_too_large_for_a_tool_result_keeps_its_smaller_fields(
    scripted: Any, auth_headers: AuthHeaders, user_id: str
) -> None:
    from services.agents.results import MAX_RESULT_CHARS, size

    client = scripted(ScriptedCalls([]))
    items = [{f"k{n}": "y" * 500 for n in range(20)}] * 100  # what create_invoice accepts: ~1 million characters
    (record_id,) = seed_invoices(client, auth_headers, user_id, 1, line_items=items, notes=TEXT)
    model = ScriptedCalls([handoff("invoices"), [ToolUse("g", "get_invoice", {"id": record_id}), Stop("tool_use")],
                           [TextDelta("done"), Stop("end_turn")]])
    send(scripted(model), auth_headers, user_id, "Show it")
    result = tool_results(model.requests[-1])["g"]
    assert size(result) <= MAX_RESULT_CHARS and result["left_out"] == ["line_items"]
    assert result["record"]["id"] == record_id and result["record"]["notes"] == TEXT
    assert "The user can see them in the app" in result["note"]


def test_the_local_responder_says_a_list_was_cut(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    seed_invoices(client, auth_headers, user_id, 10, notes=TEXT, terms=TEXT)
    text = streamed_text(send(client, auth_headers, user_id, "What invoices do I have?"))
    assert text.startswith("Here are the first 5 of the 10 invoices I found; the others did not fit"), text
    assert text.count("INV-") == 5  # of some 4,300 characters each


def test_a_pending_actions_result_keeps_what_says_it_waits_whatever_is_cut() -> None:
    from services.agents.results import bounded, size

    pending = {"status": "confirmation_required", "action_id": new_id(), "summary": "x" * 100_000,
               "expires_at": "2026-11-24T02:01:20.911133Z", "message": "Nothing has been changed yet."}
    cut = bounded(pending, 2_000)
    assert size(cut) <= 2_000 and cut["left_out"] == ["summary"]
    assert {k: cut[k] for k in ("status", "action_id", "expires_at", "message")} == \
        {k: pending[k] for k in ("status", "action_id", "expires_at", "message")}


# -- the tool schemas ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", DOMAINS, ids=[d.agent_type for d in DOMAINS])
def test_every_domain_has_five_tools_that_never_expose_system_columns(domain: Any) -> None:
    tools = tools_for(domain)
    assert [t.action for t in tools] == ["list", "get", "create", "update", "delete"]
    create = tools[2].schema
    assert set(create["required"]) == set(domain.required)
    for system in ("id", "user_id", "created_at", "updated_at"):
        assert system not in create["properties"]
        assert system not in tools[3].schema["properties"]["changes"]["properties"]
    assert tools[0].schema["properties"]["limit"]["maximum"] == 100


def seed(client: TestClient, auth: AuthHeaders, user: str) -> None:
    """Load the documented sample data for ``user`` through the running app's own store, acting as that user."""
    token = auth(user).get("Authorization", "").removeprefix("Bearer ") or None
    portal = client.portal
    assert portal is not None
    portal.call(sample_data.load, client.app_state["store"], Caller(user_id=user, access_token=token))


@pytest.mark.parametrize("domain", DOMAINS, ids=[d.agent_type for d in DOMAINS])
def test_every_domain_round_trips_through_its_tools(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, domain: Any
) -> None:
    from services.agents.tools import run_tool

    token = auth_headers(user_id).get("Authorization", "").removeprefix("Bearer ") or None
    caller = Caller(user_id=user_id, access_token=token)
    store = client.app_state["store"]
    list_tool, get_tool, create_tool, update_tool, delete_tool = tools_for(domain)
    sample = sample_data.SAMPLE[domain.agent_type][0]

    def run(tool: Any, arguments: dict[str, Any]) -> Any:
        assert client.portal is not None
        return client.portal.call(run_tool, store, caller, tool, arguments)

    created = run(create_tool, sample)
    assert created.status == "success", created.content
    record = created.content["created"]
    assert run(get_tool, {"id": record["id"]}).content["record"]["id"] == record["id"]
    first_required = domain.required[0]
    changing = run(update_tool, {"id": record["id"], "changes": {first_required: "Renamed"}})
    assert changing.status == "confirmation_required"
    assert run(get_tool, {"id": record["id"]}).content["record"] == record  # nothing changed until the user confirms
    changed = client.portal.call(store.confirm_action, caller, changing.content["action_id"])
    assert changed.record[first_required] == "Renamed"
    record = run(get_tool, {"id": record["id"]}).content["record"]
    listed = run(list_tool, {})
    assert [r["id"] for r in listed.content["rows"]] == [record["id"]]
    other = Caller(user_id=new_id(), access_token=None)
    assert client.portal is not None
    if token is None:  # without auth, scoping is by user id alone; prove another user sees nothing
        hidden = client.portal.call(run_tool, store, other, get_tool, {"id": record["id"]})
        assert hidden.status == "error"
    prepared = run(delete_tool, {"id": record["id"]})
    assert prepared.status == "confirmation_required"
    assert run(get_tool, {"id": record["id"]}).status == "success"  # nothing deleted until the user confirms
    done = client.portal.call(store.confirm_action, caller, prepared.content["action_id"])
    assert (done.action.kind, done.action.record_id, done.record) == ("delete", record["id"], None)
    assert run(get_tool, {"id": record["id"]}).status == "error"


# -- argument validation (issue 11) --------------------------------------------------------------------------------


def _tool(agent: str, action: str) -> Any:
    return next(t for t in tools_for(BY_AGENT[agent]) if t.action == action)


RECORD = "0b5c52b5-8a53-4c4e-9a35-0b2a0e0c8f11"
INVOICE = {"invoice_number": "INV-1", "client_name": "Ada", "due_date": "2026-12-01", "total_amount": 10}


@pytest.mark.parametrize(
    ("agent", "action", "arguments", "message"),
    [
        # null is a value like any other: required and vocabulary columns cannot be cleared
        ("invoices", "update", {"id": RECORD, "changes": {"status": None}}, "changes.status must be of type string"),
        ("invoices", "update", {"id": RECORD, "changes": {"client_name": None}}, "changes.client_name must be"),
        ("invoices", "update", {"id": RECORD, "changes": {"total_amount": None}}, "changes.total_amount must be"),
        ("invoices", "update", {"id": RECORD, "changes": {"line_items": None}}, "changes.line_items must be"),
        ("tasks", "update", {"id": RECORD, "changes": {"priority": None}}, "changes.priority must be"),
        ("invoices", "update", {"id": None, "changes": {"notes": "x"}}, "input.id is required"),
        # numbers must be finite
        ("invoices", "create", {**INVOICE, "total_amount": float("nan")}, "finite"),
        ("invoices", "create", {**INVOICE, "total_amount": float("inf")}, "finite"),
        ("invoices", "create", {**INVOICE, "subtotal": float("-inf")}, "finite"),
        ("reviews", "create", {"reviewer_name": "Bo", "rating": float("nan")}, "must be of type integer"),
        # objects inside arrays are validated, and every string is bounded
        ("invoices", "create", {**INVOICE, "line_items": [{"item": "x" * 5_000_000}]}, "at most 500 characters"),
        ("invoices", "create", {**INVOICE, "line_items": [{"item": {"nested": "x"}}]}, "must be of type"),
        ("invoices", "create", {**INVOICE, "line_items": [{"qty": float("nan")}]}, "finite"),
        ("invoices", "create", {**INVOICE, "line_items": [{"k" * 65: 1}]}, "field name longer than 64"),
        ("invoices", "create", {**INVOICE, "line_items": [{str(i): i for i in range(21)}]}, "at most 20 fields"),
        ("invoices", "create", {**INVOICE, "line_items": ["text"]}, "must be of type object"),
        ("invoices", "create", {**INVOICE, "notes": "x" * 2001}, "at most 2000 characters"),
        ("invoices", "get", {"id": RECORD + "0" * 5_000_000}, "at most 36 characters"),
        # dates are YYYY-MM-DD only; times, emails and ids match whole, with nothing after them
        ("invoices", "create", {**INVOICE, "due_date": "2026-W01-1"}, "YYYY-MM-DD"),
        ("invoices", "create", {**INVOICE, "due_date": "20260101"}, "YYYY-MM-DD"),
        ("invoices", "create", {**INVOICE, "due_date": "2026-02-30"}, "YYYY-MM-DD"),
        ("invoices", "create", {**INVOICE, "due_date": "2026-12-01\n"}, "YYYY-MM-DD|at most 10 characters"),
        ("appointments", "create", {"client_name": "Ada", "scheduled_date": "2026-12-01", "scheduled_time": "10:00\n"},
         "HH:MM|at most 5 characters"),
        ("contacts", "create", {"name": "Ada", "email": "ada@example.com\n"}, "email address"),
        ("invoices", "get", {"id": RECORD + "\n"}, "UUID|at most 36 characters"),
        ("invoices", "get", {"id": "urn:uuid:" + RECORD}, "UUID|at most 36 characters"),
        ("invoices", "get", {"id": "{" + RECORD.replace("-", "") + "}"}, "UUID"),
        ("invoices", "get", {"id": RECORD.replace("-", "")}, "UUID"),
        ("invoices", "list", {"limit": float("nan")}, "must be of type integer"),
        # a field name holds no character a store cannot keep, as a value does not
        ("invoices", "create", {**INVOICE, "line_items": [{"it\x00em": "Primer"}]}, "field names must not .*NUL"),
        ("invoices", "create", {**INVOICE, "line_items": [{"it\ud800em": "Primer"}]}, "field names .*surrogate"),
        ("invoices", "create", {**INVOICE, "notes": "half \udc00"}, "input.notes must not .*surrogate"),
    ],
)
def test_tool_arguments_are_validated_at_every_depth(agent: str, action: str, arguments: Any, message: str) -> None:
    from services.agents.tools import ToolInputError, validate

    with pytest.raises(ToolInputError, match=message.replace("[", r"\[")):
        validate(_tool(agent, action).schema, arguments)


@pytest.mark.parametrize(
    ("agent", "action", "arguments"),
    [
        ("invoices", "update", {"id": RECORD, "changes": {"notes": None, "paid_date": None, "client_email": None}}),
        ("invoices", "create", {**INVOICE, "status": None, "notes": None, "line_items": [{"item": "Primer", "qty": 2,
                                                                                          "price": 5.25}]}),
        ("invoices", "list", {"status": None, "limit": None}),
        ("invoices", "list", {"status": "overdue", "limit": 5}),
        ("appointments", "create", {"client_name": "Ada", "scheduled_date": "2026-12-01", "scheduled_time": "23:59"}),
        ("contacts", "create", {"name": "Ada", "email": "ada@example.com"}),
        ("invoices", "get", {"id": RECORD.upper()}),
    ],
)
def test_valid_tool_arguments_pass(agent: str, action: str, arguments: Any) -> None:
    from services.agents.tools import validate

    validate(_tool(agent, action).schema, arguments)


def test_validation_answers_every_uuid_in_lower_case() -> None:
    from services.agents.tools import validate

    client = new_id()
    checked = validate(_tool("invoices", "update").schema,
                       {"id": RECORD.upper(), "changes": {"client_id": client.upper(), "notes": "AB"}})
    assert checked == {"id": RECORD, "changes": {"client_id": client, "notes": "AB"}}


@pytest.mark.anyio
async def test_an_upper_case_uuid_names_the_same_record_on_both_stores(
    store: Any, new_caller: Callable[[], Caller]
) -> None:
    """SQLite compares ids as text, PostgreSQL as uuids: the tools write and look up the canonical spelling only."""
    caller, invoices = new_caller(), BY_AGENT["invoices"]
    client = new_id()
    created = await run_tool(store, caller, _tool("invoices", "create"), {**INVOICE, "client_id": client.upper()})
    assert created.status == "success" and created.content["created"]["client_id"] == client
    record_id = created.content["created"]["id"]
    got = await run_tool(store, caller, _tool("invoices", "get"), {"id": record_id.upper()})
    assert got.status == "success" and got.content["record"]["id"] == record_id
    for spelling in (client, client.upper()):
        listed = await run_tool(store, caller, _tool("invoices", "list"), {"client_id": spelling})
        assert [row["id"] for row in listed.content["rows"]] == [record_id], spelling
    prepared = await run_tool(store, caller, _tool("invoices", "delete"), {"id": record_id.upper()})
    assert prepared.status == "confirmation_required" and prepared.shown["record_id"] == record_id
    assert (await store.get_record(caller, invoices, record_id))["client_id"] == client


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["it\x00em", "it\ud800em"], ids=["nul", "lone-surrogate"])
async def test_a_field_name_a_store_cannot_keep_is_refused_on_both_stores(
    store: Any, new_caller: Callable[[], Caller], name: str
) -> None:
    caller = new_caller()
    created = await run_tool(store, caller, _tool("invoices", "create"), {**INVOICE, "line_items": [{name: "Primer"}]})
    assert created.status == "error" and "field names must not" in created.content["error"], created.content
    kept = await run_tool(store, caller, _tool("invoices", "create"), INVOICE)
    changes = {"line_items": [{name: "Primer"}]}
    prepared = await run_tool(store, caller, _tool("invoices", "update"),
                              {"id": kept.content["created"]["id"], "changes": changes})
    assert prepared.status == "error" and "field names must not" in prepared.content["error"], prepared.content
    listed = await run_tool(store, caller, _tool("invoices", "list"), {})
    assert listed.content["count"] == 1


@pytest.mark.parametrize("domain", DOMAINS, ids=[d.agent_type for d in DOMAINS])
def test_every_string_in_every_tool_schema_has_a_max_length(domain: Any) -> None:
    def strings(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
        types = schema.get("type")
        if "string" in (types if isinstance(types, list) else [types]):
            yield schema
        for child in [*schema.get("properties", {}).values(), schema.get("items"), schema.get("additionalProperties")]:
            if isinstance(child, dict):
                yield from strings(child)

    for tool in tools_for(domain):
        for schema in strings(tool.schema):
            assert isinstance(schema.get("maxLength"), int), (tool.name, schema)


def test_a_null_change_to_a_required_column_writes_nothing(
    scripted: Any, auth_headers: AuthHeaders, user_id: str
) -> None:
    new = {"invoice_number": "INV-3001", "client_name": "Ada", "due_date": "2026-12-01", "total_amount": 120}
    model = ScriptedCalls([handoff("invoices"), [ToolUse("c", "create_invoice", new), Stop("tool_use")],
                           [TextDelta("Created."), Stop("end_turn")]])
    client = scripted(model)
    send(client, auth_headers, user_id, "create")
    record_id = model.requests[-1].messages[-1]["content"][0]["toolResult"]["content"][0]["json"]["created"]["id"]
    model.calls[1:] = [[ToolUse("u", "update_invoice", {"id": record_id, "changes": {"status": None}}),
                        Stop("tool_use")],
                       [ToolUse("g", "get_invoice", {"id": record_id}), Stop("tool_use")],
                       [TextDelta("Checked."), Stop("end_turn")]]
    model.requests.clear()
    send(client, auth_headers, user_id, "clear the status")
    results = {block["toolResult"]["toolUseId"]: block["toolResult"] for r in model.requests
               for m in r.messages for block in m["content"] if "toolResult" in block}
    assert results["u"]["status"] == "error"
    assert results["g"]["content"][0]["json"]["record"]["status"] == "draft"


def test_loading_the_sample_data_twice_adds_nothing_and_says_so(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    token = auth_headers(user_id).get("Authorization", "").removeprefix("Bearer ") or None
    caller = Caller(user_id=user_id, access_token=token)
    portal = client.portal
    assert portal is not None
    total = sum(len(rows) for rows in sample_data.SAMPLE.values())
    assert portal.call(sample_data.load, client.app_state["store"], caller) == (total, 0)
    assert portal.call(sample_data.load, client.app_state["store"], caller) == (0, total)
