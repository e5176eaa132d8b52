"""Per-user rate limits and a cap on open streams, with the shared state in the store.

Limits must hold across several workers and machines, so nothing is counted in process memory: every decision
is one atomic statement in the store (``LimitStore``). SQLite does it with an upsert in one write transaction;
the Supabase store calls the Postgres functions in ``migrations/003_rate_limits.sql`` through PostgREST RPC.

- Requests are counted in fixed windows of ``RATE_LIMIT_WINDOW_SECONDS``: chat turns against
  ``RATE_LIMIT_CHAT_PER_MINUTE``, every other ``/api`` request against ``RATE_LIMIT_API_PER_MINUTE``. A refused
  request still counts (a client hammering the API stays refused until the window ends). Fixed windows allow up
  to twice the limit across a window boundary; that is the price of one row per user and one statement per check.
- Open streams are leases: a row per stream with an expiry. A stream's lease is released when its response ends;
  a lease whose worker died lapses after ``STREAM_LEASE_SECONDS``, so a crash cannot lock a user out for good.
- The subject is the authenticated caller (``Caller.user_id``). A request whose authentication failed is counted
  against its client address instead (``addr:<ip>``), so guessing tokens is limited too.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import anyio

from errors import AppError, RateLimited
from services.metrics import Metrics
from services.store import Caller

logger = logging.getLogger(__name__)

# Longer than any stream runs (a turn is bounded by the model's max tokens and idle timeouts); only a lease whose
# worker died ever reaches it.
STREAM_LEASE_SECONDS = 900
# When a stream slot frees up is unknowable; this is how soon a refused client should try again.
STREAM_RETRY_AFTER_SECONDS = 5.0


@runtime_checkable
class LimitStore(Protocol):
    """What a store implements so limits are shared by every worker that uses it."""

    async def rate_limit_hit(self, caller: Caller, bucket: str, window_seconds: int, limit: int) -> tuple[bool, float]:
        """Count one request of ``caller`` in ``bucket``; return (allowed, seconds until the window resets).

        A store that can only act as a signed-in user (PostgREST) returns ``(True, 0.0)`` for a caller without an
        access token; the edge (nginx ``limit_req``) limits anonymous traffic there.
        """
        ...

    async def stream_lease_acquire(self, caller: Caller, lease_id: str, limit: int, ttl_seconds: int) -> bool:
        """Take a stream slot unless ``caller`` already holds ``limit`` unexpired ones."""
        ...

    async def stream_lease_release(self, caller: Caller, lease_id: str) -> None:
        """Give the slot back (idempotent)."""
        ...

    async def admit_chat(
        self,
        caller: Caller,
        lease_id: str,
        *,
        window_seconds: int,
        chat_limit: int,
        stream_limit: int,
        ttl_seconds: int,
    ) -> tuple[bool, float, bool]:
        """``rate_limit_hit`` on the ``chat`` bucket and, only if that allowed it, ``stream_lease_acquire``, as one
        store call (a chat turn's admission is on its time to first token). Returns (allowed by the chat limit,
        seconds until its window resets, stream slot taken); a refused hit still counts and takes no slot.
        """
        ...


@dataclass(frozen=True, slots=True)
class StreamLease:
    store: LimitStore
    caller: Caller
    lease_id: str

    async def release(self) -> None:
        """Shielded and bounded: runs while the request may be cancelled; on failure the lease lapses by expiry."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await self.store.stream_lease_release(self.caller, self.lease_id)
            except (AppError, RuntimeError) as exc:  # RuntimeError: the store was closed at shutdown
                logger.warning("Could not release a stream lease (%s); it lapses on its own", type(exc).__name__)


class RateLimiter:
    def __init__(
        self,
        store: LimitStore | None,
        metrics: Metrics,
        *,
        chat_per_window: int,
        api_per_window: int,
        streams_per_user: int,
        window_seconds: int,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._chat_limit = chat_per_window
        self._api_limit = api_per_window
        self._stream_limit = streams_per_user
        self._window = window_seconds

    @property
    def enabled(self) -> bool:
        return self._store is not None

    async def admit(self, caller: Caller, *, chat: bool) -> StreamLease | None:
        """Count the request; raise ``RateLimited`` over a limit. A chat turn also gets a stream slot to release."""
        if self._store is None:
            return None
        if not chat:
            await self._count(caller, "api", self._api_limit)
            return None
        lease = StreamLease(self._store, caller, str(uuid.uuid4()))
        allowed, retry_after, taken = await self._store.admit_chat(
            caller,
            lease.lease_id,
            window_seconds=self._window,
            chat_limit=self._chat_limit,
            stream_limit=self._stream_limit,
            ttl_seconds=STREAM_LEASE_SECONDS,
        )
        if not allowed:
            self._metrics.rate_limited.inc("chat")
            raise RateLimited(retry_after=max(1.0, retry_after))
        if not taken:
            self._metrics.rate_limited.inc("streams")
            raise RateLimited(
                "Too many open streams for this user.",
                user_message="You already have the maximum number of answers in progress. Please wait for one to finish.",
                retry_after=STREAM_RETRY_AFTER_SECONDS,
            )
        return lease

    async def admit_unauthenticated(self, address: str) -> None:
        """Count a request whose authentication failed against its client address."""
        if self._store is not None:
            await self._count(Caller(user_id=f"addr:{address}"), "api", self._api_limit)

    async def _count(self, subject: Caller, bucket: str, limit: int) -> None:
        assert self._store is not None
        allowed, retry_after = await self._store.rate_limit_hit(subject, bucket, self._window, limit)
        if not allowed:
            self._metrics.rate_limited.inc(bucket)
            raise RateLimited(retry_after=max(1.0, retry_after))
