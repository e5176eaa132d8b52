"""A run generating on this worker: its frames, its text, what its next flush writes, and its viewers' wake-ups.

``LiveRun`` is the state ``RunManager`` (``manager.py``) drives and the feeds (``feeds.py``) read; it does no I/O.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import anyio

from errors import RunNotSaved
from services.agents.usage import TurnUsage
from services.store import CallUsage, Caller, EventBatch, Run, RunUpdate
from services.store.run_log import (SUPERVISOR, UNSAVED_EVENTS_MAX, chunk, error_chunk, frame, reaped_seq,
                                    stopped_replay, streamed_text)
from services.store.text import storable

TEXT_SAVE_SECONDS = 1.0
HEARTBEAT_SECONDS = 5.0  # at most; a shorter RUN_STALE_SECONDS makes them closer (``heartbeat_seconds``)


def heartbeat_seconds(stale_seconds: float) -> float:
    """How often a live run's heartbeat is written: every ``HEARTBEAT_SECONDS``, or three times per
    ``RUN_STALE_SECONDS`` when that is shorter, so a live run never looks dead between two heartbeats (a sweep, the
    user's next turn, would end it as interrupted)."""
    return min(HEARTBEAT_SECONDS, stale_seconds / 3)


class LiveRun:
    """A run generating on this worker: its frames (event ``seq`` is ``frames[seq - 1]``), its text, its viewers."""

    __slots__ = (
        "_calls_flushed", "_flushed", "_heartbeat_at", "_heartbeat_every", "_pending", "_saved_parts", "_taken_parts", "_text_saved_at",
        "_salvage_sent", "_waiters", "agent_type", "caller", "cancelled", "deleted", "elsewhere", "ended", "farewell",
        "farewell_at", "final", "frames", "parts", "refused", "run", "saved", "scope", "shown",
        "seen_chars", "status", "stop_asked", "task", "usage", "visible",
    )

    def __init__(
        self, run: Run, caller: Caller, usage: TurnUsage | None = None, heartbeat_every: float = HEARTBEAT_SECONDS
    ) -> None:
        self.run = run
        self._heartbeat_every = heartbeat_every
        self.caller = caller
        self.usage = usage or TurnUsage()  # the turn's model calls: the usage ledger's rows, written by the flushes
        self._calls_flushed = 0  # the calls the store has taken
        self.frames: list[str] = []
        self.shown = self.frames  # the frames as viewers read them: a stopped run's are cut once it ends
        self.visible = 0  # frames viewers may see: the terminal frame only once it is saved
        self.ended = False  # everything visible is everything there will be
        self.farewell: str | None = None  # what ends viewers when the end could not be saved (no id)
        self.farewell_at = 0.0  # when (monotonic)
        self.status = "running"
        self.parts: list[str] = []  # the answer's text, as streamed
        self._pending: list[str] = []  # token text emitted since the last frame (see ``seal``)
        self.agent_type = SUPERVISOR  # whose text came last
        self.stop_asked = False
        self.seen_chars: int | None = None
        self.final: RunUpdate | None = None  # set when the run has ended, until its final flush commits
        self.saved = asyncio.Event()
        self.scope: anyio.CancelScope | None = None  # the generation's, once it has started
        self.cancelled = False  # stopped or ended elsewhere: generation ends (at its start, if not started yet)
        self.deleted = False  # ended elsewhere because its conversation was deleted
        self.elsewhere = False  # ended in the store without this worker: nothing more of it is saved
        self.refused = False  # the store refused an update of it as bad input: it ends with its ``_salvage``
        self._salvage_sent = False
        self.task: asyncio.Task[None] | None = None
        self._flushed = 0
        # Admission saved the empty placeholder and the run's heartbeat: the text's first save, like every later one,
        # waits TEXT_SAVE_SECONDS. Saving at the first flush instead put a burst's text saves (an UPDATE and a
        # re-index for search each) on the writer thread just when the burst's first tokens were going out.
        self._text_saved_at = self._heartbeat_at = time.monotonic()
        self._saved_parts = 0
        self._taken_parts = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def emit(self, item: dict[str, Any]) -> None:
        if item["type"] != "token":
            self.seal()
            self._append(item)
            return
        if self._pending and item["agent_type"] != self.agent_type:
            self.seal()
        self.parts.append(item["content"])
        self._pending.append(item["content"])
        self.agent_type = item["agent_type"]
        self._wake()

    def seal(self) -> None:
        """Frame the tokens emitted since the last frame as one event. Called when the frames are needed (a viewer
        reads, a flush writes), so tokens that arrive while nobody is looking merge into one event: fewer events
        to encode, send and store, and every viewer and replay still sees the same numbered events."""
        if self._pending:
            content = "".join(self._pending)
            self._pending.clear()
            self._append(chunk("token", self.agent_type, content=content))

    def _append(self, item: dict[str, Any]) -> None:
        item["run_id"] = self.run.id
        self.frames.append(frame(len(self.frames) + 1, item))
        self._show()

    def _show(self) -> None:
        """Let viewers see the frames so far but the terminal one (shown once saved), and at most
        ``UNSAVED_EVENTS_MAX`` past the last saved one: the id a dead worker's run ends at is above all of them."""
        framed = len(self.frames) - (1 if self.final is not None else 0)
        self.visible = min(framed, self._flushed + UNSAVED_EVENTS_MAX)
        self._wake()

    def stop(self, seen_chars: int | None) -> None:
        """Stop generating; the answer is saved cut to ``seen_chars``. A second stop changes nothing."""
        if self.stop_asked or self.final is not None:
            return
        self.stop_asked, self.seen_chars = True, seen_chars
        self._cancel()

    def ended_elsewhere(self, deleted: bool) -> None:
        """The store ended this run without this worker (another worker declared it dead, or its conversation was
        ``deleted``), so nothing more of it is saved: generation stops, and once it has ended, viewers keep what they
        could see and get its end under no id (the store's end has its own)."""
        self.elsewhere = True
        if self.final is None:
            self.deleted = deleted
            self._cancel()
        else:
            self.saved.set()

    def held_unsaved(self, now: float, seconds: float) -> bool:
        """Whether the store has taken nothing of this run for ``seconds`` (its heartbeat is that late) or refused
        its end: a sweep would end it as dead, with only what was saved."""
        return self.farewell is not None or now - self._heartbeat_at > seconds

    def refuse(self) -> bool:
        """The store refused an update of this run as bad input, which it would refuse again: generation stops and
        the run's end is its ``_salvage`` (True), unless that is what was refused, which leaves nothing to try."""
        if self._salvage_sent:
            return False
        self.refused = True
        self._cancel()
        return True

    def _cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    def finish(
        self, status: str, item: dict[str, Any], content: str, metadata: dict[str, Any], agent_type: str
    ) -> None:
        """Append the terminal chunk (hidden until saved) and hand the final state to the next flush."""
        self.seal()
        self.status = status
        item["run_id"] = self.run.id
        self.frames.append(frame(len(self.frames) + 1, item))
        if status == "stopped":  # its replay shows the text its answer keeps, as a replay from the store does
            self.shown = stopped_replay(self.frames, len(content))
        self.final = self._update(content=content, metadata=metadata, agent_type=agent_type,
                                  final_status=status)

    def publish_end(self, farewell: str | None = None) -> None:
        """Show the terminal frame and wake viewers. ``farewell``, a frame without an id, ends them instead when the
        end could not be saved yet: they are shown nothing past what they could already see (the run keeps every
        frame and is saved once the store takes it), so no id they hold can later name other content."""
        if farewell is None:
            self.visible = len(self.frames)
        self.farewell, self.farewell_at, self.ended = farewell, time.monotonic(), True
        self._wake()

    # -- flushing -----------------------------------------------------------------------------------------------

    def take_update(self, now: float) -> RunUpdate:
        """What the next flush writes for this run; nothing changes here until ``committed``."""
        self.seal()
        upto = len(self.frames)
        batch = None
        if upto > self._flushed:
            batch = EventBatch(self._flushed + 1, upto, "".join(self.frames[self._flushed:upto]))
        heartbeat = now - self._heartbeat_at >= self._heartbeat_every
        # The calls finished since the last flush the store took: the ledger rides the flush, no request of its own.
        calls = tuple(self.usage.calls[self._calls_flushed:])
        if self.refused:  # nothing more of what it holds is sent: its end, once generation has stopped
            if self.final is None:
                return self._update()
            self._salvage_sent = True
            return self._salvage(calls)
        if self.final is not None:
            return replace(self.final, caller=self.caller, batch=batch, heartbeat=True, calls=calls)
        self._taken_parts = len(self.parts)
        content = metadata = None
        if self._taken_parts != self._saved_parts and now - self._text_saved_at >= TEXT_SAVE_SECONDS:
            content = self.text
            metadata = {"status": "streaming", "run_id": self.run.id, "seq": upto}
        return self._update(batch=batch, content=content, metadata=metadata, agent_type=self.agent_type,
                            heartbeat=heartbeat, calls=calls)

    def _update(self, **parts: Any) -> RunUpdate:
        """An update of this run, named as every one is: its caller, run, answer and conversation."""
        return RunUpdate(self.caller, self.run.id, self.run.assistant_message_id,
                         conversation_id=self.run.conversation_id, **parts)

    def _salvage(self, calls: tuple[CallUsage, ...]) -> RunUpdate:
        """The end of a run the store refused an update of: only what the store holds already, as a dead worker's
        run ends (``run_log.reaped_seq``). Its answer is the text its saved events stream, then an error event under an
        id above every one its viewers were shown; its model calls are billed."""
        seq = reaped_seq(self._flushed)
        end = frame(seq, error_chunk(RunNotSaved(), SUPERVISOR, run_id=self.run.id))
        text = storable(streamed_text("".join(self.frames[:self._flushed])))
        metadata = {"status": "error", "run_id": self.run.id, "error_code": RunNotSaved.code}
        batch = EventBatch(self._flushed + 1, seq, end)
        return self._update(batch=batch, content=text, metadata=metadata, agent_type=self.agent_type, heartbeat=True,
                            final_status="error", calls=calls)

    def committed(self, update: RunUpdate, now: float) -> None:
        if update.batch is not None:
            self._flushed = update.batch.last_seq
            if not self.ended and not self.refused:  # a salvage saved none of the frames held back
                self._show()  # frames held back for want of a save may now be seen
        if update.content is not None:
            self._text_saved_at, self._saved_parts = now, self._taken_parts
        if update.heartbeat:
            self._heartbeat_at = now
        if update.calls:
            self._calls_flushed = max(self._calls_flushed, update.calls[-1].index + 1)
        if update.final_status is not None:
            self.saved.set()

    # -- viewers ------------------------------------------------------------------------------------------------

    async def wait(self, waiter: asyncio.Future[None]) -> None:
        """Until a new frame is visible or the run ends, or someone else resolves ``waiter`` (a viewer's ping)."""
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            settle(waiter)


def settle(waiter: asyncio.Future[None]) -> None:
    """Wake the viewer waiting on ``waiter``, unless something else already has."""
    if not waiter.done():
        waiter.set_result(None)
