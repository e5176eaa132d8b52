"""The store calls of a chat run, on both stores, as the contract in ``services.store`` states them:
``begin_run`` (admit and start a turn in one call), ``flush_runs``, ``read_run``, ``request_stop`` and
``maintain_runs``. Each must write exactly what it says and nothing for a caller it should not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from errors import NotFound
from services.store import (BudgetLimit, BudgetRefusal, CallUsage, Caller, EventBatch, NewRun, RunUpdate, TurnBudget,
                            TurnLimits)
from services.store.postgrest.store import PostgrestStore
from services.store.run_log import chunk, frame, reaped_seq, streamed_text
from services.store.sqlite import listing as sqlite_listing
from services.store.sqlite.store import SQLiteStore
from tests.support import new_id

pytestmark = pytest.mark.anyio

Store = SQLiteStore | PostgrestStore

OPEN = TurnLimits(stale_seconds=30, events_ttl=3600)


def tokens(first: int, *texts: str) -> EventBatch:
    frames = "".join(frame(first + i, chunk("token", "supervisor", content=t)) for i, t in enumerate(texts))
    return EventBatch(first, first + len(texts) - 1, frames)


async def start(store: Store, caller: Caller, conversation_id: str | None = None, text: str = "hello",
                limits: TurnLimits = OPEN, **extra: str) -> NewRun:
    new = NewRun(conversation_id or new_id(), text, "AI Chat", **extra)
    begun = await store.begin_run(caller, new, limits, 50)
    assert begun.outcome == "started", begun
    return new


async def finish(store: Store, caller: Caller, new: NewRun, text: str = "done") -> None:
    done = RunUpdate(caller, new.id, new.assistant_message_id, content=text, metadata={"status": "complete"},
                     agent_type="supervisor", final_status="complete")
    assert (await store.flush_runs([done]))[new.id].gone  # ended: it takes no more writes


async def test_begin_run_creates_the_conversation_the_question_and_a_streaming_placeholder(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    new = NewRun(new_id(), "What invoices do I have?", "AI Chat")
    begun = await store.begin_run(caller, new, OPEN, 50)
    assert begun.outcome == "started" and begun.run is not None and begun.run.status == "running"
    assert [(m.role, m.content, m.id) for m in begun.history] == [("user", new.text, new.user_message_id)]
    messages = (await store.message_page(caller, new.conversation_id, 10, 0)).messages
    assert [m.role for m in messages] == ["user", "assistant"]
    placeholder = messages[1]
    assert placeholder.id == new.assistant_message_id and placeholder.content == ""
    assert placeholder.metadata == {"status": "streaming", "run_id": new.id, "seq": 0}
    assert (await store.get_conversation(caller, new.conversation_id)).title == "AI Chat"


async def test_history_is_the_newest_messages_oldest_first_without_the_placeholder(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    conversation_id = new_id()
    for text in ("one", "two", "three"):
        new = await start(store, caller, conversation_id, text)
        await finish(store, caller, new, f"answer to {text}")
    begun = await store.begin_run(caller, NewRun(conversation_id, "four", "AI Chat"), OPEN, 3)
    assert [m.content for m in begun.history] == ["three", "answer to three", "four"]


async def test_a_client_message_id_repeats_the_run_and_conflicts_when_the_message_differs(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    caller, other = new_caller(), new_caller()
    key = new_id()
    new = await start(store, caller, client_message_id=key)
    limits = TurnLimits(30, 3600, chat_limit=1, stream_limit=1)  # a repeat is neither counted nor a second slot
    again = await store.begin_run(caller, NewRun(new.conversation_id, new.text, "AI Chat", key), limits, 50)
    assert again.outcome == "existing" and again.run is not None and again.run.id == new.id
    changed = await store.begin_run(caller, NewRun(new.conversation_id, "other", "AI Chat", key), OPEN, 50)
    assert changed.outcome == "conflict"
    assert len((await store.message_page(caller, new.conversation_id, 10, 0)).messages) == 2  # nothing written twice
    await start(store, other, text=new.text, client_message_id=key)  # another user's key space


async def test_one_running_run_per_conversation(store: Store, new_caller: Callable[[], Caller]) -> None:
    caller = new_caller()
    new = await start(store, caller)
    busy = await store.begin_run(caller, NewRun(new.conversation_id, "again", "AI Chat"), OPEN, 50)
    assert busy.outcome == "in_progress" and busy.run is not None and busy.run.id == new.id
    await finish(store, caller, new)
    await start(store, caller, new.conversation_id, "again")


async def test_chat_limit_counts_refusals_and_running_runs_are_the_stream_slots(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    slots = TurnLimits(30, 3600, window_seconds=3600, chat_limit=100, stream_limit=1)
    first = await start(store, caller, limits=slots)
    full = await store.begin_run(caller, NewRun(new_id(), "hi", "AI Chat"), slots, 50)
    assert full.outcome == "streams_full" and 0 < full.retry_after <= 30
    await finish(store, caller, first)
    await start(store, caller, limits=slots)  # the slot freed with the run
    rate = TurnLimits(30, 3600, window_seconds=3600, chat_limit=3, stream_limit=100)
    refused = await store.begin_run(caller, NewRun(new_id(), "hi", "AI Chat"), rate, 50)
    assert refused.outcome == "rate_limited" and refused.retry_after > 0  # three turns counted so far, refusals too


async def test_someone_elses_conversation_is_not_found_and_nothing_is_written(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    owner, intruder = new_caller(), new_caller()
    new = await start(store, owner)
    await finish(store, owner, new)
    with pytest.raises(NotFound):
        await store.begin_run(intruder, NewRun(new.conversation_id, "mine now", "AI Chat"), OPEN, 50)
    assert len((await store.message_page(owner, new.conversation_id, 10, 0)).messages) == 2


async def test_flush_writes_events_text_and_the_end_and_reads_back_stops(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    caller, intruder = new_caller(), new_caller()
    new = await start(store, caller)
    streaming = {"status": "streaming", "run_id": new.id, "seq": 2}
    update = RunUpdate(caller, new.id, new.assistant_message_id, tokens(1, "Hel", "lo"), "Hello", streaming,
                       "supervisor", heartbeat=True)
    controls = await store.flush_runs([update])
    assert not controls[new.id].stop and not controls[new.id].gone
    view = await store.read_run(caller, new.id, 0)
    assert view.message.content == "Hello" and view.message.metadata == streaming
    assert [(b.first_seq, b.last_seq) for b in view.batches] == [(1, 2)]
    assert (await store.read_run(caller, new.id, 1)).batches[0].last_seq == 2  # batches holding events after 1
    await store.request_stop(caller, new.id, 3)
    control = (await store.flush_runs([RunUpdate(caller, new.id, new.assistant_message_id)]))[new.id]
    assert control.stop and control.seen_chars == 3 and not control.gone
    with pytest.raises(NotFound):
        await store.read_run(intruder, new.id, None)
    with pytest.raises(NotFound):
        await store.request_stop(intruder, new.id, None)
    await finish(store, caller, new, "Hel")
    ended = await store.read_run(caller, new.id, 0)
    assert ended.run.status == "complete" and ended.message.content == "Hel"
    late = RunUpdate(caller, new.id, new.assistant_message_id, tokens(3, "late"), "late text", {})
    assert (await store.flush_runs([late]))[new.id].gone
    assert (await store.read_run(caller, new.id, 0)).message.content == "Hel"  # an ended run takes no writes


async def test_an_update_the_store_refuses_is_left_out_alone_and_the_others_are_written(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    alice, bob = new_caller(), new_caller()
    first, theirs, second = await start(store, alice), await start(store, bob), await start(store, alice)
    ended = RunUpdate(alice, first.id, first.assistant_message_id, tokens(1, "Hel", "lo"), "Hello",
                      {"status": "complete", "run_id": first.id}, "supervisor", heartbeat=True, final_status="complete")
    # Events the store could keep, then text none can (a lone surrogate, which UTF-8 cannot encode).
    poisoned = RunUpdate(bob, theirs.id, theirs.assistant_message_id, tokens(1, "kept?"), "bad \ud83d",
                         {"status": "streaming", "run_id": theirs.id}, "supervisor", heartbeat=True)
    going = RunUpdate(alice, second.id, second.assistant_message_id, tokens(1, "Hi"), "Hi",
                      {"status": "streaming", "run_id": second.id}, "supervisor", heartbeat=True)
    controls = await store.flush_runs([ended, poisoned, going])
    outcomes = [(controls[new.id].applied, controls[new.id].rejected) for new in (first, theirs, second)]
    assert outcomes == [(True, False), (False, True), (True, False)]
    done, left, still = (await store.read_run(alice, first.id, 0), await store.read_run(bob, theirs.id, 0),
                         await store.read_run(alice, second.id, 0))
    assert (done.run.status, done.message.content, done.message.metadata["status"]) == ("complete", "Hello", "complete")
    assert [b.frames for b in done.batches] == [ended.batch.frames]  # type: ignore[union-attr]
    assert (still.run.status, still.message.content, [b.last_seq for b in still.batches]) == ("running", "Hi", [1])
    assert (left.run.status, left.message.content, left.batches) == ("running", "", [])  # nothing of it, events too
    # The store is not stuck on it: the run's next update is written.
    fine = RunUpdate(bob, theirs.id, theirs.assistant_message_id, tokens(1, "fine"), "fine", {}, "supervisor")
    assert (await store.flush_runs([fine]))[theirs.id].applied


async def test_maintenance_ends_dead_runs_with_their_saved_text_and_expires_events(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    dead, stopped = await start(store, caller), await start(store, caller)
    for new in (dead, stopped):
        saved = RunUpdate(caller, new.id, new.assistant_message_id, tokens(1, "Half ", "an answer"),
                          "Half an answer", {"status": "streaming", "run_id": new.id, "seq": 2}, "supervisor")
        await store.flush_runs([saved])
    await store.request_stop(caller, stopped.id, 4)
    await anyio.sleep(0.05)
    await store.maintain_runs(caller, 0.01, 3600)  # both runs are older than that without a heartbeat: dead
    interrupted = await store.read_run(caller, dead.id, 0)
    # Ended past every id a viewer can have been shown: the 2 saved, then 2 + UNSAVED_EVENTS_MAX + 1.
    assert interrupted.run.status == "interrupted" and interrupted.run.last_seq == reaped_seq(2) == 1003
    assert interrupted.message.content == "Half an answer"
    assert interrupted.message.metadata["status"] == "interrupted"
    assert '"code":"RUN_INTERRUPTED"' in interrupted.batches[-1].frames.replace(" ", "")
    cut_short = await store.read_run(caller, stopped.id, 0)
    assert cut_short.run.status == "stopped" and cut_short.message.content == "Half"
    await store.maintain_runs(caller, 30, 0)  # expired at once: only each run's last batch (its end) stays
    assert [(b.first_seq, b.last_seq) for b in (await store.read_run(caller, dead.id, 0)).batches] == [(1003, 1003)]


async def test_a_dead_runs_stored_answer_is_what_its_replay_streams(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    """Events are saved every 250 ms, the text every second, so at a crash the events run ahead: the run is ended
    with the text they stream, stopped ones cut to what the user saw, and the stored answer and the replay agree."""
    caller = new_caller()
    dead, stopped = await start(store, caller), await start(store, caller)
    for new in (dead, stopped):
        ahead = RunUpdate(caller, new.id, new.assistant_message_id, tokens(1, "Half ", "an answer", " and more"),
                          "Half an answer", {"status": "streaming", "run_id": new.id, "seq": 3}, "supervisor")
        await store.flush_runs([ahead])
    await store.request_stop(caller, stopped.id, 12)
    await anyio.sleep(0.05)
    await store.maintain_runs(caller, 0.01, 3600)
    view = await store.read_run(caller, dead.id, 0)
    replayed = streamed_text("".join(batch.frames for batch in view.batches))
    assert view.message.content == replayed == "Half an answer and more"
    assert (await store.read_run(caller, stopped.id, 0)).message.content == "Half an answ"  # its first 12


async def test_admitting_a_turn_reads_through_indexes_not_across_every_run(tmp_path: Path) -> None:
    # Every statement a turn's admission and start runs (SQLite) is planned as an index search or a write by key:
    # a scan of the running runs in each admission made a burst of turns quadratic (the per-user reap once did).
    import sqlite3

    from services.store.sqlite import runs as sqlite_runs

    store = SQLiteStore(str(tmp_path / "plan.db"))
    await store.open()
    try:
        for _ in range(3):  # other users' runs, running and ended
            other = Caller(new_id())
            await finish(store, other, await start(store, other))
            await start(store, other)
    finally:
        await store.aclose()
    db = sqlite3.connect(str(tmp_path / "plan.db"), isolation_level=None)
    db.row_factory = sqlite3.Row
    db.create_function(sqlite_listing.WORDS_FUNCTION, 2, sqlite_listing.indexed_words, deterministic=True)
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    begun = sqlite_runs.begin_run(db, Caller(new_id()), NewRun(new_id(), "hello", "AI Chat"), OPEN, 50)
    db.set_trace_callback(None)
    assert begun.outcome == "started"
    plans = {}
    for sql in statements:
        own = sql.split(None, 1)[0].upper() in ("SELECT", "UPDATE", "DELETE", "INSERT")
        if own and "_words_" not in sql:  # not FTS5's reads of its own one-row config tables
            plans[sql] = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
    assert plans, statements
    scans = {sql: plan for sql, plan in plans.items() if any(step.startswith("SCAN") for step in plan)}
    assert scans == {}


# -- the usage ledger (services/store/sqlite/usage.py, migrations/013_usage_ledger.sql) -----------------------------


def call(index: int, tokens: int, cost: float | None = 0.001) -> CallUsage:
    return CallUsage("supervisor", "m.one", tokens, 1, index=index, cost=cost, estimated=index == 2)


async def test_a_flush_sent_again_writes_each_call_once(store: Store, new_caller: Callable[[], Caller]) -> None:
    caller = new_caller()
    new = await start(store, caller)
    first = RunUpdate(caller, new.id, new.assistant_message_id, calls=(call(0, 10), call(1, 20)))
    for _ in range(2):  # the first answer lost: the same calls sent again
        assert (await store.flush_runs([first]))[new.id].applied
    end = RunUpdate(caller, new.id, new.assistant_message_id, content="done", metadata={"status": "complete"},
                    agent_type="supervisor", final_status="complete", calls=(call(1, 20), call(2, 30, None)))
    for _ in range(2):
        await store.flush_runs([end])
    report = await store.usage_report(caller, time.time() - 60)
    assert report.by_model == [{"model_id": "m.one", "calls": 3, "estimated_calls": 1, "input_tokens": 60,
                                "output_tokens": 3, "cache_read_tokens": 0, "cache_write_tokens": 0,
                                "cost": pytest.approx(0.002)}]  # the unpriced call costs nothing, null alone
    assert report.by_conversation == [{"conversation_id": new.conversation_id, "calls": 3, "tokens": 63,
                                       "cost": pytest.approx(0.002)}]
    assert (report.reserved_tokens, report.reserved_cost) == (0, 0)
    # Only since the period's start: none of it is from the future.
    assert (await store.usage_report(caller, time.time() + 60)).by_model == []


async def test_a_run_ended_elsewhere_or_deleted_still_records_the_calls_its_worker_sends(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    """Its user ended it (a short staleness) or deleted its conversation while the model answered: the worker's end,
    refused, still puts what the calls cost in the ledger, under the run's user and conversation, for the budget."""
    caller = new_caller()
    since = time.time() - 60
    reaped = await start(store, caller)
    await store.maintain_runs(caller, 0.001, 3600)
    deleted = await start(store, caller)
    await store.delete_conversation(caller, deleted.conversation_id)
    ends = [RunUpdate(caller, new.id, new.assistant_message_id, content="cut", metadata={"status": "complete"},
                      agent_type="supervisor", final_status="complete", calls=(call(0, 100 * n), call(2, 7)),
                      conversation_id=new.conversation_id) for n, new in enumerate((reaped, deleted), 1)]
    controls = await store.flush_runs(ends)
    assert [(controls[new.id].gone, controls[new.id].applied) for new in (reaped, deleted)] == [(True, False)] * 2
    assert controls[deleted.id].deleted
    report = await store.usage_report(caller, since)
    assert sorted((c["conversation_id"], c["calls"], c["tokens"]) for c in report.by_conversation) == sorted(
        [(reaped.conversation_id, 2, 109), (deleted.conversation_id, 2, 209)])
    assert (report.reserved_tokens, report.reserved_cost) == (0, 0)


