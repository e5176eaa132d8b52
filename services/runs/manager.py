"""Chat runs: a turn's generation lives in a task of its own, apart from any connection, with its events in the store.

``RunManager.begin`` admits and starts a turn in one store call (``Store.begin_run``); the answer is then generated
by ``_drive`` whatever happens to the request that asked for it. Viewers (the POST that started it, a resume after
a reload, a second tab) read the run through a feed: ``LiveFeed`` from this worker's memory while the run generates
here, ``StoredFeed`` from the store otherwise, so a run can be followed from any worker or machine.

What reaches the store, and when:

- One flush every ``FLUSH_SECONDS`` writes the new event frames of every run on this worker in one store call, one
  transaction (per user on PostgREST): never a write per token. A run's end is flushed at once, and its terminal
  chunk reaches viewers only after that flush, so ``complete`` always points at a saved answer.
- The answer's text is saved in its message every ``TEXT_SAVE_SECONDS`` (the message shows ``status: streaming``,
  the ``run_id`` and ``seq``, the last event its text includes); a heartbeat every ``HEARTBEAT_SECONDS``.
- Each flush reads back the runs' controls: a stop asked on another worker, or a run gone (its conversation was
  deleted, or another worker declared it dead). So a stop from anywhere lands within one flush interval.
- A run whose heartbeat is older than ``RUN_STALE_SECONDS`` is dead: any worker that notices (at startup, every
  ``MAINTAIN_SECONDS``, or when its user touches it) ends it as ``interrupted`` with its last saved text. A SIGKILL
  therefore loses at most the last ``TEXT_SAVE_SECONDS`` of text, plus the flush interval. Its end's event id is past
  every id a viewer can hold: viewers see at most ``UNSAVED_EVENTS_MAX`` events past the last saved one.
- A store that refuses writes loses nothing a viewer saw: a run whose end cannot be saved ends its viewers with a
  retryable error after ``FINAL_SAVE_SECONDS`` but stays here, whole, and is saved by the first flush the store takes
  (for up to ``UNSAVED_KEEP_SECONDS``); a worker whose flushes fail ends no run as dead meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import anyio

from errors import AppError, Conflict, ConversationDeleted, NotFound, RunTimedOut, ShuttingDown, UpstreamUnavailable
from services.agents.assistant import Assistant
from services.runs.turn import Turn
from services.deadline import Deadline
from services.metrics import Metrics
from services.runs.prompt import build_turns
from services.store.run_log import (
    SUPERVISOR,
    UNSAVED_EVENTS_MAX,
    chunk,
    complete_chunk,
    cut,
    error_chunk,
    frame,
    frames_after,
    stopped_replay,
    interrupted_chunk,
)
from services.store import Caller, EventBatch, Message, NewRun, Run, RunBegun, RunUpdate, RunView, Store, TurnLimits

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25
TEXT_SAVE_SECONDS = 1.0
HEARTBEAT_SECONDS = 5.0
MAINTAIN_SECONDS = 10.0
POLL_SECONDS = 0.25  # how often a viewer of a run on another worker reads the store
FINAL_SAVE_SECONDS = 30.0  # how long viewers wait for a run's final flush before they are told the store is down
# How long an ended run whose end the store refuses is kept in memory and retried. A full disk is usually freed within
# minutes; a store that refuses one user for good (their token expired mid-run) must not hold the run forever.
UNSAVED_KEEP_SECONDS = 600.0
STOP_WAIT_SECONDS = 5.0  # how long a stop waits for the run's worker to save the stopped answer


def deleted_frame(run_id: str) -> str:
    """What a viewer of a run whose conversation was deleted is told last: no id, as the run's log went with it."""
    return frame(None, error_chunk(ConversationDeleted(), SUPERVISOR, run_id=run_id))


def shutdown_frame() -> str:
    """What a viewer still open when the server stops is told last: no id, as it is not part of the run's log."""
    return frame(None, error_chunk(ShuttingDown(), SUPERVISOR))


