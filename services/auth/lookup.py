"""Asking Supabase Auth who a token belongs to (``AUTH_VERIFY=remote``), without letting forged tokens become load
on it: answers cached (refusals briefly too), one call per token at a time, 429s never retried, and the worker's
calls bounded overall (``LookupBudget``). ``AuthAPI``, the client of Supabase Auth's HTTP API, serves ``jwks.py`` too.

For the ``auth`` package only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio
import httpx

from errors import AppError, Unauthorized, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from services.auth.tokens import Token, invalid_token
from services.http_pool import ONE_CONNECTION, Connections, PoolBusy
from services.retry import RetryPolicy, retry_after_seconds, with_retry
from settings import Settings

logger = logging.getLogger(__name__)

CACHE_SIZE = 1024
LOOKUP_CONNECTIONS = 20  # to Supabase Auth, per worker (its calls are bounded by AUTH_LOOKUP_CONCURRENCY too)
CACHE_MAX_SECONDS = 60.0  # a revoked session is noticed within a minute even if its token lives an hour
NEGATIVE_CACHE_SECONDS = 60.0  # a refused token is refused again without asking Supabase Auth, for this long

T = TypeVar("T")


class _ExpiringCache(Generic[T]):
    """A bounded map (least recently used out first) whose entries each lapse at their own time."""

    def __init__(self, size: int) -> None:
        self._entries: OrderedDict[str, tuple[T, float]] = OrderedDict()
        self._size = size

    def get(self, key: str, now: float) -> T | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            self._entries.pop(key, None)
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: T, expires_at: float) -> None:
        self._entries[key] = (value, expires_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


@dataclass
class _Lookup:
    """One call to Supabase Auth in flight; requests with the same token wait for it instead of calling too."""

    done: anyio.Event = field(default_factory=anyio.Event)
    user_id: str | None = None
    error: AppError | None = None


def _worth_retrying(error: AppError) -> bool:
    # A 429 means Supabase Auth wants fewer calls: retrying it would triple the load that caused it. An exhausted
    # budget stays exhausted until its window ends.
    return error.retryable and error.code not in ("AUTH_THROTTLED", "AUTH_BUSY")


def auth_busy(retry_after: float) -> UpstreamUnavailable:
    return UpstreamUnavailable(
        "This worker's calls to Supabase Auth are at their limit (AUTH_LOOKUPS_PER_MINUTE, AUTH_LOOKUP_CONCURRENCY).",
        code="AUTH_BUSY", retry_after=max(1.0, retry_after)
    )


class LookupBudget:
    """This worker's calls to Supabase Auth, bounded overall: at most ``per_window`` in each fixed window of
    ``window_seconds`` and ``concurrent`` at once (a call waits at most ``wait`` seconds for a free slot).

    The per-address limit stops one client; this stops many addresses, or one rotating tokens, from making the
    service call Supabase Auth without bound (it limits by our address: a flood would break sign-in for everyone).
    Past the budget a token not already cached is a 503 ``AUTH_BUSY`` with ``Retry-After``; cached tokens, tokens
    checked locally (HS256) and cached refusals cost nothing and are never refused by it.
    """

    def __init__(
        self, per_window: int, window_seconds: float, concurrent: int, wait: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._per_window = per_window
        self._window = window_seconds
        self._slots = anyio.Semaphore(concurrent)
        self._wait = wait
        self._clock = clock
        self._window_start = self._logged = -1.0
        self._spent = 0

    @contextlib.asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        """One call: a slot first (a caller that gives up waiting for one spends nothing), then one of the window's."""
        await self._take_slot()
        try:
            self._spend()
            yield
        finally:
            self._slots.release()

    async def _take_slot(self) -> None:
        with anyio.move_on_after(self._wait):
            await self._slots.acquire()
            return
        raise auth_busy(1.0)

    def _spend(self) -> None:
        now = self._clock()
        start = now - now % self._window
        if start != self._window_start:
            self._window_start, self._spent = start, 0
        if self._spent >= self._per_window:
            if self._logged != start:  # once per window: a flood must not become a flood of log lines
                self._logged = start
                logger.warning("Supabase Auth lookups reached AUTH_LOOKUPS_PER_MINUTE (%d) this window",
                               self._per_window)
            raise auth_busy(start + self._window - now)
        self._spent += 1


