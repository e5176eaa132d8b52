"""The usage ledger in SQLite: a row per model call, written by the run's flushes; the budgets checked when a turn is
admitted; the caller's usage by model and conversation (``Store.begin_run``, ``flush_runs`` and ``usage_report``).

The table (``MIGRATION``, applied by ``SQLiteStore`` as migration 8) keeps the run's user and conversation ids but no
reference to either: deleting a conversation (which deletes its runs) must not refund what it cost. A row is unique by
(run, call index), so a flush sent again writes nothing twice. A run records what it reserved against the budgets
(``reserved_tokens``, ``reserved_cost``); while it runs, the part of that its calls have not used yet counts as used.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from services.store import USAGE_CONVERSATIONS, BudgetRefusal, Caller, CallUsage, RunBegun, TurnBudget, UsageReport

MIGRATION = """
CREATE TABLE agent_usage (
    run_id TEXT NOT NULL,
    call_index INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    agent_type TEXT NOT NULL,
    model_id TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cost REAL,
    estimated INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, call_index)
) WITHOUT ROWID;
CREATE INDEX agent_usage_user_time ON agent_usage (user_id, created_at);
ALTER TABLE agent_runs ADD COLUMN reserved_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agent_runs ADD COLUMN reserved_cost REAL NOT NULL DEFAULT 0;
"""

TOKENS = "input_tokens + output_tokens + cache_read_tokens + cache_write_tokens"
_AMOUNT = {"tokens": TOKENS, "cost": "coalesce(cost, 0)"}
# What the caller's running runs hold reserved beyond what their calls have used: (tokens, USD).
_RESERVED = (
    "SELECT coalesce(sum(max(0, r.reserved_tokens - coalesce(u.tokens, 0))), 0),"
    " coalesce(sum(max(0, r.reserved_cost - coalesce(u.cost, 0))), 0)"
    " FROM agent_runs r LEFT JOIN (SELECT run_id, sum(" + TOKENS + ") AS tokens, sum(cost) AS cost FROM agent_usage"
    " WHERE run_id IN (SELECT id FROM agent_runs WHERE user_id = ? AND status = 'running') GROUP BY run_id) u"
    " ON u.run_id = r.id WHERE r.user_id = ? AND r.status = 'running'"
)


def write_calls(
    db: sqlite3.Connection, run_id: str, user_id: str, conversation_id: str, calls: Sequence[CallUsage], now: float
) -> None:
    """The run's calls into the ledger under its own user and conversation (never the update's say)."""
    db.executemany(
        "INSERT OR IGNORE INTO agent_usage (run_id, call_index, user_id, conversation_id, agent_type, model_id,"
        " input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost, estimated, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(run_id, c.index, user_id, conversation_id, c.agent_type, c.model_id, c.input_tokens, c.output_tokens,
          c.cache_read_tokens, c.cache_write_tokens, c.cost, int(c.estimated), now) for c in calls],
    )


def budget_refusal(db: sqlite3.Connection, caller: Caller, budget: TurnBudget) -> RunBegun | None:
    """``budget_exceeded`` for the first budget this turn's reservation would pass, or None. Summed in one statement
    over the user's rows of the longest period (the (user_id, created_at) index)."""
    sums = ", ".join(f"coalesce(sum(CASE WHEN created_at >= ? THEN {_AMOUNT[limit.unit]} END), 0)"
                     for limit in budget.limits)
    used = db.execute(
        f"SELECT {sums} FROM agent_usage WHERE user_id = ? AND created_at >= ?",
        (*(limit.since for limit in budget.limits), caller.user_id, min(limit.since for limit in budget.limits)),
    ).fetchone()
    reserved = dict(zip(("tokens", "cost"), db.execute(_RESERVED, (caller.user_id, caller.user_id)).fetchone()))
    for limit, spent in zip(budget.limits, used):
        total = spent + reserved[limit.unit]
        reserve = budget.reserve_tokens if limit.unit == "tokens" else budget.reserve_cost
        if total + reserve > limit.limit:
            return RunBegun("budget_exceeded", budget=BudgetRefusal(limit.period, limit.unit, limit.limit, total))
    return None


def usage_report(db: sqlite3.Connection, caller: Caller, since: float) -> UsageReport:
    by_model = db.execute(
        "SELECT model_id, count(*) AS calls, sum(estimated) AS estimated_calls, sum(input_tokens) AS input_tokens,"
        " sum(output_tokens) AS output_tokens, sum(cache_read_tokens) AS cache_read_tokens,"
        " sum(cache_write_tokens) AS cache_write_tokens, sum(cost) AS cost FROM agent_usage"
        " WHERE user_id = ? AND created_at >= ? GROUP BY model_id ORDER BY model_id",
        (caller.user_id, since),
    ).fetchall()
    by_conversation = db.execute(
        f"SELECT conversation_id, count(*) AS calls, sum({TOKENS}) AS tokens, sum(cost) AS cost FROM agent_usage"
        " WHERE user_id = ? AND created_at >= ? GROUP BY conversation_id ORDER BY tokens DESC, conversation_id"
        " LIMIT ?",
        (caller.user_id, since, USAGE_CONVERSATIONS),
    ).fetchall()
    (conversations,) = db.execute(
        "SELECT count(DISTINCT conversation_id) FROM agent_usage WHERE user_id = ? AND created_at >= ?",
        (caller.user_id, since),
    ).fetchone()
    tokens, cost = db.execute(_RESERVED, (caller.user_id, caller.user_id)).fetchone()
    return UsageReport([dict(row) for row in by_model], [dict(row) for row in by_conversation], int(tokens),
                       float(cost), int(conversations))
