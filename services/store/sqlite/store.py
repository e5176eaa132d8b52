"""The embedded store: SQLite from the standard library, on a small thread pool of its own.

sqlite3 calls block, so each runs on a thread of the store's own, each holding its own connection (a sqlite3
connection must stay on the thread that made it); the event loop only awaits the result, so a slow disk or a
lock held by another worker never stalls the streams the loop is serving. A hop costs about 0.15 ms of CPU on one
core, so a chat turn makes as few as it can (``begin_run``: one hop and one transaction to admit and begin it).

Reads run on ``workers`` threads; every write runs on one writer thread (``_write``, ``writer.py``),
in order, and writes that queue up together commit together. SQLite lets one writer in at a time anyway, and
writers of one process queueing on its lock wait in SQLite's busy handler, which sleeps 1, 2, 5, 10 ms... between
tries: under a burst of chat turns the lock sat idle while the next writer slept (py-spy: most of the store threads'
time in ``BEGIN IMMEDIATE``). Writes from other processes still queue on ``busy_timeout``. WAL mode lets readers
proceed while the writer writes. Writes use ``BEGIN IMMEDIATE`` so two writers never deadlock on a lock upgrade.
Every query is scoped to the caller's ``user_id``.

The schema is migrated at startup from ``MIGRATIONS``; ``PRAGMA user_version`` records how far a file has come.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from errors import UpstreamError, UpstreamUnavailable
from services.store import Caller
from services.store.shared import QueryTiming, observed
from services.store.sqlite import actions as sqlite_actions
from services.store.sqlite import branches as sqlite_branches
from services.store.sqlite import limits as sqlite_limits
from services.store.sqlite import listing as sqlite_listing
from services.store.sqlite import records as sqlite_records
from services.store.sqlite import runs as sqlite_runs
from services.store.sqlite import usage as sqlite_usage
from services.store.sqlite.writer import GroupWriter, write_transaction

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

MIGRATIONS: list[str] = [
    # 1: conversations and messages, compatible with the earlier service's agent_conversations/agent_messages.
    """
    CREATE TABLE agent_conversations (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        title TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        last_message_at TEXT,
        message_count INTEGER NOT NULL DEFAULT 0,
        metadata TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX idx_agent_conversations_user_activity ON agent_conversations (user_id, updated_at DESC, id);
    CREATE TABLE agent_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        conversation_id TEXT NOT NULL REFERENCES agent_conversations (id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        agent_type TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL
    );
    CREATE INDEX idx_agent_messages_conversation ON agent_messages (conversation_id, seq);
    -- Keeps the list order (most recent activity first) and the counters right without a second round trip.
    CREATE TRIGGER agent_messages_touch_conversation AFTER INSERT ON agent_messages
    BEGIN
        UPDATE agent_conversations
           SET updated_at = NEW.created_at, last_message_at = NEW.created_at, message_count = message_count + 1
         WHERE id = NEW.conversation_id;
    END;
    """,
    # 2: chat runs and their event log (services/store/sqlite/runs.py).
    sqlite_runs.MIGRATION,
    # 3: pending actions, the changes the user confirms (services/store/sqlite/actions.py).
    sqlite_actions.MIGRATION,
    # 4: conversation search, replaced by 5 (a file still at 4 has its tables, which 5 drops).
    "",
    # 5: conversation search, full-text indexes of the words of message text and titles (listing.py).
    sqlite_listing.MIGRATION,
    # 6: what a pending action's change replaces, shown to the user and kept for an undo (services/agents/actions.py).
    sqlite_actions.BEFORE_MIGRATION,
    # 7: conversations as message trees: parents, the active leaf, a run's prompt (services/store/sqlite/branches.py).
    sqlite_branches.MIGRATION,
    # 8: the usage ledger, a row per model call, and what a run reserves against the budgets (usage.py).
    sqlite_usage.MIGRATION,
]


def _method(
    function: Callable[Concatenate[sqlite3.Connection, P], T], *, writes: bool
) -> Callable[Concatenate[SQLiteStore, P], Awaitable[T]]:
    """The store method that runs ``function``, a function of a connection, on the writer thread if it ``writes``
    and on a reader thread if not, timed under its name (``observed``), which is the method's."""

    async def method(self: SQLiteStore, *args: P.args, **kwargs: P.kwargs) -> T:
        def work(db: sqlite3.Connection) -> T:
            return function(db, *args, **kwargs)

        return await (self._write(work) if writes else self._read(work))

    method.__name__ = function.__name__
    return observed(method)


class SQLiteStore(QueryTiming):
    kind = "sqlite"

    def __init__(self, path: str, workers: int = 4) -> None:
        # Resolved once: a relative SQLITE_PATH means the directory the service started from. Resolved at each use it
        # would follow a chdir to another database, or fail (FileNotFoundError) once that directory is removed.
        self._path = os.path.abspath(path)
        self._opened = False  # once open, a connection never creates the file: a vanished database is an error
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sqlite")
        self._writer = GroupWriter(self._connection, _store_error)

    async def open(self) -> None:
        """Create the directory (the writer's first connection does) and the schema; called once from the app's
        lifespan."""
        await self._write(self._prepare_schema, alone=True)  # executescript would commit a group's transaction
        self._opened = True

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._readers.shutdown(wait=True)
        self._writer.shutdown()
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()

    # -- plumbing ----------------------------------------------------------------------------------------------

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.wrap_future(self._readers.submit(self._call, work))

    async def _write(self, work: Callable[[sqlite3.Connection], T], *, alone: bool = False) -> T:
        """Run ``work``, which writes, on the writer thread after the writes before it (``alone``: never grouped). A
        cancelled caller does not stop a write already under way."""
        return await asyncio.wrap_future(self._writer.submit(work, alone=alone))

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return work(self._connection())
        except (sqlite3.Error, OSError) as exc:  # translated here, at the boundary (the writer does its own)
            raise _store_error(exc) from exc

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
        return connection

    def _connect(self) -> sqlite3.Connection:
        if not self._opened:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
        # Read-write without create once open: a thread's first connection after the file was deleted would
        # otherwise make a new empty database and answer from it as if every conversation were gone.
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) where a write needs one.
        # check_same_thread=False only so _shutdown can close it; it is otherwise used by one thread alone.
        connection = sqlite3.connect(
            self._uri("rw" if self._opened else "rwc"), uri=True, isolation_level=None, timeout=5.0,
            check_same_thread=False,
        )
        connection.row_factory = sqlite3.Row
        connection.create_function(sqlite_listing.WORDS_FUNCTION, 2, sqlite_listing.indexed_words, deterministic=True)
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA busy_timeout = 5000")
        with self._connections_lock:
            self._connections.append(connection)
        return connection

    def _uri(self, mode: str) -> str:
        return f"{Path(self._path).as_uri()}?mode={mode}"  # as_uri escapes "?", "#" and "%" in the path

    def _prepare_schema(self, db: sqlite3.Connection) -> None:
        """Migrate and create derived tables under a file lock: several workers may start on a new file at once,
        and reading the version or a table's columns before changing them would race without it."""
        with open(f"{self._path}.schema-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._migrate(db)
            sqlite_records.create_tables(db)
            db.executescript(sqlite_limits.SCHEMA)

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            logger.info("Applying SQLite migration %d", number)
            db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")

    # -- health ------------------------------------------------------------------------------------------------

    @observed
    async def ping(self) -> None:
        """Open the file afresh (read-write, never create) so a lost volume shows up, not a cached handle."""

        def work(db: sqlite3.Connection) -> None:
            probe = sqlite3.connect(self._uri("rw"), uri=True, timeout=2.0)
            try:
                probe.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                probe.close()

        await self._read(work)

    @observed
    async def probe_write(self) -> bool | None:
        def work(db: sqlite3.Connection) -> None:
            with write_transaction(db):
                db.execute("INSERT OR REPLACE INTO store_probe (id, written_at) VALUES (1, ?)", (time.time(),))

        try:
            await self._write(work)
        except UpstreamError:
            return False
        return True

    # -- the rest: each a function of a connection named as its method, on a reader thread or the writer thread ----

    # Conversations and their messages (listing.py).
    list_conversations = _method(sqlite_listing.list_conversations, writes=False)
    create_conversation = _method(sqlite_listing.create_conversation, writes=True)
    get_conversation = _method(sqlite_listing.get_conversation, writes=False)
    rename_conversation = _method(sqlite_listing.rename_conversation, writes=True)
    delete_conversation = _method(sqlite_listing.delete_conversation, writes=True)
    message_page = _method(sqlite_listing.message_page, writes=False)
    set_active_leaf = _method(sqlite_listing.set_active_leaf, writes=True)
    # Chat runs (runs.py). A turn's admission and start is one thread hop and one write transaction: each hop costs
    # more (a wake-up, then waiting for the event loop to give up the GIL) than the statements it runs.
    begin_run = _method(sqlite_runs.begin_run, writes=True)
    flush_runs = _method(sqlite_runs.flush_runs, writes=True)
    read_run = _method(sqlite_runs.read_run, writes=False)
    running_run = _method(sqlite_runs.running_run, writes=False)
    request_stop = _method(sqlite_runs.request_stop, writes=True)
    maintain_runs = _method(sqlite_runs.maintain_runs, writes=True)
    usage_report = _method(sqlite_usage.usage_report, writes=False)
    # Business records, for the agents' tools (records.py).
    list_records = _method(sqlite_records.list_records, writes=False)
    get_record = _method(sqlite_records.get_record, writes=False)
    insert_record = _method(sqlite_records.insert_record, writes=True)
    update_record = _method(sqlite_records.update_record, writes=True)
    delete_record = _method(sqlite_records.delete_record, writes=True)
    # Pending actions (actions.py; services/agents/actions.py says why).
    create_action = _method(sqlite_actions.create_action, writes=True)
    get_action = _method(sqlite_actions.get_action, writes=False)
    confirm_action = _method(sqlite_actions.confirm_action, writes=True)

    # -- rate limits (services/limits/rates.py) -------------------------------------------------------------------

    @observed
    async def rate_limit_hit(self, caller: Caller, bucket: str, window_seconds: int, limit: int) -> tuple[bool, float]:
        return await self._write(lambda db: sqlite_limits.hit(db, caller.user_id, bucket, window_seconds, limit))


def _store_error(exc: sqlite3.Error | OSError) -> UpstreamError:
    """sqlite3's errors, and the file system's (the database's directory, lock or probe files): a database that
    cannot be reached is unavailable (503); one that refuses a statement is a store error. Their text (SQL, paths)
    goes to the log, never to a client."""
    if isinstance(exc, (sqlite3.OperationalError, OSError)):
        logger.error("SQLite operational error: %s", exc)
        return UpstreamUnavailable("The database is unavailable.", code="STORE_UNAVAILABLE")
    logger.error("SQLite error: %s", exc)
    return UpstreamError("The database rejected the request.", code="STORE_ERROR")