class AuthAPI:
    """Supabase Auth's HTTP API (``{SUPABASE_URL}/auth/v1/``), at most ``connections`` requests at once; each holds one
    of ``services/http_pool.py``'s connections, so a request whose client leaves mid-call does not cost a connection."""

    def __init__(self, supabase_url: str, api_key: str, connections: int, timeout: float,
                 transport: httpx.AsyncBaseTransport | None) -> None:
        def client() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=supabase_url.rstrip("/") + "/auth/v1/", headers={"apikey": api_key} if api_key else {},
                timeout=httpx.Timeout(timeout, connect=min(5.0, timeout)), limits=ONE_CONNECTION, transport=transport)

        self._connections = Connections(connections, timeout, client)

    async def get(self, path: str, busy: AppError, headers: dict[str, str] | None = None) -> httpx.Response:
        """``GET path``; ``busy`` when no slot frees up in time."""
        try:
            return await self._connections.run(lambda http: http.get(path, headers=headers))
        except PoolBusy as exc:
            raise busy from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("Supabase Auth did not answer in time.", code="AUTH_TIMEOUT") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable("Supabase Auth is unreachable.", code="AUTH_UNAVAILABLE") from exc

    async def aclose(self) -> None:
        await self._connections.aclose()


class SupabaseUserLookup:
    """Asks Supabase Auth whether a token is good (``GET /auth/v1/user``); caches yes-answers, bounded, ≤ ``exp``.

    Supabase Auth verifies the signature with the project's current keys and also rejects logged-out sessions.
    Its 401/403 are the token's fault (``INVALID_TOKEN``), remembered for ``NEGATIVE_CACHE_SECONDS``; its 5xx or
    silence are ours (503/504, retried); its 429 is a 503 with its ``Retry-After``, not retried. Concurrent
    requests with one token share one call. Caches are keyed by a hash: they never hold a usable token.
    """

    def __init__(
        self, supabase_url: str, api_key: str, retry: RetryPolicy, *, timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None, clock: Callable[[], float] = time.time,
        cache_size: int = CACHE_SIZE, budget: LookupBudget | None = None
    ) -> None:
        self._api = AuthAPI(supabase_url, api_key, LOOKUP_CONNECTIONS, timeout, transport)
        self._retry = retry
        self._clock = clock
        self._known: _ExpiringCache[str] = _ExpiringCache(cache_size)
        self._refused: _ExpiringCache[bool] = _ExpiringCache(cache_size)
        self._lookups: dict[str, _Lookup] = {}
        self._budget = budget or LookupBudget(
            Settings.auth_lookups_per_minute, 60, Settings.auth_lookup_concurrency, timeout, clock
        )

    async def user_id(self, token: Token, expires_at: float, before_remote: Callable[[], None] | None = None) -> str:
        key = hashlib.sha256(token.raw.encode("utf-8")).hexdigest()
        while True:
            now = self._clock()
            if self._refused.get(key, now):
                raise invalid_token()
            known = self._known.get(key, now)
            if known is not None:
                return known
            lookup = self._lookups.get(key)
            if lookup is None:
                if before_remote is not None:
                    before_remote()
                return await self._look_up(key, token.raw, min(expires_at, now + CACHE_MAX_SECONDS))
            await lookup.done.wait()
            if lookup.user_id is not None:
                return lookup.user_id
            if lookup.error is not None:
                raise lookup.error
            # The request that was asking was cancelled before an answer came: ask again (one of us will).

    async def _look_up(self, key: str, raw: str, keep_until: float) -> str:
        lookup = self._lookups[key] = _Lookup()
        try:
            user_id = await with_retry(
                lambda: self._fetch(raw), self._retry, what="Supabase Auth /user", retryable=_worth_retrying
            )
            self._known.put(key, user_id, keep_until)
            lookup.user_id = user_id
            return user_id
        except AppError as exc:
            if isinstance(exc, Unauthorized):
                self._refused.put(key, True, self._clock() + NEGATIVE_CACHE_SECONDS)
            lookup.error = exc
            raise
        finally:
            # Also on cancellation: the waiters then find neither answer nor error and ask themselves.
            del self._lookups[key]
            lookup.done.set()

    async def aclose(self) -> None:
        await self._api.aclose()

    async def _fetch(self, raw: str) -> str:
        async with self._budget.call():  # every attempt counts, retries included
            response = await self._api.get("user", auth_busy(1.0), headers={"Authorization": f"Bearer {raw}"})
        if response.status_code in (401, 403):
            logger.info("Supabase Auth rejected a token (%s)", response.status_code)
            raise invalid_token()
        if response.status_code == 429:
            logger.warning("Supabase Auth answered 429 (not retried)")
            raise UpstreamUnavailable(
                "Supabase Auth is rate limiting token checks.", code="AUTH_THROTTLED",
                retry_after=retry_after_seconds(response.headers.get("retry-after")),
            )
        if response.status_code >= 500:
            logger.warning("Supabase Auth answered %s", response.status_code)
            raise UpstreamUnavailable("Supabase Auth is unavailable.", code="AUTH_UNAVAILABLE")
        if response.status_code == 200:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return str(uuid.UUID(str(response.json()["id"])))
        logger.warning("Supabase Auth answered %s with an unexpected body", response.status_code)
        raise UpstreamError("Supabase Auth gave an unexpected answer.", code="AUTH_UPSTREAM_ERROR")
