"""Viewers of a run: ``LiveFeed`` from this worker's memory while the run generates here, ``StoredFeed`` from the
store otherwise (through the ``RunPoll`` this worker's viewers of one run share). Either is a ``RunFeed``, which the
SSE response (``web/sse.py``) follows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from errors import AppError, ConversationDeleted, NotFound
from services.deadline import Deadline
from services.runs.live import LiveRun, settle
from services.store import Caller, EventBatch, Run, RunView, Store
from services.store.run_log import SUPERVISOR, error_chunk, frame, frames_after, stopped_replay

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often a viewer of a run on another worker reads the store


def deleted_frame(run_id: str) -> str:
    """What a viewer of a run whose conversation was deleted is told last: no id, as the run's log went with it."""
    return frame(None, error_chunk(ConversationDeleted(), SUPERVISOR, run_id=run_id))


class LiveFeed:
    """A viewer of a run generating on this worker, from memory. Its timeout is a ``Deadline``: one timer however
    many frames come, held weakly (services/deadline.py)."""

    __slots__ = ("__weakref__", "_deadline", "_live", "_waiter")

    def __init__(self, live: LiveRun) -> None:
        self._live = live
        self._waiter: asyncio.Future[None] | None = None  # while waiting
        self._deadline = Deadline(self._timed_out)

    @property
    def outcome(self) -> str:
        return self._live.status

    async def next_frames(self, after: int, timeout: float) -> tuple[str, int, bool]:
        """Frames after ``after`` (waiting up to ``timeout`` for one), the new cursor, and whether the run is over."""
        live = self._live
        live.seal()
        # A viewer resuming past what is visible waits for a frame after its own cursor, not for any new frame:
        # otherwise every frame in between would wake it for nothing but a ping.
        ends = asyncio.get_running_loop().time() + timeout
        while after >= live.visible and not live.ended:
            remaining = ends - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            await self._wait(remaining)
            live.seal()
        upto = live.visible
        text = "".join(live.shown[after:upto]) if upto > after else ""
        over = live.ended and max(after, upto) >= (upto if live.farewell is not None else len(live.frames))
        if over:
            self._deadline.cancel()
            # A resume at or past the end still ends with the terminal event, so the client learns the run is over.
            text = text + live.farewell if live.farewell is not None else text or live.frames[-1]
        return text, max(after, upto), over

    async def _wait(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadline.move(loop.time() + timeout)
        self._deadline.arm()
        self._waiter = loop.create_future()
        try:
            await self._live.wait(self._waiter)
        finally:
            self._waiter = None

    def _timed_out(self) -> None:
        if self._waiter is not None:  # else the viewer is sending, or has left: its next wait arms it again
            settle(self._waiter)


class RunPoll:
    """The store's view of one run, read for all of this worker's viewers of it: a read younger than
    ``POLL_SECONDS``, or one under way, from a cursor at or before a viewer's serves that viewer too. Viewers that
    follow a run together therefore cost the store one read per ``POLL_SECONDS``, however many there are (each
    reading for itself, 100 viewers took 1.4 cores of a Supabase database)."""

    __slots__ = ("__weakref__", "_read", "_reading", "_run_id", "_store")

    def __init__(self, store: Store, run_id: str) -> None:
        self._store, self._run_id = store, run_id
        self._read: tuple[int, float, RunView] | None = None  # the last read: its cursor, when, what it found
        self._reading: tuple[int, asyncio.Task[RunView]] | None = None  # the read under way, from its cursor

    async def read(self, caller: Caller, after: int) -> RunView:
        """The run with its events after ``after`` at most (more when shared): ``frames_after`` picks a viewer's."""
        if self._reading is not None and self._reading[0] <= after:
            return await asyncio.shield(self._reading[1])  # a viewer that leaves does not cancel it for the others
        if self._read is not None and self._read[0] <= after and time.monotonic() - self._read[1] < POLL_SECONDS:
            return self._read[2]
        task = asyncio.ensure_future(self._store.read_run(caller, self._run_id, after))
        self._reading = (after, task)
        task.add_done_callback(lambda done: self._settled(after, done))
        return await asyncio.shield(task)

    def forget(self) -> None:
        """The store has just changed the run (a dead run was ended): the next read goes to the store."""
        self._read = None

    def _settled(self, after: int, task: asyncio.Task[RunView]) -> None:
        if self._reading is not None and self._reading[1] is task:
            self._reading = None
        if not task.cancelled() and task.exception() is None:  # a failure reaches its waiters, if any are left
            self._read = (after, time.monotonic(), task.result())


class StoredFeed:
    """A viewer of a run generating elsewhere (another worker or machine) or already over, from the store (through
    the ``RunPoll`` this worker's viewers of the run share)."""

    def __init__(self, store: Store, poll: RunPoll, caller: Caller, run_id: str,
                 maintain: Callable[[Caller, Run], Any]) -> None:
        self._store = store
        self._poll = poll
        self._caller = caller
        self._run_id = run_id
        self._maintain = maintain
        self.outcome = "running"

    async def next_frames(self, after: int, timeout: float) -> tuple[str, int, bool]:
        try:
            return await self._next_frames(after, timeout)
        except NotFound:
            # The run went with its conversation while being watched: say so, and end.
            self.outcome = "deleted"
            return deleted_frame(self._run_id), after, True
        except AppError as exc:
            # The store failed mid-stream: the stream ends with a retryable error (no id: not part of the run's log),
            # never cut without a word; the client resumes from its Last-Event-ID.
            logger.warning("Could not read a chat run for its viewer (%s)", exc.code)
            self.outcome = "error"
            return frame(None, error_chunk(exc, SUPERVISOR, run_id=self._run_id)), after, True

    async def _next_frames(self, after: int, timeout: float) -> tuple[str, int, bool]:
        deadline = time.monotonic() + timeout
        maintained = False  # the store was asked to end the run as dead since the last pause
        while True:
            view = await self._poll.read(self._caller, after)
            if view.run.status == "stopped":
                return await self._stopped(view, after)
            text = "".join(frames_after(batch, after) for batch in view.batches)
            if view.batches:
                after = max(after, view.batches[-1].last_seq)
            self.outcome = view.run.status
            over = view.run.status != "running"
            if over and not text and view.run.last_seq > 0:
                # A resume at or past the end still ends with the terminal event, so the client learns it is over.
                text = await self._terminal_frame(view.run.last_seq)
            if text or over:
                return text, after, over and after >= view.run.last_seq
            # This worker judges the heartbeat (the store's clock) by its own clock and the store by its own, so a
            # run this worker finds dead may not be ended (the clocks differ): the store is asked once per pause.
            if not maintained and await self._maintain(self._caller, view.run):
                maintained = True
                self._poll.forget()
                continue  # it was dead and has just been ended: read its terminal event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "", after, False
            await anyio.sleep(min(POLL_SECONDS, remaining))
            maintained = False

    async def _stopped(self, view: RunView, after: int) -> tuple[str, int, bool]:
        """A stopped run's events after ``after``, cut as its stored answer is (``stopped_replay``): read from its
        first event, as the cut is counted in characters from there."""
        self.outcome = "stopped"
        if after > 0:
            view = await self._store.read_run(self._caller, self._run_id, 0)
        if view.batches and view.batches[0].first_seq > 1:
            # Its events expired but for the batch with its end (RUN_EVENTS_TTL): the cut is counted from the first
            # event, which is gone, so only the end is shown; the stored answer holds the text.
            return await self._terminal_frame(view.run.last_seq), max(after, view.run.last_seq), True
        frames = [f"{text}\n\n" for batch in view.batches for text in batch.frames.split("\n\n") if text]
        shown = [text for text in stopped_replay(frames, len(view.message.content)) if text]
        text = "".join(frames_after(EventBatch(1, view.run.last_seq, "".join(shown)), after))
        if not text and shown:
            text = shown[-1]  # a resume at or past the end still ends with the terminal event
        return text, max(after, view.run.last_seq), True

    async def _terminal_frame(self, last_seq: int) -> str:
        view = await self._store.read_run(self._caller, self._run_id, last_seq - 1)
        return "".join(frames_after(batch, last_seq - 1) for batch in view.batches)


RunFeed = LiveFeed | StoredFeed
