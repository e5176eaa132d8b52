"""Pending actions: changes the assistant may prepare but only the user may carry out (docs/assistant.md,
"Confirming changes").

A model follows instructions it reads, including text planted in the user's own records, so nothing the model sends
can stand for the user's consent: every update and every delete becomes a pending action in the store, run only when
the same user confirms it (``Store.confirm_action``). What the user confirms is written here from the stored record
and the validated change, never by the model: ``before`` (the values it replaces), ``changes`` and a one-line
``summary`` where every value is shown whole as JSON, every invisible character escaped. A change too large to show
is refused.
"""

from __future__ import annotations

import json
from typing import Any

from services.domains import Domain
from services.store import ActionDone, ActionKind, PendingAction
from services.store.numbers import holds_number_text

DEFAULT_TTL_SECONDS = 600.0  # ACTION_TTL_SECONDS: long enough to read the summary, short enough to stay current
# A summary is shown whole or not at all: a change that needs more to be shown is refused, not cut. The stores keep
# up to this many characters (migrations/010_confirm_every_change.sql).
MAX_SUMMARY = 100_000

# What the model is told with a pending action, so it reports the change as waiting rather than done.
FOR_MODEL = (
    "Nothing has been changed yet. The user must confirm this change in the app before it happens; tell them "
    "what is waiting for their confirmation."
)

# Characters Python calls printable that still show as nothing: variation selectors, fillers, blank patterns.
_INVISIBLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0, *range(0x180B, 0x1810),
     *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)]
)


def before_values(domain: Domain, kind: ActionKind, record: dict[str, Any],
                  changes: dict[str, Any] | None) -> dict[str, Any]:
    """What the change replaces: the record's values of the columns an update sets, or every column of a delete."""
    names = list(changes or {}) if kind == "update" else [c.name for c in domain.columns]
    return {name: record.get(name) for name in names}


def inexact_columns(before: dict[str, Any]) -> list[str]:
    """The columns of ``before`` a confirmation could not compare with what the database holds: JSON (line items)
    holding a number no double holds, read as its text (``services/store/numbers.py``). A confirmation compares each
    value at its column's type, so such a number in a numeric column is compared whole, but inside JSON its text
    would be a string where the database holds a number: the record would never match."""
    return [name for name, value in before.items() if isinstance(value, (list, dict)) and holds_number_text(value)]


def describe(domain: Domain, kind: ActionKind, record: dict[str, Any], changes: dict[str, Any] | None) -> str:
    """The summary the user confirms, every value whole: ``Delete contact "Ada Lopez": phone "555-0101".`` or
    ``Change invoice "INV-1043": status "sent" → "paid"; line items [] → [{"item": "Primer", "price": 99999}].``"""
    name = shown(record.get(domain.label))
    if kind == "delete":
        kept = [f"{_label(c.name)} {shown(record.get(c.name))}" for c in domain.columns
                if c.name != domain.label and record.get(c.name) is not None]
        return f"Delete {domain.singular} {name}{': ' + '; '.join(kept) if kept else ''}."
    parts = [f"{_label(column)} {shown(record.get(column))} → {shown(value)}"
             for column, value in (changes or {}).items()]
    return f"Change {domain.singular} {name}: {'; '.join(parts)}."


def shown(value: Any) -> str:
    """``value`` as JSON, whole, with every character that would not show escaped (``\\u200b``), so the text is the
    value exactly and nothing in it is hidden. Only a missing value (null) reads ``(empty)``; ``""`` is itself."""
    if value is None:
        return "(empty)"
    text = json.dumps(_whole_numbers(value), ensure_ascii=False, separators=(", ", ": "), allow_nan=False)
    return "".join(_visible(char) for char in text)


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
    """What the ``tool_call`` chunk adds to its status: the whole change, for the frontend to show beside Confirm."""
    return {
        "action_id": action.id,
        "action": action.kind,
        "record_id": action.record_id,
        "summary": action.summary,
        "before": action.before,
        "changes": action.changes,
        "expires_at": action.expires_at,
    }


def kept_json(action: PendingAction, now: str) -> dict[str, Any]:
    """``GET /api/actions/{id}``: the change as its ``tool_call`` chunk showed it, its table, and ``status``: ``done``
    once confirmed, ``expired`` once it can no longer be (``expires_at`` passed by ``now``, the service's clock, or
    kept without ``before``), else ``pending``. Confirming decides, by the store's clock; this is what to show."""
    status = "pending"
    if action.used_at is not None:
        status = "done"
    elif action.before is None or action.expires_at <= now:
        status = "expired"
    return {**for_stream(action), "table": action.table, "status": status, "used_at": action.used_at}


def confirmed_json(done: ActionDone) -> dict[str, Any]:
    """The confirm route's answer. ``result`` is shaped as the tools' own results: ``{"updated": record}`` or
    ``{"deleted": id}``; ``before`` holds what the change replaced, so a client can offer to undo it."""
    action = done.action
    result = {"deleted": action.record_id} if action.kind == "delete" else {"updated": done.record}
    return {"status": "done", "action_id": action.id, "action": action.kind, "table": action.table,
            "result": result, "before": action.before, "changes": action.changes}


def _label(column: str) -> str:
    return column.replace("_", " ")


def _whole_numbers(value: Any) -> Any:
    """Both stores hand numbers back as floats; 450 reads better than 450.0 (and -0.0 is the 0 PostgreSQL keeps)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    return value


def _visible(char: str) -> str:
    """One character of JSON text as it shows: itself, or its JSON escape when it would show as nothing (outside a
    string only printable ASCII occurs, so every escape lands inside one)."""
    if char.isprintable() and ord(char) not in _INVISIBLE:
        return char
    code = ord(char)
    if code > 0xFFFF:  # JSON escapes a character past the BMP as its UTF-16 surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def too_large_to_show() -> str:
    """The tool error for a change whose summary would pass ``MAX_SUMMARY``: the user could not read it whole."""
    return (f"This change is too large to show the user for confirmation (more than {MAX_SUMMARY} characters); "
            "make it in smaller parts.")


def inexact_to_confirm(domain: Domain, columns: list[str]) -> str:
    """The tool error for a change ``inexact_columns`` found: it could be shown, but never confirmed as shown."""
    names = ", ".join(_label(column) for column in columns)
    return (f"This {domain.singular}'s {names} holds a number with more digits than the assistant can write back "
            "exactly (it was written outside the assistant), so this change cannot be prepared here. Tell the user "
            "to make it in the app.")