class LiveRun:
    """A run generating on this worker: its frames (event ``seq`` is ``frames[seq - 1]``), its text, its viewers."""

    __slots__ = (
        "_flushed", "_heartbeat_at", "_pending", "_saved_parts", "_taken_parts", "_text_saved_at", "_waiters",
        "agent_type", "caller", "cancelled", "deleted", "elsewhere", "ended", "farewell", "farewell_at", "final",
        "frames", "parts", "run", "saved", "scope", "shown",
        "seen_chars", "status", "stop_asked", "task", "visible",
    )

    def __init__(self, run: Run, caller: Caller) -> None:
        self.run = run
        self.caller = caller
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

    def _cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    def finish(self, status: str, item: dict[str, Any], content: str, metadata: dict[str, Any], agent_type: str) -> None:
        """Append the terminal chunk (hidden until saved) and hand the final state to the next flush."""
        self.seal()
        self.status = status
        item["run_id"] = self.run.id
        self.frames.append(frame(len(self.frames) + 1, item))
        if status == "stopped":  # its replay shows the text its answer keeps, as a replay from the store does
            self.shown = stopped_replay(self.frames, len(content))
        self.final = RunUpdate(self.caller, self.run.id, self.run.assistant_message_id, content=content,
                               metadata=metadata, agent_type=agent_type, final_status=status)  # type: ignore[arg-type]

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
        batch = EventBatch(self._flushed + 1, upto, "".join(self.frames[self._flushed:upto])) if upto > self._flushed else None
        heartbeat = now - self._heartbeat_at >= HEARTBEAT_SECONDS
        if self.final is not None:
            return RunUpdate(self.caller, self.run.id, self.run.assistant_message_id, batch, self.final.content,
                             self.final.metadata, self.final.agent_type, True, self.final.final_status)
        self._taken_parts = len(self.parts)
        content = metadata = None
        if self._taken_parts != self._saved_parts and now - self._text_saved_at >= TEXT_SAVE_SECONDS:
            content = self.text
            metadata = {"status": "streaming", "run_id": self.run.id, "seq": upto}
        return RunUpdate(self.caller, self.run.id, self.run.assistant_message_id, batch, content, metadata,
                         self.agent_type, heartbeat)

    def committed(self, update: RunUpdate, now: float) -> None:
        if update.batch is not None:
            self._flushed = update.batch.last_seq
            if not self.ended:
                self._show()  # frames held back for want of a save may now be seen
        if update.content is not None:
            self._text_saved_at, self._saved_parts = now, self._taken_parts
        if update.heartbeat:
            self._heartbeat_at = now
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
            _resolve(waiter)


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
            _resolve(self._waiter)


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
            if await self._maintain(self._caller, view.run):
                self._poll.forget()
                continue  # it was dead and has just been ended: read its terminal event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "", after, False
            await anyio.sleep(min(POLL_SECONDS, remaining))

    async def _stopped(self, view: RunView, after: int) -> tuple[str, int, bool]:
        """A stopped run's events after ``after``, cut as its stored answer is (``stopped_replay``): read from its
        first event, as the cut is counted in characters from there."""
        self.outcome = "stopped"
        if after > 0:
            view = await self._store.read_run(self._caller, self._run_id, 0)
        frames = [f"{text}\n\n" for batch in view.batches for text in batch.frames.split("\n\n") if text]
        shown = [text for text in stopped_replay(frames, len(view.message.content)) if text]
        text = "".join(frames_after(EventBatch(1, view.run.last_seq, "".join(shown)), after))
        if not text and shown:
            text = shown[-1]  # a resume at or past the end still ends with the terminal event
        return text, max(after, view.run.last_seq), True

    async def _terminal_frame(self, last_seq: int) -> str:
        view = await self._store.read_run(self._caller, self._run_id, last_seq - 1)
        return "".join(frames_after(batch, last_seq - 1) for batch in view.batches)


Feed = LiveFeed | StoredFeed