async def test_a_budget_counts_the_ledger_and_the_running_runs_reservations(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    caller, other = new_caller(), new_caller()
    since = time.time() - 60
    budget = TurnBudget((BudgetLimit("day", "tokens", 1000, since), BudgetLimit("month", "cost", 1.0, since)),
                        reserve_tokens=400, reserve_cost=0.1)
    limits = TurnLimits(30, 3600, budget=budget)
    held = await start(store, caller, limits=limits)
    used = RunUpdate(caller, held.id, held.assistant_message_id, calls=(call(0, 99),))  # 100 of its 400
    await store.flush_runs([used])
    report = await store.usage_report(caller, since)
    assert (report.reserved_tokens, report.reserved_cost) == (300, pytest.approx(0.099))
    await start(store, caller, limits=limits)  # 100 used + 300 held + 400 of its own: 800, within 1000
    refused = await store.begin_run(caller, NewRun(new_id(), "hello", "AI Chat"), limits, 50)
    assert refused.outcome == "budget_exceeded" and refused.run is None
    assert refused.budget == BudgetRefusal("day", "tokens", 1000, 800)
    assert (await store.begin_run(other, NewRun(new_id(), "hello", "AI Chat"), limits, 50)).outcome == "started"
    await finish(store, caller, held)  # its end releases what it held beyond its 100
    assert (await store.begin_run(caller, NewRun(new_id(), "hello", "AI Chat"), limits, 50)).outcome == "started"
