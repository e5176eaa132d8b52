"""Per-user rate limits and a cap on open streams, with the shared state in the store (docs/operations.md, "Limits").

Limits must hold across several workers and machines, so nothing is counted in process memory: every decision
is one atomic statement in the store (``Store.rate_limit_hit``). Requests are counted in fixed windows: one row per
user and one statement per check, at the price of up to twice the limit across a window boundary. A refused request
still counts, so a client hammering the API stays refused until the window ends. Stream slots are the user's running
chat runs, so a slot frees when its run ends, or its heartbeat lapses when its worker died. A chat turn's limits are
checked inside ``Store.begin_run``'s transaction (``turn_limits``), after the idempotency check. A request no user
can be counted for (its authentication failed; with authentication off, its body names no valid user) is counted
against its client address (``addr:<ip>``), so guessing tokens and sending garbage are limited too.
"""

from __future__ import annotations

import logging
import time

from errors import RateLimited, UpstreamUnavailable
from services.metrics import Metrics
from services.store import Caller, RunBegun, Store, TurnBudget, TurnLimits
from settings import Settings

logger = logging.getLogger(__name__)

FALLBACK_LOG_SECONDS = 60.0  # while limits are counted in memory, say so at most this often
# Per limit: the error's message, and what the user is told when it is not the default.
LIMIT_MESSAGES: dict[str, tuple[str, str | None]] = {
    "chat": ("Too many chat turns in this window (RATE_LIMIT_CHAT_PER_MINUTE).", None),
    "api": ("Too many API requests in this window (RATE_LIMIT_API_PER_MINUTE).", None),
    "streams": ("Too many answers in progress for this user (MAX_STREAMS_PER_USER).",
                "You already have the maximum number of answers in progress. Please wait for one to finish."),
}


class RateLimiter:
    def __init__(self, store: Store, metrics: Metrics, settings: Settings) -> None:
        self._store = store
        self._metrics = metrics
        self._chat_limit = settings.rate_limit_chat_per_minute
        self._api_limit = settings.rate_limit_api_per_minute
        self._stream_limit = settings.max_streams_per_user
        self._window = settings.rate_limit_window_seconds
        self._failures = WindowCounter()
        self._fallback = WindowCounter()
        self._fallback_logged = -FALLBACK_LOG_SECONDS

    async def admit(self, caller: Caller) -> None:
        """Count one ``/api`` request; raise ``RateLimited`` over the limit. Chat turns use ``turn_limits``."""
        await self._count(caller, "api", self._api_limit)

    def turn_limits(self, stale_seconds: float, events_ttl: float, budget: TurnBudget | None = None) -> TurnLimits:
        """What ``Store.begin_run`` checks for a chat turn, with its ``budget``."""
        return TurnLimits(stale_seconds, events_ttl, self._window, self._chat_limit, self._stream_limit, budget)

    def refused(self, begun: RunBegun) -> RateLimited:
        """The 429 for a turn ``begin_run`` refused (``rate_limited`` or ``streams_full``), counted in the metrics."""
        if begun.outcome == "rate_limited":
            return self._refusal("chat", self._chat_limit, begun.retry_after)
        return self._refusal("streams", self._stream_limit, begun.retry_after)

    def check_address(self, address: str) -> None:
        """Refuse an address whose requests failed before authentication ``API`` times this window, in process and
        before any remote call: a flood of forged tokens must not reach Supabase Auth (which limits by our address,
        so one attacker would break sign-in checks for everyone)."""
        allowed, retry_after = self._failures.peek(f"addr:{address}", self._window, self._api_limit)
        if not allowed:
            raise self._refusal("api", self._api_limit, retry_after)

    async def admit_unauthenticated(self, address: str) -> None:
        """Count a request no user can be counted for (a bad token; with authentication off, a body naming no valid
        user) against its client address; raise ``RateLimited`` over the limit. Counted in process first, where
        ``check_address`` reads it and where a flood is refused without a store write (the store cannot count
        anonymous subjects everywhere), then in the store, shared by every worker where it can."""
        allowed, retry_after = self._failures.hit(f"addr:{address}", self._window, self._api_limit)
        if not allowed:
            raise self._refusal("api", self._api_limit, retry_after)
        await self._count(Caller(user_id=f"addr:{address}"), "api", self._api_limit)

    async def _count(self, subject: Caller, bucket: str, limit: int) -> None:
        try:
            allowed, retry_after = await self._store.rate_limit_hit(subject, bucket, self._window, limit)
        except UpstreamUnavailable as exc:
            # The store cannot write (disk full, read-only, down): reads must keep working, so this worker counts
            # in memory until it can again. Limits then hold per worker, not across workers.
            self._log_fallback(exc.code)
            allowed, retry_after = self._fallback.hit(f"{subject.user_id}:{bucket}", self._window, limit)
        if not allowed:
            raise self._refusal(bucket, limit, retry_after)

    def _refusal(self, name: str, limit: int, retry_after: float) -> RateLimited:
        """A 429 that says which limit was hit (``chat``, ``api`` or ``streams``), counted in the metrics."""
        self._metrics.rate_limited.inc(name)
        message, user_message = LIMIT_MESSAGES[name]
        return RateLimited(message, user_message=user_message, retry_after=max(1.0, retry_after),
                           details={"limit": name}, limit=limit)

    def _log_fallback(self, code: str) -> None:
        now = time.monotonic()
        if now - self._fallback_logged >= FALLBACK_LOG_SECONDS:
            self._fallback_logged = now
            logger.warning("Rate limits are counted in this worker's memory: the store cannot count them (%s)", code)


class WindowCounter:
    """Fixed-window counts in this worker's memory, bounded in size: the failed-authentication guard, and the
    rate-limit fallback while the store cannot write."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self._counts: dict[str, tuple[float, int]] = {}
        self._max_keys = max_keys

    def hit(self, key: str, window_seconds: int, limit: int) -> tuple[bool, float]:
        """Count one; (allowed, seconds until the window ends)."""
        start, remaining = _window(window_seconds)
        held = self._counts.get(key)
        hits = held[1] + 1 if held is not None and held[0] == start else 1
        if held is None and len(self._counts) >= self._max_keys:
            self._forget_before(start)
        self._counts[key] = (start, hits)
        return hits <= limit, remaining

    def peek(self, key: str, window_seconds: int, limit: int) -> tuple[bool, float]:
        """Would one more be allowed? Counts nothing."""
        start, remaining = _window(window_seconds)
        held = self._counts.get(key)
        hits = held[1] if held is not None and held[0] == start else 0
        return hits < limit, remaining

    def _forget_before(self, start: float) -> None:
        self._counts = {key: held for key, held in self._counts.items() if held[0] >= start}
        if len(self._counts) >= self._max_keys:  # all current: forget them rather than grow without bound
            self._counts.clear()


def _window(window_seconds: int) -> tuple[float, float]:
    now = time.time()
    start = float(int(now // window_seconds) * window_seconds)
    return start, start + window_seconds - now
