"""The store's reads in PostgREST's query language: cursor filters, a domain's columns and order, equality filters,
and the owner's filter on every record. For ``store.py`` only.
"""

from __future__ import annotations

import uuid
from typing import Any

from services.domains import Domain
from services.store import Caller, ConversationKey, MessageKey


def conversation_seek(before: ConversationKey | None, after: ConversationKey | None) -> dict[str, str]:
    """Filters and order for the conversations older than ``before`` or newer than ``after`` in the list's order
    (``updated_at`` descending, then ``id``), nearest first."""
    if before is not None:
        return _seek("updated_at", before.updated_at, "lt", f"id.gt.{before.id}")
    assert after is not None
    return {**_seek("updated_at", after.updated_at, "gt", f"id.lt.{after.id}"), "order": "updated_at.asc,id.desc"}


def branch_seek(before: MessageKey | None, after: MessageKey | None) -> dict[str, Any]:
    """``agent_message_branch``'s arguments for the messages before or after a key (``created_at``, then ``seq``)."""
    if before is not None:
        return {"p_before_at": before.created_at, "p_before_seq": before.seq}
    if after is not None:
        return {"p_after_at": after.created_at, "p_after_seq": after.seq}
    return {}


def _seek(column: str, stamp: str, side: str, tie: str) -> dict[str, str]:
    """The rows on one ``side`` (``lt``, ``gt``) of a key: the first filter bounds the index range, ``or`` breaks ties
    on ``column`` by ``tie``. In the logic tree the timestamp is quoted (``tree_value``)."""
    return {column: f"{side}e.{stamp}", "or": f"({column}.{side}.{tree_value(stamp)},{tie})"}


def tree_value(value: str) -> str:
    """``value`` as one value of a logic tree (``or=(...)``, ``and=(...)``) or an ``in.(...)`` list, which PostgREST
    reads up to the next ``,`` or ``)`` unless it is double-quoted (``pQuotedValue``): always quoted, with ``\\`` and
    ``"`` escaped by a backslash, so no character of it is read as grammar. (A ``col=eq.<value>`` filter takes its
    value verbatim instead: ``filter_value``.)"""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- business records -------------------------------------------------------------------------------------------


def record_columns(domain: Domain) -> str:
    """The ``select`` of a domain: SQLite's column order (id, owner, declared columns, timestamps), nothing else."""
    return ",".join(("id", "user_id", *(c.name for c in domain.columns), "created_at", "updated_at"))


def record_order(domain: Domain) -> str:
    """The domain's order, then id. NULLs go where SQLite puts them: first ascending, last descending."""
    terms = [f"{name}.{direction}.{'nullsfirst' if direction == 'asc' else 'nullslast'}"
             for name, direction in domain.order_by]
    return ",".join([*terms, "id.asc"])


def filter_value(value: Any) -> str:
    """A value for ``col=eq.<value>``. PostgREST takes everything after ``eq.`` verbatim (``pSingleVal``), so commas,
    dots, parentheses and quotes need no quoting (quotes would become part of the value); httpx percent-encodes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def filter_column(domain: Domain, name: str) -> str:
    if domain.column(name) is None:
        # The tools only pass declared filters; anything else is a programming error, never sent as a parameter.
        raise ValueError(f"{name!r} is not a column of {domain.table}")
    return name


def owned(caller: Caller, record_id: str) -> dict[str, str]:
    """The primary-key filter, plus the owner (defence in depth: row-level security already hides other users')."""
    return {"id": f"eq.{record_id}", "user_id": f"eq.{caller.user_id}"}


def is_uuid(value: str) -> bool:
    """Whether PostgreSQL takes ``value`` as a uuid (in any of its spellings). Ids it would not take are answered as
    not found without a request, as SQLite answers them; one it takes is looked up."""
    try:
        uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return True
