"""This worker's chat runs: ``RunManager`` starts them, flushes them, stops them and ends dead ones anywhere.

The package docstring (``services/runs/__init__.py``) says what reaches the store, and when.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import weakref
from dataclasses import replace
from typing import Any

import anyio

from errors import (AppError, ConversationDeleted, IdempotencyConflict, RunInProgress, RunNotSaved, RunTimedOut,
                    ShuttingDown, UpstreamUnavailable)
from services.agents.assistant import Assistant
from services.agents.usage import KINDS
from services.metrics import Metrics
from services.runs.feeds import LiveFeed, RunFeed, RunPoll, StoredFeed, deleted_frame
from services.runs.live import LiveRun, heartbeat_seconds
from services.runs.prompt import build_turns
from services.runs.turn import Turn
from services.store import Caller, Message, NewRun, Run, RunBegun, RunView, Store, TurnLimits
from services.store.run_log import SUPERVISOR, complete_chunk, cut, error_chunk, frame, interrupted_chunk
from settings import Settings

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25
# The least time between two flushes: a run's end asks for one at once, so without it a worker ending many runs a second
# (60 new turns a second) would flush once per end. With it a worker sends at most 1 / FLUSH_GAP_SECONDS flushes a
# second, each carrying every run that ended meanwhile, whatever the number of users; an end waits 50 ms at most.
FLUSH_GAP_SECONDS = 0.05
MAINTAIN_SECONDS = 10.0
FINAL_SAVE_SECONDS = 30.0  # how long viewers wait for a run's final flush before they are told the store is down
# How long an ended run whose end the store refuses is kept in memory and retried. A full disk is usually freed within
# minutes; a store that refuses one user for good (their token expired mid-run) must not hold the run forever.
UNSAVED_KEEP_SECONDS = 600.0
STOP_WAIT_SECONDS = 5.0  # how long a stop waits for the run's worker to save the stopped answer


def shutdown_frame() -> str:
    """What a viewer still open when the server stops is told last: no id, as it is not part of the run's log."""
    return frame(None, error_chunk(ShuttingDown(), SUPERVISOR))


