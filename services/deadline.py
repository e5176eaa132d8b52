"""A deadline that moves often, kept by one timer: for per-stream timeouts on the hot path.

Setting and cancelling an asyncio timer around every frame of every stream was a measurable share of a burst's CPU
(bench/RESULTS.md). Here a deadline that moves later is an attribute write; the armed timer, when it fires early,
re-arms itself for the rest, so a stream of hundreds of frames costs a handful of timer callbacks. A deadline moved
earlier than the armed timer re-arms at once.

The timer holds its owner weakly: an owner dropped without cancelling (a viewer that left mid-send) is not kept in
memory until the timer is due.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable


class Deadline:
    """Calls ``expired`` once the event loop's clock has reached ``at``, if armed then. Not re-armed after that:
    the owner calls ``arm`` when it waits again."""

    __slots__ = ("_expired", "_loop", "_timer", "at")

    def __init__(self, expired: Callable[[], None], at: float = 0.0) -> None:
        self._loop = asyncio.get_running_loop()
        self._expired = weakref.WeakMethod(expired)  # type: ignore[arg-type]
        self._timer: asyncio.TimerHandle | None = None
        self.at = at  # on the event loop's clock

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_at(self.at, self._fire)

    def move(self, at: float) -> None:
        """Expire at ``at`` instead; an armed timer that would fire later than that is set again."""
        self.at = at
        if self._timer is not None and self._timer.when() > at:
            self.cancel()
            self.arm()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        if self._loop.time() < self.at:
            self.arm()  # moved later since it was armed
            return
        expired = self._expired()
        if expired is not None:  # else its owner is gone: nobody to tell
            expired()
