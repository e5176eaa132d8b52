"""Tool results as the model reads them: bounded, each and together, so no store answer can swell a turn's prompt.

Every model call of a turn sends the whole conversation again, tool results included, and a list may return 100
records of up to 2,000 characters a text column (``services/agents/tools.py``): two such lists would send 3.7 million
characters in one call, past any model's input and 60-odd times the turn's budget reservation. So a result is cut to
``MAX_RESULT_CHARS`` and a turn's results together to ``MAX_TURN_CHARS``, counted as the request writes them (compact
JSON). A list keeps its first rows, a record its smaller fields, and the result says what was left out and how to
narrow the query; once the turn's share is spent (less than ``MIN_RESULT_CHARS`` left), no further tool runs.

The bounds, at the estimate's four characters a token (``services.model.estimate_tokens``): a turn's tool results
add at most about 12,000 tokens, the default ``HISTORY_TOKEN_BUDGET`` that a turn's budget reservation counts for
its history (``services/limits/budgets.py``), so the largest prompt of a turn is at most about twice what the
reservation counts for its input, far inside the models' input (Nova Lite 300,000 tokens, Nova Micro 128,000). One
result holds about 6,000 tokens: a list of some 40 ordinary records whole (of 500 characters or so; the default 20
easily), and two such results before the turn's share is spent.
"""

from __future__ import annotations

import json
from typing import Any

MAX_RESULT_CHARS = 24_000
MAX_TURN_CHARS = 48_000
MIN_RESULT_CHARS = 2_000  # less than this left of the turn's share holds no useful result: it is spent
_KEPT = frozenset({"id", "action_id", "status", "message", "error"})  # what says what happened: never left out

SPENT = (f"This turn's tools have returned all they may ({MAX_TURN_CHARS:,} characters), so this tool was not run. "
         "Answer with what you have, or ask the user to narrow the request.")


def size(value: Any) -> int:
    """``value``'s length as the model request writes it (services/model/converse.py: compact, not ASCII-escaped)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class ToolOutput:
    """What one turn's tool results may still add to its prompt, in characters."""

    def __init__(self, total: int = MAX_TURN_CHARS) -> None:
        self.left = total

    @property
    def spent(self) -> bool:
        return self.left < MIN_RESULT_CHARS

    def fit(self, content: dict[str, Any]) -> dict[str, Any]:
        """``content`` within what this result may hold, counted against the turn."""
        fitted = bounded(content, min(MAX_RESULT_CHARS, self.left))
        self.left -= size(fitted)
        return fitted


def bounded(content: dict[str, Any], limit: int) -> dict[str, Any]:
    """``content`` if it fits in ``limit`` characters, else a list's first rows or a record's smaller fields, and a
    note saying so. What says what happened (an id, a status, an error) is always kept, so a result cut to nothing
    more may pass ``limit`` by that little."""
    if size(content) <= limit:
        return content
    if isinstance(content.get("rows"), list):
        return _first_rows(content, limit)
    return _smaller_fields(content, limit)


def _first_rows(content: dict[str, Any], limit: int) -> dict[str, Any]:
    rows: list[Any] = content["rows"]
    kept: list[Any] = []
    room = limit - size({**content, "rows": [], "truncated": True, "found": len(rows),
                         "note": _rows_note(len(rows), len(rows))})
    for row in rows:
        room -= size(row) + 1  # and its comma
        if room < 0:
            break
        kept.append(row)
    return {**content, "count": len(kept), "rows": kept, "truncated": True, "found": len(rows),
            "note": _rows_note(len(kept), len(rows))}


def _rows_note(kept: int, found: int) -> str:
    return (f"Cut short: only the first {kept} of the {found} rows found fit here (a tool result holds at most "
            f"{MAX_RESULT_CHARS:,} characters, and one turn's tool results {MAX_TURN_CHARS:,}). Narrow the query "
            "with its filters or a smaller limit, or get one record by its id, to see the others.")


def _smaller_fields(content: dict[str, Any], limit: int) -> dict[str, Any]:
    """A record's result (``record``, ``created``) or any other without its largest fields, until it fits."""
    key = next((name for name in ("record", "created") if isinstance(content.get(name), dict)), None)
    fields = dict(content[key]) if key is not None else dict(content)
    left_out: list[str] = []

    def shaped() -> dict[str, Any]:
        note = {"left_out": left_out, "note": _fields_note()}
        return {**content, key: fields, **note} if key is not None else {**fields, **note}

    for name in sorted(fields, key=lambda name: size(fields[name]), reverse=True):
        if size(shaped()) <= limit:
            break
        if name not in _KEPT:
            del fields[name]
            left_out.append(name)
    return shaped()


def _fields_note() -> str:
    return (f"Cut short: the fields in left_out did not fit here (a tool result holds at most {MAX_RESULT_CHARS:,} "
            f"characters, and one turn's tool results {MAX_TURN_CHARS:,}). The user can see them in the app.")
