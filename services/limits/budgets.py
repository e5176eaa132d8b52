"""Usage budgets: per user, per UTC day and month, in tokens and in USD, off unless set (``BUDGET_*``).

A turn is admitted inside ``Store.begin_run``'s transaction, after the idempotency check, when what the caller has
used this period (the usage ledger, plus what their running turns hold reserved) plus this turn's reservation stays
within every budget. The reservation (the message's estimate, the whole ``HISTORY_TOKEN_BUDGET`` and
``BEDROCK_MAX_TOKENS``, priced at the dearest model in use) stops counting once the run ends, when its ledger rows are
what it cost: an admission bound, not a cap, since a tool turn of several calls may use more (docs/operations.md).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from errors import BudgetExceeded
from services.metrics import Metrics
from services.model import estimate_tokens
from services.store import (TIMESTAMP_FORMAT, BudgetLimit, BudgetPeriod, BudgetUnit, RunBegun, TurnBudget,
                            UsageReport)
from settings import ModelPrice, Settings

PERIOD_NAMES = {"day": "today", "month": "this month"}


def period_bounds(period: BudgetPeriod, now: datetime) -> tuple[datetime, datetime]:
    """The UTC period holding ``now``: (its start, the next one's start)."""
    if period == "day":
        start = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = now.astimezone(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


def _amount(unit: BudgetUnit, value: float) -> float | int:
    """A budget's figure as shown: whole tokens, or USD to the micro-dollar."""
    return int(value) if unit == "tokens" else round(value, 6)


class Budgets:
    """The settings' budgets, one per app (``request.state.budgets``)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._metrics = metrics
        given: dict[tuple[BudgetPeriod, BudgetUnit], float] = {
            ("day", "tokens"): settings.budget_day_tokens, ("month", "tokens"): settings.budget_month_tokens,
            ("day", "cost"): settings.budget_day_cost, ("month", "cost"): settings.budget_month_cost}
        self.limits = {key: float(value) for key, value in given.items() if value > 0}
        self._reserve_input = settings.history_token_budget
        self._reserve_output = settings.bedrock_max_tokens
        prices = [settings.model_prices[m] for m in settings.models_in_use if m in settings.model_prices]
        # A turn's reservation is priced at the dearest input and output rates of the models it may call.
        self._dearest = ModelPrice(input=max((p.input for p in prices), default=0.0),
                                   output=max((p.output for p in prices), default=0.0))

    def limit(self, period: BudgetPeriod, unit: BudgetUnit) -> float | None:
        return self.limits.get((period, unit))

    def for_turn(self, text: str) -> TurnBudget | None:
        """What ``begin_run`` checks for a turn sending ``text``; None when no budget is set (no work at all)."""
        if not self.limits:
            return None
        now = datetime.now(timezone.utc)
        limits = tuple(BudgetLimit(period, unit, limit, period_bounds(period, now)[0].timestamp())
                       for (period, unit), limit in self.limits.items())
        tokens_in = estimate_tokens(text) + self._reserve_input
        cost = self._dearest.cost(tokens_in, self._reserve_output)
        return TurnBudget(limits, tokens_in + self._reserve_output, cost)

    def below_one_turn(self) -> list[str]:
        """Why each budget set below what the smallest turn reserves refuses every turn (startup warns of them)."""
        least = self.for_turn("")
        if least is None:
            return []
        reasons = []
        for (period, unit), limit in self.limits.items():
            reserve = least.reserve_tokens if unit == "tokens" else least.reserve_cost
            if reserve > limit:
                what = f"{reserve} tokens" if unit == "tokens" else f"{round(reserve, 6)} USD at the dearest prices"
                reasons.append(f"BUDGET_{period.upper()}_{unit.upper()} is below what one chat turn reserves ({what}: "
                               "HISTORY_TOKEN_BUDGET, BEDROCK_MAX_TOKENS and the message): every chat turn is refused "
                               "with BUDGET_EXCEEDED")
        return reasons

    def refused(self, begun: RunBegun) -> BudgetExceeded:
        """The 429 for a turn ``begin_run`` refused as ``budget_exceeded``, counted in the metrics."""
        assert begun.budget is not None
        refusal = begun.budget
        now = datetime.now(timezone.utc)
        resets = period_bounds(refusal.period, now)[1]
        self._metrics.budget_refusals.inc(refusal.period, refusal.unit)
        budget, used = _amount(refusal.unit, refusal.limit), _amount(refusal.unit, refusal.used)
        what = "tokens" if refusal.unit == "tokens" else "USD"
        return BudgetExceeded(
            f"The {refusal.period}'s budget of {budget} {what} is spent (BUDGET_"
            f"{refusal.period.upper()}_{refusal.unit.upper()}).",
            user_message=f"You've reached your usage limit for {PERIOD_NAMES[refusal.period]}. It resets at "
                         f"{resets.strftime('%Y-%m-%d %H:%M')} UTC.",
            retry_after=(resets - now).total_seconds(),
            details={"limit": "budget", "period": refusal.period, "unit": refusal.unit, "budget": budget, "used": used,
                     "resetsAt": _stamp(resets)},
        )

    def usage_json(self, period: BudgetPeriod, report: UsageReport, now: datetime) -> dict[str, Any]:
        """``GET /api/usage``: the period's usage (the ledger), what running turns hold reserved, each budget's limit
        and what remains of it (None when that budget is off), by model and by conversation (the
        ``USAGE_CONVERSATIONS`` most used, and how many there are)."""
        since, resets = period_bounds(period, now)
        tokens = sum(int(row["input_tokens"]) + int(row["output_tokens"]) + int(row["cache_read_tokens"])
                     + int(row["cache_write_tokens"]) for row in report.by_model)
        cost = round(sum(row["cost"] or 0.0 for row in report.by_model), 10)
        used = {"tokens": tokens, "cost": cost}
        reserved = {"tokens": report.reserved_tokens, "cost": round(report.reserved_cost, 10)}
        limits = {unit: self.limit(period, unit) for unit in ("tokens", "cost")}
        remaining = {unit: None if limit is None else max(0.0, limit - used[unit] - reserved[unit])
                     for unit, limit in limits.items()}
        if limits["tokens"] is not None:
            limits["tokens"], remaining["tokens"] = int(limits["tokens"]), int(remaining["tokens"] or 0)
        return {"period": period, "since": _stamp(since), "resets_at": _stamp(resets), "used": used,
                "reserved": reserved, "limit": limits, "remaining": remaining, "by_model": report.by_model,
                "by_conversation": report.by_conversation, "by_conversation_total": report.conversations}


def _stamp(moment: datetime) -> str:
    return moment.strftime(TIMESTAMP_FORMAT)
