"""What the two backends (``sqlite/``, ``postgrest/``) share, written once: the parts of the ``Store`` contract that
do not depend on how rows are read, and how each call is timed for the metrics.

For the backends only; the rest of the service imports the records and the protocol (``services.store``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Concatenate, ParamSpec, TypeVar

from errors import ValidationFailed
from services.store import (TIMESTAMP_FORMAT, Conversation, ConversationKey, ConversationPage, Message, MessageKey,
                            MessagePage, NewRun, QueryObserver)

Row = TypeVar("Row")
P = ParamSpec("P")
T = TypeVar("T")


# A field whose column has another name in both stores: ``table`` is a reserved word in SQL.
_COLUMNS = {"table": "table_name"}


def wrong_branch_point(new: NewRun) -> ValidationFailed:
    """The refusal of a turn whose named message cannot be its branch point (docs/api.md, Branches), worded alike by
    both stores: each names the field sent and what it must name."""
    if new.regenerate_id is not None:  # an answer, and one to a user message: a model never answers its own
        return ValidationFailed("'regenerate_message_id' must name an answer to a user message.")
    if new.edit_id is not None:
        return ValidationFailed("'edit_message_id' must name a message of role user.")
    return ValidationFailed("'parent_message_id' must name a message of role assistant.")


def from_row(record: type[T], row: Any, **read: Callable[[Any], Any]) -> T:
    """The ``record`` (one of the store's dataclasses) a row holds in a column named as each field: a ``sqlite3.Row``
    or a JSON object PostgREST answered. Each value is taken as it is, or as ``read[field]`` reads it."""
    values = {name: read[name](row[column]) if name in read else row[column] for name, column in _fields(record)}
    return record(**values)


def columns(record: type, separator: str = ", ") -> str:
    """The columns ``from_row`` reads ``record`` from, in field order: what a store selects for it."""
    return separator.join(column for _, column in _fields(record))


@functools.cache
def _fields(record: type) -> tuple[tuple[str, str], ...]:
    return tuple((field.name, _COLUMNS.get(field.name, field.name)) for field in dataclasses.fields(record)
                 if field.metadata.get("column", True))


def epoch_timestamp(seconds: float) -> str:
    """Unix seconds (what SQLite keeps for runs and actions) as the API shows a timestamp (``TIMESTAMP_FORMAT``)."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime(TIMESTAMP_FORMAT)


def page_of_conversations(
    rows: Sequence[Row], limit: int, total: int, after: ConversationKey | None, decode: Callable[[Row], Conversation]
) -> ConversationPage:
    """A page of ``Store.list_conversations`` from ``limit + 1`` rows read nearest the cursor first (the extra one
    says whether more follow), in list order: rows read upwards from an ``after`` key are turned round."""
    conversations = [decode(row) for row in rows[:limit]]
    if after is not None:
        conversations.reverse()
    return ConversationPage(conversations, total, has_more=len(rows) > limit)


def reads_downwards(before: MessageKey | None, after: MessageKey | None, newest_first: bool) -> bool:
    """Whether a page of ``Store.message_page`` is read newest to oldest: from a ``before`` key outwards, or from the
    newest end when no key is given; ``page_of_messages`` then puts it in the order asked for."""
    return before is not None or (after is None and newest_first)


def page_of_messages(
    rows: Sequence[Row], limit: int, *, downwards: bool, newest_first: bool, key: Callable[[Row], MessageKey],
    decode: Callable[[Row], Message]
) -> MessagePage:
    """A page of ``Store.message_page`` from ``limit + 1`` rows read in the direction ``reads_downwards`` says."""
    page = rows[:limit]
    ascending = page[::-1] if downwards else page
    keys = [key(row) for row in ascending]
    messages = [decode(row) for row in ascending]
    if newest_first:
        messages.reverse()
    return MessagePage(
        messages, oldest=keys[0] if keys else None, newest=keys[-1] if keys else None, has_more=len(rows) > limit
    )


def with_siblings(page: MessagePage, children: Mapping[str, Sequence[str]], leaf: str | None) -> MessagePage:
    """``page`` with each message's siblings, its parent's ``children`` oldest first (``""``: the first messages'
    parent), and the branch's ``leaf``."""
    shown = [dataclasses.replace(m, sibling_ids=tuple(children.get(m.parent_id or "", [m.id]))) for m in page.messages]
    return dataclasses.replace(page, messages=shown, leaf_id=leaf)


class QueryTiming:
    """The part of a store that reports its calls' durations (``Store.set_query_observer``); see ``observed``."""

    kind: str
    _query_observer: QueryObserver | None = None

    def set_query_observer(self, observer: QueryObserver) -> None:
        self._query_observer = observer


S = TypeVar("S", bound=QueryTiming)


def observed(method: Callable[Concatenate[S, P], Awaitable[T]]) -> Callable[Concatenate[S, P], Awaitable[T]]:
    """Report how long a store method took to the store's query observer (store latency metrics), named by the
    method. Only the public methods are wrapped; they call each other's private parts, so one call is reported once."""

    @functools.wraps(method)
    async def timed(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        started = time.perf_counter()
        try:
            return await method(self, *args, **kwargs)
        finally:
            if self._query_observer is not None:
                self._query_observer(self.kind, method.__name__, time.perf_counter() - started)

    return timed