class RunManager:
    """Owns this worker's runs: starting them, flushing them, stopping them, and ending dead ones anywhere."""

    def __init__(self, store: Store, assistant: Assistant, metrics: Metrics, settings: Settings) -> None:
        self._store = store
        self._assistant = assistant
        self._metrics = metrics
        self._history_max_messages = settings.history_max_messages
        self._token_budget = settings.history_token_budget
        self._prices = settings.model_prices
        self._max_seconds = settings.run_max_seconds
        self.stale_seconds = settings.run_stale_seconds
        self._heartbeat_every = heartbeat_seconds(self.stale_seconds)
        self.events_ttl = settings.run_events_ttl
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
        lost = [live.run.id for live in self._live.values() if not live.saved.is_set()]
        if lost:
            # Nothing will flush them again: what the store did not take is gone, and the store ends them
            # interrupted with their last saved text once their heartbeat lapses.
            logger.error("Shutting down with %d chat runs not saved (the store refuses writes); they end interrupted "
                         "with their last saved text: %s", len(lost), ", ".join(lost))
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
            raise RunInProgress(begun.run.id)
        elif begun.outcome == "conflict":
            raise IdempotencyConflict()
        return begun

    def _refuse_while_held(self, caller: Caller) -> None:
        """A turn's admission ends the caller's dead runs: while this worker holds one of theirs that the store has
        not taken (it refuses writes, or the run's token expired), refuse, retryably, rather than let it be ended
        with only what was saved. The caller's fresh token goes to those runs, so a token that expired stops
        blocking their flushes."""
        held = self._held_unsaved(caller)
        if not held:
            return
        for live in held:
            live.caller = caller
        raise UpstreamUnavailable(
            "An earlier answer of this user is still waiting to be saved.", code="STORE_UNAVAILABLE",
            user_message="Your previous answer is still being saved. Please try again in a moment.", retry_after=1
        )

    def _held_unsaved(self, caller: Caller) -> list[LiveRun]:
        """The caller's runs on this worker whose heartbeat the store has not taken for half ``RUN_STALE_SECONDS``, or
        whose end it refused: the store may take them for dead, and a sweep of the caller's runs would end them with
        only what was saved."""
        now, late = time.monotonic(), max(self.stale_seconds / 2, 2 * self._heartbeat_every)
        return [live for live in self._live.values()
                if live.caller.user_id == caller.user_id and live.held_unsaved(now, late)]

    def _start(self, caller: Caller, run: Run, turns: list[dict[str, Any]], request_started: float) -> None:
        turn = Turn(self._assistant, caller, turns, self._prices)
        live = LiveRun(run, caller, turn.calls, self._heartbeat_every)
        self._live[run.id] = live
        live.task = asyncio.get_running_loop().create_task(self._drive(live, turn, request_started))

    async def _drive(self, live: LiveRun, turn: Turn, request_started: float) -> None:
        try:
            try:
                status, item, code = await self._generate(live, turn, request_started)
            except asyncio.CancelledError:
                # Shutdown: save what was produced, shielded from the cancellation and bounded.
                with anyio.CancelScope(shield=True):
                    interrupted = error_chunk(ShuttingDown(), turn.agent_type)
                    self._end(live, turn, "interrupted", interrupted, "SERVER_SHUTTING_DOWN")
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
            return "complete", _completed(live.run, turn, "complete", turn.stop_reason), None
        if live.refused:
            return "error", error_chunk(RunNotSaved(), turn.agent_type), RunNotSaved.code
        if live.deleted:
            return "error", error_chunk(ConversationDeleted(), turn.agent_type), ConversationDeleted.code
        if live.stop_asked:
            return "stopped", _completed(live.run, turn, "stopped", "stopped"), None
        return "interrupted", interrupted_chunk(live.run.id), "RUN_INTERRUPTED"

    def _end(self, live: LiveRun, turn: Turn, status: str, item: dict[str, Any], code: str | None) -> None:
        text = cut(live.text, live.seen_chars) if status == "stopped" else live.text
        metadata = {**turn.metadata(status, code), "run_id": live.run.id}
        live.finish(status, item, text, metadata, turn.agent_type)
        if code is not None:
            self._metrics.llm_errors.inc(code)
        for call in turn.calls.calls:  # every call, a stopped or failed turn's too (its cut one estimated)
            for kind in KINDS:
                if amount := getattr(call, kind):
                    label = kind.removesuffix("_tokens")
                    self._metrics.llm_tokens.inc(label, call.model_id, amount=amount)
                    if call.estimated:
                        self._metrics.llm_estimated_tokens.inc(label, call.model_id, amount=amount)
            if call.cost:
                self._metrics.llm_cost.inc(call.model_id, amount=call.cost)
        _log_end(live.run.id, metadata)
        self._urgent.set()

    async def _published(self, live: LiveRun) -> None:
        """Wait for the final flush, then show viewers the terminal chunk. If the store stays down, viewers get a
        retryable error instead (their resume finds the end once it is saved), and the run stays in memory, still
        flushed every ``FLUSH_SECONDS`` until the store takes it."""
        with anyio.move_on_after(FINAL_SAVE_SECONDS):
            await live.saved.wait()
        if live.saved.is_set():
            live.publish_end(_elsewhere_end(live) if live.elsewhere or live.refused else None)
            return
        logger.error("Could not save the end of a chat run yet; it stays in memory and is retried")
        error = UpstreamUnavailable("The database is unavailable.", code="STORE_UNAVAILABLE")
        live.publish_end(frame(None, error_chunk(error, SUPERVISOR, run_id=live.run.id)))

    # -- viewing, stopping ---------------------------------------------------------------------------------------

    async def feed(self, caller: Caller, run_id: str) -> RunFeed:
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
        """Wait for the run's worker to end it (it sees the stop at its next flush), or end it if that worker died."""
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
        # Not while frames are held back for want of a save, nor once the store refused them: the answer as shown must
        # be what viewers may see.
        if run is None or live is None or live.final is not None or live.refused or live.visible < len(live.frames):
            return messages
        live.seal()
        seq = len(live.frames)
        return [replace(m, content=live.text, agent_type=live.agent_type, metadata={**m.metadata, "seq": seq})
                if m.id == run.assistant_message_id else m for m in messages]

    async def end_if_dead(self, caller: Caller, run: Run | None) -> bool:
        """End ``run`` (a conversation's running run) if no worker generates it any more; True if it was ended (the
        caller reads the messages again)."""
        if run is None or run.id in self._live:
            return False
        return await self._end_if_dead(caller, run)

    async def _end_if_dead(self, caller: Caller, run: Run) -> bool:
        if run.status != "running" or time.time() - run.heartbeat_at < self.stale_seconds:
            return False
        return await self.end_dead_runs(caller)

    async def end_dead_runs(self, caller: Caller) -> bool:
        """End the caller's runs whose worker died (heartbeat older than ``RUN_STALE_SECONDS``) as ``interrupted``,
        releasing what they hold: a stream slot, a budget's reservation. On Supabase no worker can do it for every
        user (it holds no service key), so it happens when the user next touches their runs. False when it did not
        sweep: never while this worker holds one of the caller's runs unsaved (its flushes fail, or have not caught
        up since the store came back), which the sweep would end, alive here, as dead with only its saved text; the
        caller's dead runs then end at a later touch."""
        if self._held_unsaved(caller):
            return False
        await self._store.maintain_runs(caller, self.stale_seconds, self.events_ttl)
        return True

    # -- background ----------------------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            with anyio.move_on_after(FLUSH_SECONDS - FLUSH_GAP_SECONDS):
                await self._urgent.wait()
            self._urgent.clear()
            try:
                await self._flush()
            except Exception:  # a bug must not end flushing for every run on this worker
                logger.exception("Unexpected error while flushing chat runs")
            await anyio.sleep(FLUSH_GAP_SECONDS)

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
        except Exception as exc:
            # A bug, yet a failed flush all the same: while it lasts no sweep may end this worker's runs as dead.
            # Logged by type and place only, as its message can quote an answer.
            logger.error("Unexpected %s while flushing %d chat runs (at %s); retrying", type(exc).__name__,
                         len(updates), _where(exc))
            self._flushing = False
            return
        for live, update in zip(lives, updates):
            control = controls.get(live.run.id)
            if control is None:
                continue
            if control.rejected:
                self._refused(live)
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

    def _refused(self, live: LiveRun) -> None:
        """The store refused the run's update as bad input: it would refuse it again, so the run stops and ends as
        an error with what the store holds (``LiveRun.refuse``); if even that end is refused, it is given up here,
        as a dead worker's is, and ends ``interrupted`` with its saved text once its heartbeat lapses."""
        if live.refuse():
            logger.error("The store refused an update of chat run %s; it ends %s with what was saved", live.run.id,
                         RunNotSaved.code)
            return
        logger.error("The store refused the end of chat run %s too; it is left to end as a dead worker's run",
                     live.run.id)
        live.ended_elsewhere(deleted=False)
        self._live.pop(live.run.id, None)

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


