"""Exponential backoff with full jitter, shared by the model client and the store.

Attempt ``n`` (counting from 0) waits a random time in ``[0, min(max_delay, base_delay * 2**n)]`` ("full jitter",
from the AWS Architecture Blog's "Exponential Backoff And Jitter"), so many clients throttled at once do not retry
in lockstep. Only errors whose ``retryable`` flag is set are retried (throttling, 5xx, timeouts, connection
errors), never validation or access errors; the whole retry sequence is bounded by ``max_total`` seconds.
Each retry is logged at WARNING with the error code, never the error text.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from errors import AppError
from services.metrics import record_retry
from settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


def retry_after_seconds(value: str | None) -> float | None:
    """An upstream's ``Retry-After`` as seconds, or None unless it is delta-seconds (RFC 9110: digits alone, here at
    most five, about a day). Gateways send HTTP-dates, fractions, signs, even ``inf``: none of those reaches a
    client's envelope or a wait of ours."""
    if value is None or not (value.isascii() and value.isdigit() and len(value) <= 5):
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 4.0
    max_total: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            attempts=settings.max_retry_attempts,
            base_delay=settings.retry_base_delay,
            max_delay=settings.retry_max_delay,
            max_total=settings.retry_max_total,
        )

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt ``attempt`` (0-based): full jitter under an exponential cap."""
        return random.random() * min(self.max_delay, self.base_delay * (2**attempt))


def is_retryable(error: AppError) -> bool:
    return error.retryable


async def with_retry(
    operation: Callable[[], Awaitable[T]], policy: RetryPolicy, *, what: str,
    retryable: Callable[[AppError], bool] = is_retryable
) -> T:
    """Await ``operation()``, retrying retryable ``AppError``s under ``policy``; the last error is re-raised."""
    deadline = time.monotonic() + policy.max_total
    attempt = 0
    while True:
        try:
            return await operation()
        except AppError as exc:
            attempt += 1
            delay = policy.delay(attempt - 1)
            if attempt >= policy.attempts or not retryable(exc) or time.monotonic() + delay > deadline:
                raise
            logger.warning(
                "%s failed with %s (attempt %d of %d); retrying in %.2fs", what, exc.code, attempt, policy.attempts,
                delay,
            )
            # Counted through the request's metrics context (services/metrics.py says why this is not an argument).
            record_retry(exc.code)
            await anyio.sleep(delay)
