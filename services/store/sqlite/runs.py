"""Chat runs in SQLite: ``begin_run``, ``flush_runs``, ``read_run``, ``request_stop`` and ``maintain_runs`` of the
``Store`` interface (``services.store`` says what each must do), as functions on a store thread's connection.

The tables (``MIGRATION``, applied by ``SQLiteStore`` as migration 2): ``agent_runs``, one row per chat turn, and
``agent_run_events``, one row per flush of a run holding that flush's SSE frames. A partial unique index allows one
``running`` run per conversation, and another one run per ``(user_id, client_message_id)``, so the rules hold even
between worker processes that race. Times are Unix seconds (``time.time()``). A flush's model calls go to the usage
ledger and a turn's budgets are checked by ``usage.py`` (migration 8), in the same transactions.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import replace
from typing import Any

from errors import ConversationNotFound, RunNotFound
from services.store import (Caller, EventBatch, NewRun, Run, RunBegun, RunControl, RunUpdate, RunView, TurnLimits,
                            run_log)
from services.store.shared import columns, from_row
from services.store.sqlite import limits as sqlite_limits
from services.store.sqlite import branches
from services.store.sqlite import usage as sqlite_usage
from services.store.sqlite.listing import insert_conversation
from services.store.sqlite.writer import write_transaction

MIGRATION = """
CREATE TABLE agent_runs (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL REFERENCES agent_conversations (id) ON DELETE CASCADE,
    user_message_id TEXT NOT NULL,
    assistant_message_id TEXT NOT NULL,
    client_message_id TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'complete', 'error', 'interrupted', 'stopped')),
    last_seq INTEGER NOT NULL DEFAULT 0,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    stop_seen_chars INTEGER,
    created_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    ended_at REAL,
    events_purged INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX agent_runs_one_running_per_conversation ON agent_runs (conversation_id) WHERE status = 'running';
