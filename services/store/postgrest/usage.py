"""The usage ledger over PostgREST (``migrations/013_usage_ledger.sql``): the budgets ``agent_run_begin`` checks, and
the caller's usage read back. The ledger's rows themselves ride ``agent_runs_flush`` (``rows.update_json``)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from services.store import Caller, TurnBudget, UsageReport
from services.store.postgrest.client import PostgrestClient
from services.store.postgrest.rows import bad_response

_COUNTS = frozenset(
    ("calls", "estimated_calls", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "tokens"))


def budget_json(budget: TurnBudget | None) -> dict[str, Any] | None:
    """``agent_run_begin``'s ``p_budget``: each limit with its period's start, and the turn's reservation."""
    if budget is None:
        return None
    return {
        "limits": [{"period": b.period, "unit": b.unit, "limit": b.limit, "since": b.since} for b in budget.limits],
        "reserve_tokens": budget.reserve_tokens,
        "reserve_cost": budget.reserve_cost,
    }


async def usage_report(rest: PostgrestClient, caller: Caller, since: float) -> UsageReport:
    """One RPC, as the caller: the function reads only their rows."""
    args = {"p_since": datetime.fromtimestamp(since, timezone.utc).isoformat()}
    result = await rest.rpc(caller, "agent_usage_report", args, idempotent=True)
    try:
        return UsageReport([_numbers(row) for row in result["by_model"]],
                           [_numbers(row) for row in result["by_conversation"]],
                           int(result["reserved_tokens"]), float(result["reserved_cost"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise bad_response() from exc


def _numbers(row: dict[str, Any]) -> dict[str, Any]:
    """PostgreSQL's sums as SQLite's: counts as int, cost as float (null stays None)."""
    return {key: (int(value) if key in _COUNTS else float(value) if key == "cost" and value is not None else value)
            for key, value in row.items()}
