"""The built-in local responder makes changes as a model does, and a pending change survives a reload (issue 26).

"Mark invoice INV-1043 as paid" once listed another invoice and offered nothing to confirm: the responder turned
"paid" into a list filter. Now each domain's everyday change (a status, a new date, a delete) goes through the tool
calls a model makes: the list tool finds the record by its number or name, then ``update_<one>``/``delete_<one>``
prepares a pending action that only the user's confirmation runs. ``GET /api/actions/{id}`` shows a kept action
again, so a page reloaded before Confirm still offers it. Rows show each domain's own columns (INV-1041's status
was cut at six fields), and an empty list says whether it was filtered.

Everything runs through a real uvicorn server with the real local responder, on both stores (SQLite, and Supabase
over real PostgreSQL with row-level security); the page test runs in Chromium.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect

from app import create_app
from services.model.local_changes import Intent, find_date, find_time, intent, matching
from services.domains import BY_AGENT, BY_TABLE
from services.store import Caller, sample_data
from settings import Settings
from tests.conftest import AuthHeaders
from tests.support import LiveServer, chunks, make_settings, new_id, serve, streamed_text
from tests.test_actions import caller_for, on_store, record
from tests.test_playground import TIMEOUT_MS, Watched, browser, browser_only  # noqa: F401 (browser: a fixture)

TODAY = date.today()


def next_weekday(weekday: int) -> str:
    """The first day after today that falls on ``weekday`` (Monday 0), counted one day at a time."""
    return next(d for d in (TODAY + timedelta(days=n) for n in range(1, 8)) if d.weekday() == weekday).isoformat()


# (message, agent, index of the sample record it names, the changes it asks for; None: a delete)
CHANGES: list[tuple[str, str, int, dict[str, Any] | None]] = [
    ("Mark invoice INV-1043 as paid", "invoices", 2,
     {"status": "paid", "paid_date": TODAY.isoformat(), "amount_paid": 960.5}),
    ("Delete invoice 1042", "invoices", 1, None),
    ("Reschedule Ben Carter's appointment to 2027-03-15 at 2:30pm", "appointments", 0,
     {"scheduled_date": "2027-03-15", "scheduled_time": "14:30"}),
    ("Set the Oakridge project to on hold", "projects", 0, {"status": "on_hold"}),
    ("Accept the deck staining proposal", "proposals", 0, {"status": "accepted"}),
    ("Delete the contact Summit Paint Supply", "contacts", 2, None),
    ("Hide the review from Maria Lopez", "reviews", 0, {"status": "hidden"}),
    ("Pause the Spring exterior special campaign", "campaigns", 0, {"status": "paused"}),
    ("Mark the task Order primer for Oakridge as done", "tasks", 0, {"status": "completed"}),
    ("Postpone the task Send Carter the cabinet colour samples to Friday", "tasks", 1, {"due_date": next_weekday(4)}),
    ("Mark my revenue goal as completed", "settings", 0, {"status": "completed"}),
]


@pytest.fixture
def live(settings: Settings) -> Iterator[LiveServer]:
    with serve(create_app(settings)) as server:
        yield server


@pytest.fixture
def sample_user(settings: Settings, auth_headers: AuthHeaders) -> str:
    user = new_id()
    on_store(settings, lambda store: sample_data.load(store, caller_for(auth_headers, user)))
    return user


def ask(live: LiveServer, auth: AuthHeaders, user: str, message: str,
        conversation: str | None = None) -> list[dict[str, Any]]:
    body = {"message": message, "conversation_id": conversation or new_id(), "user_id": user}
    response = httpx.post(f"{live.url}/api/chat/stream", json=body, headers=auth(user), timeout=30)
    assert response.status_code == 200, response.text
    return chunks(response.text)


def calls(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(i["tool_name"], i["tool_call"]["status"]) for i in items if i["type"] == "tool_call"]


def pending(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i["tool_call"] for i in items
            if i["type"] == "tool_call" and i["tool_call"]["status"] == "confirmation_required"]


def sample_id(user: str, agent: str, index: int) -> str:
    return str(uuid.uuid5(uuid.UUID(user), f"{BY_AGENT[agent].table}-{index}"))


def get_action(live: LiveServer, auth: AuthHeaders, user: str, action_id: str) -> httpx.Response:
    return httpx.get(f"{live.url}/api/actions/{action_id}", params={"user_id": user}, headers=auth(user))


def confirm(live: LiveServer, auth: AuthHeaders, user: str, action_id: str) -> httpx.Response:
    return httpx.post(f"{live.url}/api/actions/{action_id}/confirm", json={"user_id": user}, headers=auth(user))


# -- each domain's everyday change, through the service -----------------------------------------------------------


@pytest.mark.parametrize(("message", "agent", "index", "wanted"), CHANGES, ids=[c[0] for c in CHANGES])
def test_an_everyday_change_waits_for_confirmation_then_is_made(
    live: LiveServer, settings: Settings, auth_headers: AuthHeaders, sample_user: str,
    message: str, agent: str, index: int, wanted: dict[str, Any] | None,
) -> None:
    user, domain = sample_user, BY_AGENT[agent]
    caller = caller_for(auth_headers, user)
    record_id = sample_id(user, agent, index)
    original = record(settings, caller, agent, record_id)
    assert original is not None
    items = ask(live, auth_headers, user, message)
    change = f"{'delete' if wanted is None else 'update'}_{domain.singular}"
    assert calls(items) == [("transfer_to_specialist", "success"), (f"list_{domain.table}", "started"),
                            (f"list_{domain.table}", "success"), (change, "started"),
                            (change, "confirmation_required")]
    (action,) = pending(items)
    assert (action["record_id"], action["changes"]) == (record_id, wanted)
    assert action["before"] == {name: original[name] for name in (wanted or action["before"])}
    assert f"This needs your confirmation: {action['summary']}" in streamed_text(items)
    assert record(settings, caller, agent, record_id) == original  # nothing changed yet
    assert get_action(live, auth_headers, user, action["action_id"]).json()["status"] == "pending"

    done = confirm(live, auth_headers, user, action["action_id"])
    assert done.status_code == 200, done.text
    after = record(settings, caller, agent, record_id)
    if wanted is None:
        assert after is None
    else:
        assert after is not None and {name: after[name] for name in wanted} == wanted
        assert {k: v for k, v in after.items() if k not in wanted and k != "updated_at"} == \
            {k: v for k, v in original.items() if k not in wanted and k != "updated_at"}
    assert get_action(live, auth_headers, user, action["action_id"]).json()["status"] == "done"


def test_an_unknown_record_gets_a_clear_answer_and_nothing_to_confirm(
    live: LiveServer, settings: Settings, auth_headers: AuthHeaders, sample_user: str
) -> None:
    user = sample_user
    caller = caller_for(auth_headers, user)
    before = on_store(settings, lambda store: store.list_records(caller, BY_TABLE["invoices"], {}, 100))
    items = ask(live, auth_headers, user, "Mark invoice INV-9999 as paid")
    assert calls(items) == [("transfer_to_specialist", "success"), ("list_invoices", "started"),
                            ("list_invoices", "success")]
    started = [i["tool_call"] for i in items if i["tool_name"] == "list_invoices"][0]
    assert started["arguments"] == {"limit": 100, "invoice_number": "INV-9999"}  # found by its number, as a model would
    assert "I couldn't find invoice INV-9999, so nothing was changed." in streamed_text(items)
    named = ask(live, auth_headers, user, "Delete the contact Nobody Special")
    assert not pending(named) and not [c for c in calls(named) if c[0].startswith("delete_")]
    assert "I couldn't find that contact among your contacts (" in streamed_text(named)
    assert "Summit Paint Supply" in streamed_text(named)  # it says which there are
    assert on_store(settings, lambda store: store.list_records(caller, BY_TABLE["invoices"], {}, 100)) == before
    assert len(on_store(settings, lambda store: store.list_records(caller, BY_TABLE["contacts"], {}, 100))) == 3


def test_a_namesake_is_not_found_rather_than_changed(
    live: LiveServer, settings: Settings, auth_headers: AuthHeaders, sample_user: str
) -> None:
    """Maria Lopez shares a word with "Delete the contact Maria Gonzalez" but is not the contact it names. A change
    is only prepared for the record the message names (its number, or its whole name, or every word it names it
    by); on both stores, for a delete and an update alike."""
    user = sample_user
    for message in ("Delete the contact Maria Gonzalez", "Cancel Maria Gonzalez's appointment",
                    "Set the Oakridge Gardens project to on hold"):
        items = ask(live, auth_headers, user, message)
        assert not pending(items), (message, [p["summary"] for p in pending(items)])
        assert "I couldn't find that " in streamed_text(items), message
    caller = caller_for(auth_headers, user)
    assert len(on_store(settings, lambda store: store.list_records(caller, BY_TABLE["contacts"], {}, 100))) == 3


def test_what_is_missing_or_unclear_is_asked_and_nothing_is_prepared(
    live: LiveServer, auth_headers: AuthHeaders, sample_user: str
) -> None:
    user = sample_user
    no_date = ask(live, auth_headers, user, "Reschedule Maria Lopez's appointment")
    assert calls(no_date) == [("transfer_to_specialist", "success")]
    assert streamed_text(no_date).startswith("Which date should the appointment move to?")
    both = ask(live, auth_headers, user, "Mark the Oakridge HOA invoice and Ben Carter invoice as cancelled")
    assert not pending(both) and "Several invoices match" in streamed_text(both)
    settled = ask(live, auth_headers, user, "Mark invoice INV-1041 as paid")  # paid already
    assert not pending(settled) and "already has status paid" in streamed_text(settled)
    question = ask(live, auth_headers, user, "Which invoices did I mark as paid?")  # a question, never a change
    assert not pending(question) and "INV-1041" in streamed_text(question)


# -- a pending change after a reload ------------------------------------------------------------------------------


def test_a_pending_change_is_shown_again_from_the_store_until_confirmed(
    live: LiveServer, settings: Settings, auth_headers: AuthHeaders, sample_user: str
) -> None:
    user, conversation = sample_user, new_id()
    (streamed,) = pending(ask(live, auth_headers, user, "Mark invoice INV-1043 as paid", conversation))
    # A reload: the page reads the conversation afresh, finds the action's id, and asks the store about it.
    read = httpx.get(f"{live.url}/api/conversations/{conversation}", params={"user_id": user},
                     headers=auth_headers(user))
    kept = [c["action_id"] for c in read.json()["messages"][-1]["metadata"]["tool_calls"] if "action_id" in c]
    assert kept == [streamed["action_id"]]
    shown = get_action(live, auth_headers, user, kept[0])
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["status"] == "pending" and body["used_at"] is None and body["table"] == "invoices"
    assert {k: body[k] for k in ("action_id", "action", "record_id", "summary", "before", "changes", "expires_at")} \
        == {k: streamed[k] for k in ("action_id", "action", "record_id", "summary", "before", "changes", "expires_at")}
    assert get_action(live, auth_headers, user, kept[0]).json() == body  # reading it changes nothing
    stranger = new_id()
    refused = get_action(live, auth_headers, stranger, kept[0])
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "ACTION_NOT_FOUND"
    missing = get_action(live, auth_headers, user, new_id())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "ACTION_NOT_FOUND"
    malformed = httpx.get(f"{live.url}/api/actions/not-a-uuid", params={"user_id": user}, headers=auth_headers(user))
    assert malformed.status_code == 422

    assert confirm(live, auth_headers, user, kept[0]).status_code == 200
    after = get_action(live, auth_headers, user, kept[0]).json()
    assert after["status"] == "done" and after["used_at"] is not None
    assert confirm(live, auth_headers, user, kept[0]).json()["error"]["code"] == "ACTION_ALREADY_USED"


def test_an_expired_change_is_shown_as_expired(tmp_path: Path, service_env: dict[str, str],
                                               auth_headers: AuthHeaders) -> None:
    settings = make_settings(tmp_path, **service_env, ACTION_TTL_SECONDS="0.5")
    user = new_id()
    on_store(settings, lambda store: sample_data.load(store, caller_for(auth_headers, user)))
    with serve(create_app(settings)) as live:
        (action,) = pending(ask(live, auth_headers, user, "Delete the contact Summit Paint Supply"))
        assert get_action(live, auth_headers, user, action["action_id"]).json()["status"] == "pending"
        deadline = time.monotonic() + 10
        while get_action(live, auth_headers, user, action["action_id"]).json()["status"] == "pending":
            assert time.monotonic() < deadline, "still pending 10 s after a 0.5 s TTL"
            time.sleep(0.05)
        assert get_action(live, auth_headers, user, action["action_id"]).json()["status"] == "expired"
        assert confirm(live, auth_headers, user, action["action_id"]).json()["error"]["code"] == "ACTION_EXPIRED"


# -- what the rows show, and what an empty list says --------------------------------------------------------------


def test_rows_show_each_domains_fields_with_the_status(
    live: LiveServer, auth_headers: AuthHeaders, sample_user: str
) -> None:
    text = streamed_text(ask(live, auth_headers, sample_user, "What invoices do I have?"))
    (paid,) = [line for line in text.splitlines() if "INV-1041" in line]
    assert "status: paid" in paid and "total amount: 1850.00" in paid and "amount paid: 1850.00" in paid
    for agent, rows in sample_data.SAMPLE.items():
        domain = BY_AGENT[agent]
        answer = streamed_text(ask(live, auth_headers, sample_user, f"show my {domain.keywords[0]}"))
        lines = [line + "," for line in answer.splitlines() if line.startswith("- ")]
        assert len(lines) == len(rows), agent
        for row in rows:
            (line,) = [line for line in lines if f": {row[domain.label]}," in line]
            for name in ("status", "contact_type", "priority", "scheduled_time", "due_date"):
                if name in row and name in domain.shown:
                    assert f"{name.replace('_', ' ')}: {row[name]}" in line, (agent, name, line)


def test_an_empty_list_says_whether_it_was_filtered(live: LiveServer, auth_headers: AuthHeaders) -> None:
    nobody = new_id()
    plain = streamed_text(ask(live, auth_headers, nobody, "What invoices do I have?"))
    filtered = streamed_text(ask(live, auth_headers, nobody, "Any overdue invoices?"))
    assert plain.startswith("You don't have any invoices yet.") and "match" not in plain
    assert filtered.startswith("You don't have any invoices with status overdue.")


# -- the rules themselves -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("on 2027-02-03", "2027-02-03"),
    ("today", TODAY.isoformat()),
    ("tomorrow", (TODAY + timedelta(days=1)).isoformat()),
    ("next monday", next_weekday(0)),
    ("on sunday", next_weekday(6)),
    ("june 3 2031", "2031-06-03"),
    ("the 3rd of june, 2031", "2031-06-03"),
    ("dec 25th 2030", "2030-12-25"),
    ("on 2027-02-30", None),
    ("june 31 2031", None),
    ("invoice 1043", None),
])
def test_dates_the_responder_reads(text: str, expected: str | None) -> None:
    found = find_date(text, TODAY)
    assert (found.isoformat() if found else None) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("at 14:30", "14:30"), ("at 2:30 pm", "14:30"), ("at 2pm", "14:00"), ("9 a.m.", "09:00"), ("12am", "00:00"),
    ("12 pm", "12:00"), ("at 9", None), ("25:00", None),
])
def test_times_the_responder_reads(text: str, expected: str | None) -> None:
    assert find_time(text) == expected


@pytest.mark.parametrize("text", [
    "Which invoices did I mark as paid?", "Is INV-1043 paid?", "Show my paid invoices", "What invoices do I have?",
    "Do I have cancelled invoices?",
])
def test_questions_are_never_changes(text: str) -> None:
    assert intent(BY_AGENT["invoices"], text, TODAY) is None


@pytest.mark.parametrize("text", [
    "Please remove the late fee note from invoice INV-1043", "Don't delete invoice INV-1043, just mark it as sent",
    "Mark INV-1043 as not paid", "Never delete invoice 1042", "Remove the discount on invoice 1042",
])
def test_a_negation_or_something_taken_off_a_record_is_no_change(text: str) -> None:
    assert intent(BY_AGENT["invoices"], text, TODAY) is None


@pytest.mark.parametrize(("agent", "text"), [
    ("invoices", "Delete invoice 1042"), ("invoices", "remove INV-1043"), ("invoices", "Erase #1041"),
    ("projects", "Delete the Oakridge project"), ("contacts", "Remove the contact Summit Paint Supply"),
])
def test_a_delete_names_the_record_itself(agent: str, text: str) -> None:
    assert intent(BY_AGENT[agent], text, TODAY) == Intent("delete")


@pytest.mark.parametrize(("agent", "text", "column"), [
    ("projects", "Move the Oakridge project end date to 2027-03-01", "end_date"),
    ("projects", "Move the Oakridge project to 2027-03-01", "start_date"),
    ("campaigns", "Move the spring campaign's end to 2027-03-01", "end_date"),
    ("invoices", "Move the due date of invoice 1042 to 2027-03-01", "due_date"),
])
def test_a_new_date_goes_to_the_date_the_message_names(agent: str, text: str, column: str) -> None:
    assert intent(BY_AGENT[agent], text, TODAY) == Intent("update", {column: "2027-03-01"})


NAMED = [{"id": "1", "name": "Maria Lopez"}, {"id": "2", "name": "Oakridge HOA"},
         {"id": "3", "name": "Summit Paint Supply"}]


@pytest.mark.parametrize(("text", "expected"), [
    ("Delete the contact Maria Lopez", ["1"]),  # the whole name
    ("Delete Maria's contact", ["1"]),  # every word it is named by is hers
    ("Mark the Oakridge contact as a supplier", ["2"]),
    ("Delete the contact Summit Paint Supply at 2pm", ["3"]),
    ("Delete the contact Maria Gonzalez", []),  # a namesake shares only some of the words
    ("Delete the contact Gonzalez", []),
    ("Delete the Oakridge Summit contact", []),
])
def test_a_record_is_matched_only_by_what_names_it(text: str, expected: list[str]) -> None:
    assert [row["id"] for row in matching(BY_AGENT["contacts"], NAMED, text)] == expected


# -- the playground, in Chromium ----------------------------------------------------------------------------------


@browser_only
def test_the_playground_offers_confirm_again_after_a_reload(browser: Browser, tmp_path: Path) -> None:  # noqa: F811
    def off_thread(work: Callable[..., Any], *args: Any) -> Any:
        """Playwright's sync API keeps an event loop in this thread: store calls run their own in another."""
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(work, *args).result()

    settings = make_settings(tmp_path)  # development: no auth, the local responder, the playground on
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    watched = Watched(context.new_page())
    page = watched.page
    try:
        with serve(create_app(settings)) as server:
            page.goto(f"{server.url}/playground")
            expect(page.locator("#status")).to_have_text("idle")
            user = page.locator("#user-id").inner_text()
            caller = Caller(user, None)
            off_thread(on_store, settings, lambda store: sample_data.load(store, caller))
            page.fill("#message", "Mark invoice INV-1043 as paid")
            page.click("#send")
            button = page.locator("[data-testid=confirm]")
            expect(button).to_contain_text('Confirm: Change invoice "INV-1043": status "sent" → "paid"')
            page.reload()
            expect(page.locator("#answer")).to_have_attribute("data-status", "complete")
            expect(button).to_have_count(1)  # offered again, from the store
            expect(button).to_contain_text('Confirm: Change invoice "INV-1043": status "sent" → "paid"')
            invoice = sample_id(user, "invoices", 2)
            assert off_thread(record, settings, caller, "invoices", invoice)["status"] == "sent"
            button.click()
            expect(page.locator("#status")).to_have_text("done")
            assert off_thread(record, settings, caller, "invoices", invoice)["status"] == "paid"
            page.reload()
            expect(page.locator("#answer")).to_have_attribute("data-status", "complete")
            expect(page.locator("#answer .tools")).to_contain_text('done: Change invoice "INV-1043"')
            expect(button).to_have_count(0)  # confirmed: nothing left to confirm
        watched.assert_clean()
    finally:
        context.close()
