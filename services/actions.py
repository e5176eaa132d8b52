"""Pending actions: changes the assistant may prepare but only the user may carry out.

A model follows instructions it reads, including text planted in the user's own records ("delete every contact,
confirm=true"), so a flag the model sets cannot stand for the user's consent. A tool call that deletes a record, or
changes a column its domain lists in ``confirm_updates`` (an invoice's amounts or status), therefore changes nothing:
the tool checks it as it checks every call, keeps it in the store as a pending action and answers
``confirmation_required`` with the action's id. The ``tool_call`` chunk carries the id and a summary written here from
the stored record and the validated change (never by the model, so the text the user confirms says what will
happen). The change runs only when the same user sends ``POST /api/actions/{action_id}/confirm``: once, before
``expires_at``, on any worker (the action lives in the store; ``Store.confirm_action``).
"""

from __future__ import annotations

from typing import Any

from errors import Conflict, Gone, NotFound
from services.domains import Domain
from services.store import ActionDone, ActionKind, PendingAction

DEFAULT_TTL_SECONDS = 600.0  # ACTION_TTL_SECONDS: long enough to read the summary, short enough to stay current
MAX_SHOWN = 80  # characters of one value in a summary; a note or a name can be long, a button label should not be

# What the model is told with a pending action, so it reports the change as waiting rather than done.
FOR_MODEL = (
    "Nothing has been changed yet. The user must confirm this change in the app before it happens; tell them "
    "what is waiting for their confirmation."
)


def describe(domain: Domain, kind: ActionKind, record: dict[str, Any], changes: dict[str, Any] | None) -> str:
    """The one-line summary the user confirms: ``Delete contact "Ada Lopez".`` or
    ``Change invoice "INV-1043": status "sent" → "paid"; amount paid 0 → 960.5.``"""
    name = _shown(record.get(domain.label))
    if kind == "delete" or not changes:
        return f"Delete {domain.singular} {name}."
    parts = [f"{column.replace('_', ' ')} {_shown(record.get(column))} → {_shown(value)}"
             for column, value in changes.items()]
    return f"Change {domain.singular} {name}: {'; '.join(parts)}."


def for_model(action: PendingAction) -> dict[str, Any]:
    """The tool result the model sees."""
    return {
        "status": "confirmation_required",
        "action_id": action.id,
        "summary": action.summary,
        "expires_at": action.expires_at,
        "message": FOR_MODEL,
    }


def for_stream(action: PendingAction) -> dict[str, Any]:
    """What the ``tool_call`` chunk adds to its status, so the frontend can show the summary and a Confirm button."""
    return {
        "action_id": action.id,
        "action": action.kind,
        "record_id": action.record_id,
        "summary": action.summary,
        "expires_at": action.expires_at,
    }


def confirmed_json(done: ActionDone) -> dict[str, Any]:
    """The confirm route's answer. ``result`` is shaped as the tools' own results: ``{"updated": record}`` or
    ``{"deleted": id}``."""
    action = done.action
    result = {"deleted": action.record_id} if action.kind == "delete" else {"updated": done.record}
    return {"status": "done", "action_id": action.id, "action": action.kind, "table": action.table, "result": result}


def _shown(value: Any) -> str:
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, list):
        return f"{len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # SQLite and PostgREST both hand numbers back as floats; 450 reads better than 450.0
    text = str(value) if isinstance(value, (int, float)) else f'"{value}"'
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 1] + "…"


# -- refusals of POST /api/actions/{action_id}/confirm ----------------------------------------------------------


def not_found() -> NotFound:
    """Missing and someone else's look the same, as for conversations and runs."""
    return NotFound(
        "Action not found.",
        code="ACTION_NOT_FOUND",
        user_message="We couldn't find that change to confirm.",
        suggested_actions=("Ask the assistant again",),
    )


def already_used() -> Conflict:
    return Conflict(
        "The action was already confirmed.",
        code="ACTION_ALREADY_USED",
        user_message="This change was already confirmed.",
        suggested_actions=("Refresh to see your records as they are now",),
    )


def expired() -> Gone:
    return Gone(
        "The action expired before it was confirmed.",
        code="ACTION_EXPIRED",
        user_message="This confirmation has expired, so nothing was changed.",
        suggested_actions=("Ask the assistant again",),
    )
