"""A painting contractor's first hour with the built-in local responder (not an LLM), through a real server.

One uvicorn server on 127.0.0.1 with SQLite and the local responder; the README's sample data loaded through
``POST /api/dev/sample-data`` for two users with the same names (so a record of the other user's would be found by
name). Each message is what a newcomer types; each answer must come from the user's own rows, say plainly what it did
not understand or cannot do, and prepare no change the user did not ask for. Found by review: a filter the message
gave ("projects for Maria", "appointments tomorrow", "unpaid invoices", "invoice 1043") was dropped and every record
was listed as if it matched; "Add a task ..." listed the tasks; "mark it as paid" said the invoice it had just shown
did not exist; "are you an AI?" got "I can only help with ..."; a typo or "INV-1042" reached no specialist.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import create_app
from tests.support import LiveServer, chunks, make_settings, new_id, serve, streamed_text

TODAY = date.today()
NOT_AN_LLM = "(Canvalo's built-in local responder, not an AI model.)"
SAMPLE_NAMES = ("INV-1041", "INV-1042", "INV-1043", "Oakridge clubhouse repaint", "Carter kitchen cabinets",
                "Exterior estimate", "Touch-up walkthrough", "Summit Paint Supply", "Deck staining")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(create_app(make_settings(tmp_path_factory.mktemp("first-hour")))) as server:
        yield server


def sample_user(live: LiveServer) -> str:
    user = new_id()
    response = httpx.post(f"{live.url}/api/dev/sample-data", json={"user_id": user}, timeout=10)
    assert response.status_code == 200 and response.json()["written"] == 16, response.text
    return user


@pytest.fixture(scope="module")
def user(live: LiveServer) -> str:
    sample_user(live)  # a second user with the same sample names: never theirs
    return sample_user(live)


def ask(live: LiveServer, user: str, message: str, conversation: str | None = None) -> tuple[list[dict[str, Any]],
                                                                                            str]:
    body = {"message": message, "conversation_id": conversation or new_id(), "user_id": user}
    response = httpx.post(f"{live.url}/api/chat/stream", json=body, timeout=20)
    assert response.status_code == 200, response.text
    items = chunks(response.text)
    assert items[-1]["type"] == "complete", items[-1]
    return items, streamed_text(items)


def tool_calls(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(i["tool_name"], i["tool_call"]["status"]) for i in items if i["type"] == "tool_call"]


def prepared(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i["tool_call"] for i in items if i["type"] == "tool_call"
            and i["tool_call"]["status"] == "confirmation_required"]


def records_named(text: str) -> set[str]:
    return {name for name in SAMPLE_NAMES if name in text}


def stored_answer(live: LiveServer, user: str, conversation: str) -> dict[str, Any]:
    response = httpx.get(f"{live.url}/api/conversations/{conversation}", params={"user_id": user}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["messages"][-1]  # type: ignore[no-any-return]


# -- reading: each answer lists exactly the records the message asked about ------------------------------------------

# (message, the agent that answers, the sample records the answer names: exactly these)
READS: list[tuple[str, str, set[str]]] = [
    ("What invoices do I have?", "invoices", {"INV-1041", "INV-1042", "INV-1043"}),
    ("WHAT INVOICES DO I HAVE", "invoices", {"INV-1041", "INV-1042", "INV-1043"}),
    ("show my invocies", "invoices", {"INV-1041", "INV-1042", "INV-1043"}),
    ("Any overdue invoices?", "invoices", {"INV-1042"}),
    ("Show me my unpaid invoices", "invoices", {"INV-1042", "INV-1043"}),
    ("Show invoice 1043", "invoices", {"INV-1043"}),
    ("Show me INV-1042", "invoices", {"INV-1042"}),
    ("invoices for Ben Carter", "invoices", {"INV-1043"}),
    ("What appointments do I have?", "appointments", {"Exterior estimate", "Touch-up walkthrough"}),
    ("appointments tomorrow", "appointments", set()),
    (f"appointments on {(TODAY + timedelta(days=2)).isoformat()}", "appointments", {"Exterior estimate"}),
    ("appointments with maria", "appointments", {"Touch-up walkthrough"}),
    ("What appointments do I have next week?", "appointments",
     {title for title, days in (("Exterior estimate", 2), ("Touch-up walkthrough", 6))
      if 7 - TODAY.weekday() <= days <= 13 - TODAY.weekday()}),
    ("projects for Maria", "projects", set()),
    ("Show projects for Oakridge HOA", "projects", {"Oakridge clubhouse repaint"}),
    ("How many projects are in progress?", "projects", {"Oakridge clubhouse repaint"}),
    ("Show the proposal for Priya", "proposals", {"Deck staining"}),
    ("list my suppliers", "contacts", {"Summit Paint Supply"}),
    ("show my tasks", "tasks", set()),
    ("any 1 star reviews?", "reviews", set()),
]


@pytest.mark.parametrize(("message", "agent", "named"), READS, ids=[r[0] for r in READS])
def test_a_question_lists_exactly_the_records_it_asks_about(
    live: LiveServer, user: str, message: str, agent: str, named: set[str]
) -> None:
    conversation = new_id()
    items, text = ask(live, user, message, conversation)
    assert items[-1]["agent_type"] == agent, text
    assert records_named(text) == named, text
    assert not prepared(items) and text.endswith(NOT_AN_LLM)
    if not named and "tasks" not in message and "week" not in message:
        assert text.startswith("You don't have any "), text
    stored = stored_answer(live, user, conversation)
    assert (stored["agent_type"], stored["content"]) == (agent, text)
    assert [c["name"] for c in stored["metadata"]["tool_calls"]] == [c[0] for c in tool_calls(items)
                                                                     if c[1] != "started"][1:]


def test_a_count_and_a_total_come_from_the_rows(live: LiveServer, user: str) -> None:
    _, count = ask(live, user, "How many invoices do I have?")
    assert count.startswith("You have 3 invoices"), count
    items, owed = ask(live, user, "What's the total I'm owed?")
    assert items[-1]["agent_type"] == "invoices", owed
    assert "5160.50" in owed and "INV-1041" not in owed, owed  # 4200.00 + 960.50 unpaid; the paid one is not owed
    _, budget = ask(live, user, "What is the total budget of my projects?")
    assert "14900.00" in budget, budget
    _, suppliers = ask(live, user, "list my suppliers")
    assert "Summit Paint Supply" in suppliers and "Maria Lopez" not in suppliers, suppliers


# -- what it cannot do, said plainly -------------------------------------------------------------------------------


@pytest.mark.parametrize("message", ["Add a task to buy brushes tomorrow", "Add a contact named John Smith",
                                     "Create an invoice for Priya Shah for $500", "Book an appointment with Ben"])
def test_a_new_record_is_said_to_be_beyond_it_and_nothing_is_listed_as_done(
    live: LiveServer, user: str, message: str
) -> None:
    items, text = ask(live, user, message)
    assert not [c for c in tool_calls(items) if c[0].startswith(("create_", "update_", "delete_"))]
    assert "can't add" in text and "You have" not in text, text
    assert text.endswith(NOT_AN_LLM)


@pytest.mark.parametrize("message", ["are you an AI?", "Which model are you?", "Is this ChatGPT?"])
def test_asked_what_it_is_it_says_it_is_rules_not_an_llm(live: LiveServer, user: str, message: str) -> None:
    items, text = ask(live, user, message)
    assert items[-1]["agent_type"] == "supervisor" and not tool_calls(items)
    assert "not an AI model or an LLM" in text and "rules" in text, text


def test_greetings_thanks_and_questions_out_of_scope(live: LiveServer, user: str) -> None:
    assert ask(live, user, "hi")[1].startswith("Hello! I can help with your invoices")
    assert ask(live, user, "Thanks!")[1].startswith("You're welcome.")
    items, weather = ask(live, user, "what's the weather?")
    assert not tool_calls(items) and "I couldn't tell which of your records" in weather


# -- follow-ups: it does not read earlier turns, and says so ------------------------------------------------------


def test_a_follow_up_that_names_no_record_is_asked_about_not_guessed(live: LiveServer, user: str) -> None:
    conversation = new_id()
    first, _ = ask(live, user, "What invoices do I have?", conversation)
    for follow_up in ("mark it as paid", "the second one", "Delete it"):
        items, text = ask(live, user, follow_up, conversation)
        assert not prepared(items), follow_up
        assert "couldn't find" not in text, text  # the invoice it just showed does exist
        assert "earlier messages" in text and "INV-1043" in text, text


# -- a change: prepared for the record named, confirmed, made ------------------------------------------------------


def test_mark_invoice_paid_confirm_and_the_record_changed(live: LiveServer) -> None:
    user = sample_user(live)
    conversation = new_id()
    items, text = ask(live, user, "mark invoice 1043 as paid", conversation)
    (action,) = prepared(items)
    assert action["changes"] == {"status": "paid", "paid_date": TODAY.isoformat(), "amount_paid": 960.5}
    assert "This needs your confirmation" in text and "INV-1043" in text
    stored = stored_answer(live, user, conversation)
    assert [c.get("action_id") for c in stored["metadata"]["tool_calls"]][-1] == action["action_id"]
    done = httpx.post(f"{live.url}/api/actions/{action['action_id']}/confirm", json={"user_id": user}, timeout=10)
    assert done.status_code == 200 and done.json()["result"]["updated"]["status"] == "paid", done.text
    _, after = ask(live, user, "show invoice INV-1043")
    assert re.search(r"INV-1043, client name: Ben Carter, status: paid", after), after


def test_a_change_for_a_record_that_is_not_there_prepares_nothing(live: LiveServer, user: str) -> None:
    for message in ("Delete contact John Smith", "mark invoice 2001 as paid", "cancel the appointment with Priya"):
        items, text = ask(live, user, message)
        assert not prepared(items), message
        assert "couldn't find" in text, text


@pytest.mark.parametrize(("message", "said"), [
    ("Set the priority of the primer task to urgent", "I can't make that change"),
    ("mark invoice 1043 as payed", "I can't make that change"),
    ("Reply to Maria's review saying thanks", "I can't make that change"),
    ("Mark all invoices as paid", "one record at a time"),
    ("Delete all my contacts", "one record at a time"),
])
def test_a_change_it_cannot_make_is_said_not_answered_with_a_list(
    live: LiveServer, user: str, message: str, said: str
) -> None:
    """Asked for a change these rules do not read, it once answered with a list ("You don't have any tasks with
    priority urgent") or "I couldn't find that invoice among your invoices (INV-1043, ...)"."""
    items, text = ask(live, user, message)
    assert not prepared(items) and said in text, text
    assert "You have" not in text and "You don't have" not in text and "couldn't find" not in text, text


def test_a_record_named_without_for_narrows_a_question(live: LiveServer, user: str) -> None:
    _, project = ask(live, user, "Show me the Oakridge project")
    assert records_named(project) == {"Oakridge clubhouse repaint"}, project
    _, proposal = ask(live, user, "What is the status of the deck staining proposal?")
    assert records_named(proposal) == {"Deck staining"}, proposal


@pytest.mark.parametrize("message", ["What's Maria Lopez's phone number?", "What did I bill Oakridge?"])
def test_a_question_it_cannot_place_says_so_and_how_to_ask(live: LiveServer, user: str, message: str) -> None:
    items, text = ask(live, user, message)
    assert not tool_calls(items) and "I couldn't tell which of your records" in text, text
    assert "Show my contacts" in text
