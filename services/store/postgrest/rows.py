"""PostgREST's rows and RPC answers as the store's records, and a flush's updates and a turn's budgets as the RPCs'
arguments.

Rows come back as SQLite's do (``services/store/postgrest/store.py`` says why): timestamps in ``TIMESTAMP_FORMAT``
(PostgREST renders ``timestamptz`` as ``...+00:00`` and drops trailing zeros), run times as Unix seconds, business
records with SQLite's keys, key order and value types. Anything else the database answers is ``STORE_BAD_RESPONSE``.
For ``store.py`` only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any, TypeVar, get_args

from errors import ConversationNotFound, MessageNotFound, UpstreamError
from services.domains import BY_TABLE, Column, Domain
from services.store import (TIMESTAMP_FORMAT, USAGE_CONVERSATIONS, ActionDone, BeginOutcome, BudgetRefusal, CallUsage,
                            Conversation, Message, MessageKey, MessagePage, PendingAction, Run, RunBegun, RunControl,
                            RunUpdate, TurnBudget, UsageReport)
from services.store.numbers import as_double
from services.store.shared import from_row, page_of_messages, with_siblings

T = TypeVar("T")


def utc_timestamp(value: str | None) -> str | None:
    """PostgREST's ``timestamptz`` (``2026-11-24T01:49:20.9111+00:00``) as the API shows it (``TIMESTAMP_FORMAT``)."""
    if value is None:
        return None
    return _parsed(value).astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)


def _required_timestamp(value: str | None) -> str:
    stamp = utc_timestamp(value)
    if stamp is None:
        raise UpstreamError("The database returned a row without a timestamp.", code="STORE_BAD_RESPONSE")
    return stamp


def _epoch(value: str) -> float:
    """A ``timestamptz`` as JSON renders it (``2026-11-24T01:49:20.9111+00:00``) in Unix seconds, as SQLite keeps it."""
    return _parsed(value).timestamp()


