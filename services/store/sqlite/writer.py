"""The embedded store's one writer thread: writes run in order, and the writes waiting together commit together.

Why: with SQLite in WAL mode a write's cost is mostly its commit, which appends every page the write changed to the
log, and a burst of chat turns changes the same few pages again and again (the newest rows of each table and
index). Committing the turns that queued up together as one transaction writes those pages once, not once per turn.
A lone write still commits at once: nothing waits for company.

How: a write is a function of the connection. Alone, it runs as it is (in its own ``write_transaction``). When more
are waiting (up to ``MAX_GROUP``), the writer opens one transaction and runs each write in a savepoint: a write that
fails is undone alone and its caller gets its error, and ``write_transaction`` inside a group is a savepoint too.
Callers hear of success only after the commit; if the commit fails, every write of the group gets that error (none
of them happened).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

MAX_GROUP = 64  # a group holds the write lock: writers in other processes wait at most this many writes

Work = Callable[[sqlite3.Connection], Any]
_Job = tuple[Work, "Future[Any]", bool]  # (work, its caller's future, whether it must run alone)

logger = logging.getLogger(__name__)
_group = threading.local()


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction whose lock is taken up front (BEGIN IMMEDIATE), so two writers queue on busy_timeout
    instead of deadlocking on a lock upgrade; rolled back on any exception. Every write of the store runs in
    one. Inside a group of writes committed together (``GroupWriter``) it is a savepoint of that transaction."""
    if getattr(_group, "active", False):
        db.execute("SAVEPOINT write_transaction")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK TO write_transaction")
            db.execute("RELEASE write_transaction")
            raise
        db.execute("RELEASE write_transaction")
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # a failed COMMIT (busy, a deferred constraint) can leave it open
            db.execute("ROLLBACK")
        raise


class GroupWriter:
    """``submit(work)`` runs ``work(connection)`` on the writer thread; ``connect`` gives that thread's connection
    and ``translate`` turns a sqlite3 or file-system error into the store's own (both run on the writer thread)."""

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], translate: Callable[[sqlite3.Error | OSError], Exception]
    ) -> None:
        self._connect = connect
        self._translate = translate
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._held: _Job | None = None  # a write that must run alone, met while gathering the group before it
        self._thread = threading.Thread(target=self._serve, name="sqlite-writer", daemon=True)
        self._thread.start()

    def submit(self, work: Work, *, alone: bool = False) -> Future[Any]:
        """``alone``: never grouped (schema changes: ``executescript`` commits whatever transaction is open)."""
        if self._closed:
            raise RuntimeError("the store is closed")
        future: Future[Any] = Future()
        self._jobs.put((work, future, alone))
        return future

    def shutdown(self) -> None:
        """Finish the writes already submitted, then stop."""
        self._closed = True
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while True:
            group, last = self._next_group()
            group = [job for job in group if job[1].set_running_or_notify_cancel()]  # a caller gone before its turn
            try:
                if len(group) == 1:
                    self._alone(group[0])
                elif group:
                    self._together(group)
            except BaseException as exc:  # a bug here must not stop every later write: fail this group and go on
                logger.exception("Unexpected error in the SQLite writer")
                for _, future, _ in group:
                    if not future.done():
                        future.set_exception(exc)
            if last:
                return

    def _next_group(self) -> tuple[list[_Job], bool]:
        """The next write and those already waiting behind it; whether shutdown was asked after them."""
        first, self._held = self._held or self._jobs.get(), None
        if first is None:
            return [], True
        group = [first]
        while len(group) < MAX_GROUP and not group[-1][2]:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return group, True
            if job[2]:  # to run alone: next, on its own
                self._held = job
                break
            group.append(job)
        return group, False

    def _alone(self, job: _Job) -> None:
        work, future, _ = job
        try:
            db = self._ready_connection()
            result = work(db)
        except BaseException as exc:
            future.set_exception(self._ours(exc))
            return
        if db.in_transaction:  # a write that left its transaction open: never let it hold the lock or leak
            db.execute("ROLLBACK")
            future.set_exception(RuntimeError("a write left its transaction open"))
            return
        future.set_result(result)

    def _together(self, group: list[_Job]) -> None:
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            db = self._ready_connection()
            db.execute("BEGIN IMMEDIATE")
            _group.active = True
            try:
                for work, future, _ in group:
                    outcomes.append((future, *_in_savepoint(db, work)))
                db.execute("COMMIT")
            finally:
                _group.active = False
                if db.in_transaction:
                    db.execute("ROLLBACK")
        except sqlite3.Error as exc:  # beginning, a savepoint or the commit failed: none of the group happened
            for _, future, _ in group:
                future.set_exception(self._ours(exc))
            return
        for future, result, error in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(self._ours(error))

    def _ready_connection(self) -> sqlite3.Connection:
        """The writer's connection, out of any transaction a failed write may have left open."""
        db = self._connect()
        if db.in_transaction:
            logger.error("The SQLite writer's connection was left in a transaction; rolling it back")
            db.execute("ROLLBACK")
        return db

    def _ours(self, error: BaseException) -> BaseException:
        if not isinstance(error, (sqlite3.Error, OSError)):
            return error
        translated = self._translate(error)
        translated.__cause__ = error
        return translated


def _in_savepoint(db: sqlite3.Connection, work: Work) -> tuple[Any, BaseException | None]:
    """(result, None), or (None, the error) with the write undone. An error of the savepoint itself is raised, and
    so is a write that ended the group's transaction (only ``executescript`` does: a bug, the group cannot stand)."""
    db.execute("SAVEPOINT grouped_write")
    try:
        result = work(db)
    except Exception as exc:
        db.execute("ROLLBACK TO grouped_write")
        db.execute("RELEASE grouped_write")
        return None, exc
    if not db.in_transaction:
        raise sqlite3.OperationalError("a write ended the group's transaction")
    db.execute("RELEASE grouped_write")
    return result, None
