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

import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

MAX_GROUP = 64  # a group holds the write lock, so readers in other processes wait at most this many writes

Work = Callable[[sqlite3.Connection], Any]
_Job = tuple[Work, "Future[Any]"]


class GroupWriter:
    """``submit(work)`` runs ``work(connection)`` on the writer thread; ``connect`` gives that thread's connection
    and ``translate`` turns a sqlite3 error into the store's own (both run on the writer thread)."""

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], translate: Callable[[sqlite3.Error], Exception]
    ) -> None:
        self._connect = connect
        self._translate = translate
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="sqlite-writer", daemon=True)
        self._thread.start()

    def submit(self, work: Work) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((work, future))
        return future

    def shutdown(self) -> None:
        """Finish the writes already submitted, then stop."""
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while True:
            group, last = self._next_group()
            group = [job for job in group if job[1].set_running_or_notify_cancel()]  # a caller gone before its turn
            if len(group) == 1:
                self._alone(*group[0])
            elif group:
                self._together(group)
            if last:
                return

    def _next_group(self) -> tuple[list[_Job], bool]:
        """The next write and those already waiting behind it; whether shutdown was asked after them."""
        first = self._jobs.get()
        if first is None:
            return [], True
        group = [first]
        while len(group) < MAX_GROUP:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return group, True
            group.append(job)
        return group, False

    def _alone(self, work: Work, future: Future[Any]) -> None:
        try:
            result = work(self._connect())
        except sqlite3.Error as exc:
            future.set_exception(self._translate(exc))
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _together(self, group: list[_Job]) -> None:
        outcomes: list[tuple[Future[Any], Any, Exception | None]] = []
        try:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                for work, future in group:
                    outcomes.append((future, *_in_savepoint(db, work)))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:  # beginning, a savepoint or the commit failed: none of the group happened
            for _, future in group:
                future.set_exception(self._translate(exc))
            return
        for future, result, error in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(self._translate(error) if isinstance(error, sqlite3.Error) else error)


def _in_savepoint(db: sqlite3.Connection, work: Work) -> tuple[Any, Exception | None]:
    """(result, None), or (None, the error) with the write undone. An error of the savepoint itself is raised."""
    db.execute("SAVEPOINT grouped_write")
    try:
        result = work(db)
    except Exception as exc:
        db.execute("ROLLBACK TO grouped_write")
        db.execute("RELEASE grouped_write")
        return None, exc
    db.execute("RELEASE grouped_write")
    return result, None