def _completed(run: Run, turn: Turn, status: str, stop_reason: str | None) -> dict[str, Any]:
    return complete_chunk(run.id, run.assistant_message_id, run.conversation_id, turn.agent_type, status=status,
                          usage=turn.usage, stop_reason=stop_reason)


def _log_end(run_id: str, metadata: dict[str, Any]) -> None:
    """The turn's line in the log: how it ended, and the model that answered (a fallback, when the configured one
    was throttled or failing; several when they answered different calls of the turn)."""
    model = ",".join(metadata.get("model_ids") or [metadata.get("model_id") or "-"])
    logger.info(
        "Chat run ended: run_id=%s status=%s code=%s model=%s duration_ms=%d",
        run_id, metadata["status"], metadata.get("error_code") or "-", model, metadata["duration_ms"],
    )


def _elsewhere_end(live: LiveRun) -> str:
    """What viewers of a run whose end in the store is not the one in memory are told last: what the store holds (its
    conversation deleted, its update refused, or the run interrupted), under no id, since the store's end has its
    own."""
    if live.deleted:
        return deleted_frame(live.run.id)
    if live.refused and not live.elsewhere:
        return frame(None, error_chunk(RunNotSaved(), SUPERVISOR, run_id=live.run.id))
    return frame(None, interrupted_chunk(live.run.id))


def _where(exc: BaseException) -> str:
    """The file and line an exception was raised at."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