def _parsed(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def settled(result: Any) -> Any:
    """A function's answer, its refusals of a conversation or a message raised as the store's errors (SQLite's)."""
    outcome = result.get("outcome") if isinstance(result, dict) else None
    if outcome == "not_found":
        raise ConversationNotFound()
    if outcome == "message_not_found":
        raise MessageNotFound()
    return result


def bad_response() -> UpstreamError:
    return UpstreamError("The database returned an unexpected result.", code="STORE_BAD_RESPONSE")


def _bad_row() -> UpstreamError:
    return UpstreamError("The database returned an unexpected row.", code="STORE_BAD_RESPONSE")


@contextlib.contextmanager
def reading(*also: type[Exception], bad: Callable[[], UpstreamError] = bad_response) -> Iterator[None]:
    """An answer of the wrong shape (a key missing, a value of the wrong type: ``KeyError``, ``ValueError``,
    ``TypeError`` and ``also``) raised as ``bad()``, ``STORE_BAD_RESPONSE``."""
    try:
        yield
    except (KeyError, ValueError, TypeError, *also) as exc:
        raise bad() from exc


def _decoded(record: type[T], row: Any, bad: Callable[[], UpstreamError] = bad_response, **read: Any) -> T:
    with reading(bad=bad):
        return from_row(record, row, **read)


def conversation_of(row: dict[str, Any]) -> Conversation:
    return _decoded(
        Conversation, row, _bad_row, created_at=_required_timestamp,
        updated_at=lambda value: utc_timestamp(row["created_at"] if value is None else value),
        last_message_at=utc_timestamp, message_count=lambda value: value or 0, metadata=lambda value: value or {},
    )


def message_of(row: dict[str, Any]) -> Message:
    return _decoded(Message, row, _bad_row, metadata=lambda value: value or {}, created_at=_required_timestamp)


def message_key_of(row: dict[str, Any]) -> MessageKey:
    with reading():
        return MessageKey(_required_timestamp(row["created_at"]), int(row["seq"]))


BEGIN_OUTCOMES: frozenset[BeginOutcome] = frozenset(get_args(BeginOutcome))


def run_begun_of(result: Any) -> RunBegun:
    """``agent_run_begin``'s answer as ``RunBegun`` (its ``not_found`` is raised by the caller)."""
    with reading(AttributeError):
        outcome = result["outcome"]
        if outcome not in BEGIN_OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        run = run_of(result["run"]) if result.get("run") is not None else None
        history = [message_of(row) for row in result.get("history") or []]
        budget = None
        if outcome == "budget_exceeded":
            budget = BudgetRefusal(result["period"], result["unit"], float(result["limit"]), float(result["used"]))
        return RunBegun(outcome, run, history, float(result.get("retry_after") or 0.0), budget)


def run_of(row: dict[str, Any]) -> Run:
    return _decoded(Run, row, last_seq=int, heartbeat_at=_epoch)


def controls_of(rows: Any) -> dict[str, RunControl]:
    with reading():
        return {
            str(row["run_id"]): RunControl(
                stop=bool(row["stop"]), seen_chars=None if row["seen_chars"] is None else int(row["seen_chars"]),
                gone=bool(row["gone"]), deleted=bool(row.get("deleted")), applied=bool(row.get("applied"))
            )
            for row in rows
        }


def update_json(update: RunUpdate, write_key: str) -> dict[str, Any]:
    """One element of ``agent_runs_flush``'s ``p_updates``; the batch is flattened into its three fields. The run's
    answer is the one its begin wrote, so the message id is not sent."""
    batch = update.batch
    return {
        "run_id": update.run_id,
        "write_key": write_key,
        "first_seq": batch.first_seq if batch is not None else None,
        "last_seq": batch.last_seq if batch is not None else None,
        "frames": batch.frames if batch is not None else None,
        "content": update.content,
        "metadata": update.metadata,
        "agent_type": update.agent_type,
        "heartbeat": update.heartbeat,
        "final_status": update.final_status,
        **({"calls": [call_json(call) for call in update.calls]} if update.calls else {}),
    }


def call_json(call: CallUsage) -> dict[str, Any]:
    """One row of the usage ledger, as ``agent_runs_flush`` takes it (migrations/013_usage_ledger.sql)."""
    return {"call_index": call.index, "agent_type": call.agent_type, "model_id": call.model_id,
            "input_tokens": call.input_tokens, "output_tokens": call.output_tokens,
            "cache_read_tokens": call.cache_read_tokens, "cache_write_tokens": call.cache_write_tokens,
            "cost": call.cost, "estimated": call.estimated}


def pending_action_of(row: dict[str, Any]) -> PendingAction:
    return _decoded(PendingAction, row, created_at=_required_timestamp,
                    expires_at=_required_timestamp, used_at=utc_timestamp)


def action_done_of(result: dict[str, Any]) -> ActionDone:
    """``pending_action_confirm``'s ``done``: the updated row is decoded as ``update_record`` decodes PostgREST's."""
    with reading():
        action = pending_action_of(result["action"])
        domain = BY_TABLE[action.table]
        record = None if action.kind == "delete" else record_of(domain, result["record"])
    return ActionDone(action, record)


def record_of(domain: Domain, row: dict[str, Any]) -> dict[str, Any]:
    """A PostgREST row as SQLite's ``_decode`` returns it: same keys in the same order, same value types, but for
    what only PostgreSQL holds, read whole: a numeric no double holds is its text (``services/store/numbers.py``),
    a time with seconds ``HH:MM:SS``."""
    with reading(bad=_bad_row):
        record: dict[str, Any] = {"id": row["id"], "user_id": row["user_id"]}
        for column in domain.columns:
            record[column.name] = _value(column, row[column.name])
        record["created_at"] = utc_timestamp(row["created_at"])
        record["updated_at"] = utc_timestamp(row["updated_at"])
    return record


def _time(value: Any) -> str:
    """PostgreSQL's time (``09:30:00``) as the tools write it (``HH:MM``) when that is all it holds; one with seconds
    (``09:30:15``, ``09:30:15.5``, written through the Data API) whole, so it is shown, and compared when a change is
    confirmed, as it is."""
    text = str(value)
    return text[:5] if text[5:] in ("", ":00") else text


_READ_VALUE: dict[str, Callable[[Any], Any]] = {"number": as_double, "integer": int, "time": _time}


def _value(column: Column, value: Any) -> Any:
    """numeric → float (SQLite's REAL; PostgREST sends numerics as JSON numbers, ints when whole) or its exact text;
    time → ``HH:MM`` unless it has seconds; dates, uuids, text and jsonb already read as SQLite's do (a jsonb number
    no double holds is already its text: the client reads every answer so)."""
    read = _READ_VALUE.get(column.type)
    return value if value is None or read is None else read(value)


def branch_page_of(result: Any, limit: int, downwards: bool, newest_first: bool) -> MessagePage:
    """``agent_message_branch``'s page (``migrations/012_branches.sql``) as ``MessagePage``, each message with its
    siblings; its refusals are raised by the caller."""
    with reading(AttributeError):
        siblings: dict[str, list[str]] = result["siblings"]
        page = page_of_messages(result["rows"], limit, downwards=downwards, newest_first=newest_first,
                                key=message_key_of, decode=message_of)
        return with_siblings(page, siblings, result["leaf"])


def budget_json(budget: TurnBudget | None) -> dict[str, Any] | None:
    """``agent_run_begin``'s ``p_budget``: each limit with its period's start, and the turn's reservation."""
    if budget is None:
        return None
    return {
        "limits": [{"period": b.period, "unit": b.unit, "limit": b.limit, "since": b.since} for b in budget.limits],
        "reserve_tokens": budget.reserve_tokens,
        "reserve_cost": budget.reserve_cost,
    }


_COUNTS = frozenset(
    ("calls", "estimated_calls", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "tokens"))


def usage_report_of(result: Any) -> UsageReport:
    """``agent_usage_report``'s answer (``migrations/018_usage_report_bounded.sql``; ``013``'s, which lists every
    conversation and no count of them, is cut to the same shape here)."""
    with reading():
        listed = result["by_conversation"]
        return UsageReport([_numbers(row) for row in result["by_model"]],
                           [_numbers(row) for row in listed[:USAGE_CONVERSATIONS]],
                           int(result["reserved_tokens"]), float(result["reserved_cost"]),
                           int(result.get("by_conversation_total", len(listed))))


def _numbers(row: dict[str, Any]) -> dict[str, Any]:
    """PostgreSQL's sums as SQLite's: counts as int, cost as float (null stays None)."""
    return {key: (int(value) if key in _COUNTS else float(value) if key == "cost" and value is not None else value)
            for key, value in row.items()}