CREATE UNIQUE INDEX agent_runs_client_message ON agent_runs (user_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
CREATE INDEX agent_runs_running ON agent_runs (user_id, heartbeat_at) WHERE status = 'running';
-- Only ended runs whose events are still kept: what the retention sweep reads stays small however many runs exist.
CREATE INDEX agent_runs_events_kept ON agent_runs (ended_at) WHERE ended_at IS NOT NULL AND events_purged = 0;
CREATE TABLE agent_run_events (
    run_id TEXT NOT NULL REFERENCES agent_runs (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    frames TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
"""

logger = logging.getLogger(__name__)

_RUN_COLUMNS = columns(Run)
_STREAMING = "streaming"
# SQLite's default limit on bound parameters is 32766 (3.32+); IN lists are chunked well below it.
_IN_CHUNK = 500


def begin_run(db: sqlite3.Connection, caller: Caller, new: NewRun, limits: TurnLimits, history_limit: int) -> RunBegun:
    now = time.time()
    with write_transaction(db):
        if new.client_message_id is not None:
            earlier = _run_for_client_message(db, caller, new.client_message_id)
            if earlier is not None:
                run, conversation_id, text = earlier
                same = conversation_id == new.conversation_id and (
                    text == new.text if new.regenerate_id is None else run.user_message_id == _answered(db, new))
                return RunBegun("existing" if same else "conflict", run)
        _maintain(db, now, limits.stale_seconds, limits.events_ttl, caller.user_id)
        owner = db.execute(
            "SELECT user_id, active_leaf_id FROM agent_conversations WHERE id = ?", (new.conversation_id,)
        ).fetchone()
        if owner is not None and owner["user_id"] != caller.user_id:
            raise ConversationNotFound()
        # A conversation that does not exist yet has no runs: one statement fewer for a new conversation's turn.
        running = None if owner is None else db.execute(
            f"SELECT {_RUN_COLUMNS} FROM agent_runs WHERE conversation_id = ? AND status = 'running'",
            (new.conversation_id,),
        ).fetchone()
        if running is not None:
            return RunBegun("in_progress", _run(running))
        parent_id, answered = branches.target(db, new, None if owner is None else owner["active_leaf_id"])
        refused = _refusal(db, caller, limits, now)
        if refused is not None:
            return refused
        if owner is None:
            insert_conversation(db, caller, new.conversation_id, new.title)
        if answered is None:
            branches.write_message(db, new.conversation_id, new.user_message_id, "user", new.text, parent_id)
        return _start(db, caller, new, answered or new.user_message_id, history_limit, now, limits)


def _answered(db: sqlite3.Connection, new: NewRun) -> str | None:
    """The user message a regenerate answers again (None if its target is not an answer of this conversation)."""
    row = db.execute(
        "SELECT parent_id FROM agent_messages WHERE id = ? AND conversation_id = ?",
        (new.regenerate_id, new.conversation_id),
    ).fetchone()
    return None if row is None else row[0]


def _refusal(db: sqlite3.Connection, caller: Caller, limits: TurnLimits, now: float) -> RunBegun | None:
    """The chat-rate hit (counted even when refused) and the stream slots (the caller's running runs)."""
    if limits.chat_limit is not None:
        allowed, retry_after = sqlite_limits.hit(db, caller.user_id, "chat", limits.window_seconds, limits.chat_limit)
        if not allowed:
            return RunBegun("rate_limited", retry_after=retry_after)
    if limits.stream_limit is not None:
        held, oldest = db.execute(
            "SELECT count(*), min(heartbeat_at) FROM agent_runs WHERE user_id = ? AND status = 'running'",
            (caller.user_id,),
        ).fetchone()
        if held >= limits.stream_limit:
            return RunBegun("streams_full", retry_after=max(0.0, oldest + limits.stale_seconds - now))
    if limits.budget is not None:
        return sqlite_usage.budget_refusal(db, caller, limits.budget)
    return None


def _start(
    db: sqlite3.Connection, caller: Caller, new: NewRun, user_message_id: str, history_limit: int, now: float,
    limits: TurnLimits,
) -> RunBegun:
    """The answer's placeholder under ``user_message_id``, now the active leaf, and the run, which records the
    prompt's path."""
    history = branches.history(db, new.conversation_id, user_message_id, history_limit)
    branches.write_message(db, new.conversation_id, new.assistant_message_id, "assistant", "", user_message_id,
                           {"status": _STREAMING, "run_id": new.id, "seq": 0})
    db.execute("UPDATE agent_conversations SET active_leaf_id = ? WHERE id = ?",
               (new.assistant_message_id, new.conversation_id))
    budget = limits.budget
    db.execute(
        "INSERT INTO agent_runs (id, user_id, conversation_id, user_message_id, assistant_message_id,"
        " client_message_id, status, created_at, heartbeat_at, prompt_message_ids, reserved_tokens, reserved_cost)"
        " VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
        (new.id, caller.user_id, new.conversation_id, user_message_id, new.assistant_message_id,
         new.client_message_id, now, now, json.dumps([m.id for m in history]),
         budget.reserve_tokens if budget else 0, budget.reserve_cost if budget else 0.0),
    )
    run = Run(new.id, new.conversation_id, user_message_id, new.assistant_message_id, new.client_message_id,
              "running", 0, now)
    return RunBegun("started", run, history)


# What SQLite refuses in an update whenever it is sent: text it cannot encode (``UnicodeEncodeError`` is a
# ``ValueError``), a value it cannot bind, a constraint. Anything else (a full disk, a lock) fails the whole flush.
_REFUSED = (ValueError, TypeError, OverflowError, sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError,
            sqlite3.ProgrammingError)


def flush_runs(db: sqlite3.Connection, updates: list[RunUpdate]) -> dict[str, RunControl]:
    """See ``Store.flush_runs``: every update in one write transaction, each in a savepoint of its own, so one that
    SQLite refuses is undone alone (``rejected``) and the others are written; then the controls of the same runs."""
    now = time.time()
    applied: set[str] = set()
    rejected: set[str] = set()
    with write_transaction(db):
        for update in updates:
            written = _apply_alone(db, update, now)
            if written is None:
                rejected.add(update.run_id)
            elif written:
                applied.add(update.run_id)
        controls = _controls(db, [u.run_id for u in updates])
    return {
        u.run_id: replace(controls.get(u.run_id, RunControl(gone=True, deleted=True)), applied=u.run_id in applied,
                          rejected=u.run_id in rejected)
        for u in updates
    }


def _apply_alone(db: sqlite3.Connection, update: RunUpdate, now: float) -> bool | None:
    """``_apply`` in a savepoint: whether the update was written, or None when SQLite refused it (nothing of it is)."""
    db.execute("SAVEPOINT run_update")
    try:
        written = _apply(db, update, now)
    except _REFUSED as exc:
        db.execute("ROLLBACK TO run_update")
        db.execute("RELEASE run_update")
        # By type only: the error's text can quote the answer.
        logger.warning("SQLite refused a chat run's update (%s)", type(exc).__name__)
        return None
    db.execute("RELEASE run_update")
    return written


def _write_calls(db: sqlite3.Connection, update: RunUpdate, row: sqlite3.Row | None, now: float) -> None:
    """The update's model calls into the ledger, whatever became of its run: ended elsewhere, by its user, or deleted
    with its conversation (then under the caller and the conversation the worker names), the calls were spent."""
    if not update.calls:
        return
    owner = (row[2], row[3]) if row is not None else (update.caller.user_id, update.conversation_id)
    if owner[1] is not None:
        sqlite_usage.write_calls(db, update.run_id, owner[0], owner[1], update.calls, now)


def _apply(db: sqlite3.Connection, update: RunUpdate, now: float) -> bool:
    """Write the update if its run is still running; whether it was. A run another worker ended (or whose
    conversation was deleted) takes no more writes but its calls, and its owner learns that from the controls."""
    row = db.execute("SELECT status, last_seq, user_id, conversation_id FROM agent_runs WHERE id = ?",
                     (update.run_id,)).fetchone()
    _write_calls(db, update, row, now)
    if row is None:
        return False
    if row[0] != "running":
        # This very end, already written (a retry after the first answer was lost), counts as written.
        return update.final_status == row[0] and update.batch is not None and update.batch.last_seq == row[1]
    # Still running now means still running for every statement below: the caller's transaction holds the write lock.
    if update.batch is not None:
        db.execute(
            "INSERT OR IGNORE INTO agent_run_events (run_id, seq, last_seq, frames) VALUES (?, ?, ?, ?)",
            (update.run_id, update.batch.first_seq, update.batch.last_seq, update.batch.frames),
        )
    if update.content is not None:
        db.execute(
            "UPDATE agent_messages SET content = ?, metadata = ?, agent_type = ? WHERE id = ?",
            (update.content, json.dumps(update.metadata or {}), update.agent_type, update.message_id),
        )
    if update.final_status is not None:
        last_seq = update.batch.last_seq if update.batch is not None else None
        db.execute(
            "UPDATE agent_runs SET status = ?, ended_at = ?, heartbeat_at = ?,"
            " last_seq = coalesce(?, (SELECT max(last_seq) FROM agent_run_events WHERE run_id = ?), 0)"
            " WHERE id = ? AND status = 'running'",
            (update.final_status, now, now, last_seq, update.run_id, update.run_id),
        )
    elif update.heartbeat:
        db.execute("UPDATE agent_runs SET heartbeat_at = ? WHERE id = ? AND status = 'running'", (now, update.run_id))
    return True


def _controls(db: sqlite3.Connection, run_ids: list[str]) -> dict[str, RunControl]:
    """The controls of the runs that still exist; a run that ended counts as gone unless a stop ended it here."""
    controls: dict[str, RunControl] = {}
    for start in range(0, len(run_ids), _IN_CHUNK):
        part = run_ids[start : start + _IN_CHUNK]
        rows = db.execute(
            f"SELECT id, status, stop_requested, stop_seen_chars FROM agent_runs"
            f" WHERE id IN ({','.join('?' * len(part))})",
            part,
        )
        for run_id, status, stop, seen in rows:
            controls[run_id] = RunControl(stop=bool(stop), seen_chars=seen, gone=status != "running")
    return controls


def read_run(db: sqlite3.Connection, caller: Caller, run_id: str, after: int | None) -> RunView:
    row = db.execute(
        f"SELECT {_RUN_COLUMNS} FROM agent_runs WHERE id = ? AND user_id = ?", (run_id, caller.user_id)
    ).fetchone()
    if row is None:
        raise RunNotFound()
    run = _run(row)
    batches: list[EventBatch] = []
    if after is not None:
        rows = db.execute(
            "SELECT seq, last_seq, frames FROM agent_run_events WHERE run_id = ? AND last_seq > ? ORDER BY seq",
            (run_id, after),
        )
        batches = [EventBatch(first, last, frames) for first, last, frames in rows]
    message = db.execute(f"SELECT {branches.MESSAGE_COLUMNS} FROM agent_messages WHERE id = ?",
                         (run.assistant_message_id,))
    return RunView(run, branches.message_row(message.fetchone()), batches)


def running_run(db: sqlite3.Connection, caller: Caller, conversation_id: str) -> Run | None:
    row = db.execute(
        f"SELECT {_RUN_COLUMNS} FROM agent_runs WHERE conversation_id = ? AND user_id = ? AND status = 'running'",
        (conversation_id, caller.user_id),
    ).fetchone()
    return None if row is None else _run(row)


def request_stop(db: sqlite3.Connection, caller: Caller, run_id: str, seen_chars: int | None) -> None:
    with write_transaction(db):
        found = db.execute("SELECT 1 FROM agent_runs WHERE id = ? AND user_id = ?", (run_id, caller.user_id))
        if found.fetchone() is None:
            raise RunNotFound()
        db.execute(
            "UPDATE agent_runs SET stop_requested = 1, stop_seen_chars = ? WHERE id = ? AND status = 'running'",
            (seen_chars, run_id),
        )


def maintain_runs(db: sqlite3.Connection, caller: Caller | None, stale_seconds: float, events_ttl: float) -> None:
    with write_transaction(db):
        _maintain(db, time.time(), stale_seconds, events_ttl, caller.user_id if caller is not None else None)


def _maintain(db: sqlite3.Connection, now: float, stale_seconds: float, events_ttl: float, user_id: str | None) -> None:
    _reap(db, now, stale_seconds, user_id)
    of_user, user = _of_user(user_id)
    expired = db.execute(
        f"SELECT id, last_seq FROM agent_runs WHERE ended_at < ? AND events_purged = 0 {of_user}",
        (now - events_ttl, *user),
    ).fetchall()
    # Keep each expired run's last batch (it holds the terminal event), so a late resume still ends cleanly.
    db.executemany("DELETE FROM agent_run_events WHERE run_id = ? AND last_seq < ?", expired)
    db.executemany("UPDATE agent_runs SET events_purged = 1 WHERE id = ?", [(run_id,) for run_id, _ in expired])


def _reap(db: sqlite3.Connection, now: float, stale_seconds: float, user_id: str | None) -> None:
    """End runs whose worker stopped heartbeating, with their last saved text and a terminal event."""
    of_user, user = _of_user(user_id, "r.")
    stale = db.execute(
        "SELECT r.id, r.conversation_id, r.assistant_message_id, r.stop_requested, r.stop_seen_chars,"
        " m.content, m.agent_type, coalesce((SELECT max(last_seq) FROM agent_run_events e WHERE e.run_id = r.id), 0)"
        " FROM agent_runs r JOIN agent_messages m ON m.id = r.assistant_message_id"
        f" WHERE r.status = 'running' AND r.heartbeat_at < ? {of_user}",
        (now - stale_seconds, *user),
    ).fetchall()
    for run_id, conversation_id, message_id, stop, seen, content, agent_type, last_seq in stale:
        status = "stopped" if stop else "interrupted"
        if stop:
            item = run_log.complete_chunk(run_id, message_id, conversation_id, agent_type, status="stopped",
                                          stop_reason="stopped")
        else:
            item = run_log.interrupted_chunk(run_id)
        seq = run_log.reaped_seq(last_seq)
        # The answer its saved events stream (they run ahead of the text saved every second): its stored text and
        # its replay then say the same.
        frames = db.execute("SELECT frames FROM agent_run_events WHERE run_id = ? ORDER BY seq", (run_id,))
        content = run_log.streamed_text("".join(row[0] for row in frames)) or content
        metadata: dict[str, Any] = {"status": status, "run_id": run_id}
        if not stop:
            metadata["error_code"] = "RUN_INTERRUPTED"
        db.execute(
            "INSERT OR IGNORE INTO agent_run_events (run_id, seq, last_seq, frames) VALUES (?, ?, ?, ?)",
            (run_id, seq, seq, run_log.frame(seq, item)),
        )
        db.execute(
            "UPDATE agent_messages SET content = ?, metadata = ? WHERE id = ?",
            (run_log.cut(content, seen if stop else None), json.dumps(metadata), message_id),
        )
        db.execute(
            "UPDATE agent_runs SET status = ?, ended_at = ?, last_seq = ? WHERE id = ?", (status, now, seq, run_id)
        )


def _of_user(user_id: str | None, table: str = "") -> tuple[str, tuple[str, ...]]:
    """The condition limiting maintenance to one user's runs (none for the periodic sweep of all). Written out, not
    as "(? IS NULL OR user_id = ?)": with that SQLite cannot use the (user_id, heartbeat_at) index, and every turn's
    admission scanned every running run (quadratic in a burst of turns)."""
    return (f"AND {table}user_id = ?", (user_id,)) if user_id is not None else ("", ())


def _run_for_client_message(
    db: sqlite3.Connection, caller: Caller, client_message_id: str
) -> tuple[Run, str, str] | None:
    row = db.execute(
        f"SELECT {', '.join('r.' + c for c in _RUN_COLUMNS.split(', '))}, m.content"
        " FROM agent_runs r JOIN agent_messages m ON m.id = r.user_message_id"
        " WHERE r.user_id = ? AND r.client_message_id = ?",
        (caller.user_id, client_message_id),
    ).fetchone()
    if row is None:
        return None
    return _run(row), row["conversation_id"], row["content"]


def _run(row: sqlite3.Row) -> Run:
    return from_row(Run, row)