class RunManager:
    """Owns this worker's runs: starting them, flushing them, stopping them, and ending dead ones anywhere."""

    def __init__(
        self,
        store: Store,
        assistant: Assistant,
        metrics: Metrics,
        *,
        history_max_messages: int,
        history_token_budget: int,
        max_seconds: float,
        stale_seconds: float,
        events_ttl: float,
    ) -> None:
        self._store = store
        self._assistant = assistant
        self._metrics = metrics
        self._history_max_messages = history_max_messages
        self._token_budget = history_token_budget
        self._max_seconds = max_seconds
        self.stale_seconds = stale_seconds
        self.events_ttl = events_ttl
        self._live: dict[str, LiveRun] = {}
        # The reads of runs generating elsewhere, one per run while it has viewers here (their feeds hold it).
        self._polls: weakref.WeakValueDictionary[str, RunPoll] = weakref.WeakValueDictionary()
        self._urgent = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._flushing = True  # the last flush went through (see ``_maintain_loop``)

    async def open(self) -> None:
        """End the runs that died while no worker was up, then start flushing and the periodic maintenance."""
        await self._maintain_quietly()
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._flush_loop()), loop.create_task(self._maintain_loop())]

    async def aclose(self) -> None:
        """Shutdown: the runs still generating end as ``interrupted`` and are saved; then the background stops."""
        tasks = [live.task for live in self._live.values() if live.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=FINAL_SAVE_SECONDS)
            await self._flush()  # a run cancelled while waiting for its final flush is still in the batch
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # -- starting ------------------------------------------------------------------------------------------------

    async def begin(self, caller: Caller, new: NewRun, limits: TurnLimits, request_started: float) -> RunBegun:
        """Admit and start a turn. ``started`` and ``existing`` give the run to view; the limits' refusals are
        returned for the caller to turn into a 429; a conflict is raised as a 409."""
        self._refuse_while_held(caller)
        begun = await self._store.begin_run(caller, new, limits, self._history_max_messages)
        if begun.outcome == "started":
            assert begun.run is not None
            self._start(caller, begun.run, build_turns(begun.history, self._token_budget), request_started)
        elif begun.outcome == "in_progress":
            assert begun.run is not None
            raise Conflict(
                "An answer is still being generated in this conversation.",
                code="RUN_IN_PROGRESS",
                user_message="An answer is still being written in this conversation. Wait for it, or stop it.",
                details={"runId": begun.run.id},
            )
        elif begun.outcome == "conflict":
            raise Conflict(
                "client_message_id was already used for a different message.",
                code="IDEMPOTENCY_CONFLICT",
                user_message="This message could not be sent. Please try again.",
                suggested_actions=("Send a new client_message_id with each new message",),
            )
        return begun

    def _refuse_while_held(self, caller: Caller) -> None:
        """A turn's admission ends the caller's dead runs: while this worker holds one of theirs that the store has
        not taken (it refuses writes, or the run's token expired), refuse, retryably, rather than let it be ended
        with only what was saved. The caller's fresh token goes to those runs, so a token that expired stops
        blocking their flushes."""
        now, late = time.monotonic(), max(self.stale_seconds / 2, 2 * HEARTBEAT_SECONDS)
        held = [live for live in self._live.values()
                if live.caller.user_id == caller.user_id and live.held_unsaved(now, late)]
        if not held:
            return
        for live in held:
            live.caller = caller
        raise UpstreamUnavailable(
            "An earlier answer of this user is still waiting to be saved.",
            code="STORE_UNAVAILABLE",
            user_message="Your previous answer is still being saved. Please try again in a moment.",
            retry_after=1,
        )

    def _start(self, caller: Caller, run: Run, turns: list[dict[str, Any]], request_started: float) -> None:
        live = LiveRun(run, caller)
        self._live[run.id] = live
        turn = Turn(self._assistant, caller, turns)
        live.task = asyncio.get_running_loop().create_task(self._drive(live, turn, request_started))

    async def _drive(self, live: LiveRun, turn: Turn, request_started: float) -> None:
        try:
            try:
                status, item, code = await self._generate(live, turn, request_started)
            except asyncio.CancelledError:
                # Shutdown: save what was produced, shielded from the cancellation and bounded.
                with anyio.CancelScope(shield=True):
                    self._end(live, turn, "interrupted", error_chunk(ShuttingDown(), turn.agent_type), "SERVER_SHUTTING_DOWN")
                    await self._published(live)
                raise
            self._end(live, turn, status, item, code)
            await self._published(live)
        finally:
            # A run whose end is not saved yet (the store is failing, or shutdown cancelled the wait) stays, every
            # frame and its text in memory, and the flush loop saves it once the store takes it (``_flush``).
            if live.saved.is_set():
                self._live.pop(live.run.id, None)

    async def _generate(
        self, live: LiveRun, turn: Turn, request_started: float
    ) -> tuple[str, dict[str, Any], str | None]:
        """Run the turn to its end; (status, terminal chunk, error code)."""
        first_token = True
        with anyio.CancelScope() as scope:
            live.scope = scope
            if live.cancelled:
                scope.cancel()
            try:
                with anyio.move_on_after(self._max_seconds) as deadline:
                    async for item in turn.chunks():
                        if first_token and item["type"] == "token":
                            first_token = False
                            self._metrics.first_token.observe(time.perf_counter() - request_started)
                        live.emit(item)
            except AppError as exc:
                logger.warning("Chat run failed: %s (%s)", exc.code, exc.message)
                return "error", error_chunk(exc, turn.agent_type), exc.code
            except Exception:
                # A bug, not an expected failure: logged with its traceback; the partial answer is still saved and
                # the stream still ends with one error chunk.
                logger.exception("Unexpected error in chat run")
                return "error", error_chunk(AppError(), turn.agent_type), "INTERNAL_ERROR"
            if deadline.cancelled_caught:
                return "error", error_chunk(RunTimedOut(), turn.agent_type), RunTimedOut.code
            run = live.run
            done = complete_chunk(run.id, run.assistant_message_id, run.conversation_id, turn.agent_type,
                                  usage=turn.usage, stop_reason=turn.stop_reason)
            return "complete", done, None
        run = live.run
        if live.deleted:
            return "error", error_chunk(ConversationDeleted(), turn.agent_type), ConversationDeleted.code
        if live.stop_asked:
            stopped = complete_chunk(run.id, run.assistant_message_id, run.conversation_id, turn.agent_type,
                                     status="stopped", usage=turn.usage, stop_reason="stopped")
            return "stopped", stopped, None
        return "interrupted", interrupted_chunk(run.id), "RUN_INTERRUPTED"

    def _end(self, live: LiveRun, turn: Turn, status: str, item: dict[str, Any], code: str | None) -> None:
        text = cut(live.text, live.seen_chars) if status == "stopped" else live.text
        metadata = {**turn.metadata(status, code), "run_id": live.run.id}
        live.finish(status, item, text, metadata, turn.agent_type)
        if code is not None:
            self._metrics.llm_errors.inc(code)
        for model_id, usage in turn.model_usage.items():
            self._metrics.llm_tokens.inc("input", model_id, amount=usage["input_tokens"])
            self._metrics.llm_tokens.inc("output", model_id, amount=usage["output_tokens"])
        _log_end(live.run.id, metadata)
        self._urgent.set()

    async def _published(self, live: LiveRun) -> None:
        """Wait for the final flush, then show viewers the terminal chunk. If the store stays down, viewers get a
        retryable error instead (their resume finds the end once it is saved), and the run stays in memory, still
        flushed every ``FLUSH_SECONDS`` until the store takes it."""
        with anyio.move_on_after(FINAL_SAVE_SECONDS):
            await live.saved.wait()
        if live.saved.is_set():
            live.publish_end(_elsewhere_end(live) if live.elsewhere else None)
            return
        logger.error("Could not save the end of a chat run yet; it stays in memory and is retried")
        error = UpstreamUnavailable("The database is unavailable.", code="STORE_UNAVAILABLE")
        live.publish_end(frame(None, error_chunk(error, SUPERVISOR, run_id=live.run.id)))

    # -- viewing, stopping ---------------------------------------------------------------------------------------

    async def feed(self, caller: Caller, run_id: str) -> Feed:
        """A viewer of the caller's run: from memory when it generates here, from the store otherwise."""
        live = self._live.get(run_id)
        if live is not None and live.caller.user_id == caller.user_id:
            return LiveFeed(live)
        await self._store.read_run(caller, run_id, None)  # NotFound unless it is the caller's
        poll = self._polls.get(run_id)
        if poll is None:
            poll = self._polls[run_id] = RunPoll(self._store, run_id)
        return StoredFeed(self._store, poll, caller, run_id, self._end_if_dead)

    async def stop(self, caller: Caller, run_id: str, seen_chars: int | None) -> RunView:
        """Stop the caller's run wherever it generates and return it with its saved answer: ended, or still
        ``running`` when its worker has not ended it within ``STOP_WAIT_SECONDS`` (a dead worker's run ends stopped
        once its heartbeat lapses). Idempotent: a run that has already ended is left as it is."""
        live = self._live.get(run_id)
        if live is not None and live.caller.user_id == caller.user_id:
            live.stop(seen_chars)
            with anyio.move_on_after(STOP_WAIT_SECONDS):
                await live.saved.wait()
        else:
            await self._store.request_stop(caller, run_id, seen_chars)
            await self._await_end(caller, run_id)
        return await self._store.read_run(caller, run_id, None)

    async def _await_end(self, caller: Caller, run_id: str) -> None:
        """Wait for another worker to end the run (it sees the stop at its next flush), or end it if that worker
        is dead."""
        with anyio.move_on_after(STOP_WAIT_SECONDS):
            while True:
                view = await self._store.read_run(caller, run_id, None)
                if view.run.status != "running" or await self._end_if_dead(caller, view.run):
                    return
                await anyio.sleep(FLUSH_SECONDS / 2)

    def overlay(self, messages: list[Message], run: Run | None) -> list[Message]:
        """Messages with the answer of ``run`` (their conversation's running run, from ``Store.running_run``) shown
        as it is now when it generates on this worker, not as last saved."""
        live = self._live.get(run.id) if run is not None else None
        # Not while frames are held back for want of a save: the answer as shown must be what viewers may see.
        if run is None or live is None or live.final is not None or live.visible < len(live.frames):
            return messages
        live.seal()
        shown = []
        for message in messages:
            if message.id == run.assistant_message_id:
                metadata = {**message.metadata, "seq": len(live.frames)}
                message = Message(message.id, message.conversation_id, message.role, live.text,
                                  live.agent_type, metadata, message.created_at)
            shown.append(message)
        return shown

    async def end_if_dead(self, caller: Caller, run: Run | None) -> bool:
        """End ``run`` (a conversation's running run) if no worker generates it any more; True if it was ended (the
        caller reads the messages again)."""
        if run is None or run.id in self._live:
            return False
        return await self._end_if_dead(caller, run)

    async def _end_if_dead(self, caller: Caller, run: Run) -> bool:
        if run.status != "running" or time.time() - run.heartbeat_at < self.stale_seconds:
            return False
        await self._store.maintain_runs(caller, self.stale_seconds, self.events_ttl)
        return True

    # -- background ----------------------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            with anyio.move_on_after(FLUSH_SECONDS):
                await self._urgent.wait()
            self._urgent.clear()
            try:
                await self._flush()
            except Exception:  # a bug must not end flushing for every run on this worker
                logger.exception("Unexpected error while flushing chat runs")

    async def _flush(self) -> None:
        """Write every live run's update in one store call; ``_flushing`` says whether the store took them all."""
        now = time.monotonic()
        self._forget_unsavable(now)
        lives = list(self._live.values())
        if not lives:
            self._flushing = True
            return
        updates = [live.take_update(now) for live in lives]
        try:
            controls = await self._store.flush_runs(updates)
        except AppError as exc:
            logger.warning("Could not flush %d chat runs (%s); retrying", len(updates), exc.code)
            self._flushing = False
            return
        for live, update in zip(lives, updates):
            control = controls.get(live.run.id)
            if control is None:
                continue
            if control.applied:
                live.committed(update, now)
            elif control.gone:
                live.ended_elsewhere(control.deleted)  # what it held past the last save is not the store's any more
            if control.stop:
                live.stop(control.seen_chars)
            if live.ended and live.saved.is_set():
                self._live.pop(live.run.id, None)  # its end, kept while the store refused it, is settled at last
        self._flushing = len(controls) >= len(lives)

    def _forget_unsavable(self, now: float) -> None:
        """Give up the ended runs whose end the store has refused for ``UNSAVED_KEEP_SECONDS``."""
        for live in list(self._live.values()):
            if live.farewell is not None and not live.saved.is_set() and now - live.farewell_at > UNSAVED_KEEP_SECONDS:
                logger.error("Gave up saving the end of a chat run after %.0f s; it will end interrupted",
                             UNSAVED_KEEP_SECONDS)
                self._live.pop(live.run.id, None)

    async def _maintain_loop(self) -> None:
        while True:
            await anyio.sleep(MAINTAIN_SECONDS)
            # Only while this worker's own flushes go through: when the store refuses them (a full disk), its live
            # runs' heartbeats lapse too, and a sweep the moment the store came back would end them as dead, with
            # only their last saved text, before the next flush could save what they still hold.
            if self._flushing:
                await self._maintain_quietly()

    def health(self) -> dict[str, int]:
        """For /health: the runs generating here, and those that ended but wait for the store to save their end."""
        waiting = sum(1 for live in self._live.values() if live.ended and not live.saved.is_set())
        return {"generating": len(self._live) - waiting, "unsaved": waiting}

    async def _maintain_quietly(self) -> None:
        try:
            await self._store.maintain_runs(None, self.stale_seconds, self.events_ttl)
        except AppError as exc:
            logger.warning("Could not end dead chat runs (%s)", exc.code)
        except Exception:
            logger.exception("Unexpected error while ending dead chat runs")


def _log_end(run_id: str, metadata: dict[str, Any]) -> None:
    """The turn's line in the log: how it ended, and the model that answered (a fallback, when the configured one
    was throttled or failing; several when they answered different calls of the turn)."""
    model = ",".join(metadata.get("model_ids") or [metadata.get("model_id") or "-"])
    logger.info(
        "Chat run ended: run_id=%s status=%s code=%s model=%s duration_ms=%d",
        run_id, metadata["status"], metadata.get("error_code") or "-", model, metadata["duration_ms"],
    )


def _elsewhere_end(live: LiveRun) -> str:
    """What viewers of a run the store ended without this worker are told last: what the store holds (its
    conversation deleted, or the run interrupted), under no id, since the store's end has its own."""
    if live.deleted:
        return deleted_frame(live.run.id)
    return frame(None, interrupted_chunk(live.run.id))


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
