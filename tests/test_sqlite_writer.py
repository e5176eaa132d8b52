"""The embedded store's writer thread, on a real SQLite file: order, groups that commit together, and a failure in
a group that stays with its own write (or, at the commit, with the whole group)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from services.store.sqlite.writer import GroupWriter
from services.store.sqlite.writer import write_transaction


class StoreError(Exception):
    pass


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[GroupWriter, Path]]:
    path = tmp_path / "writer.db"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.executescript(
        "PRAGMA journal_mode = WAL;"
        "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
        "CREATE TABLE item (name TEXT PRIMARY KEY,"
        " parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);"
    )
    setup.close()
    local = threading.local()

    def connect() -> sqlite3.Connection:
        if not hasattr(local, "db"):
            local.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            local.db.execute("PRAGMA foreign_keys = ON")
        db: sqlite3.Connection = local.db
        return db

    writer = GroupWriter(connect, lambda exc: StoreError(type(exc).__name__))
    yield writer, path
    writer.shutdown()


def names(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT name FROM item ORDER BY name")]
    finally:
        db.close()


def insert(name: str, parent: int | None = None, fail: bool = False) -> Any:
    def work(db: sqlite3.Connection) -> tuple[str, bool]:
        with write_transaction(db):
            db.execute("INSERT INTO item (name, parent) VALUES (?, ?)", (name, parent))
        if fail:
            raise ValueError(name)
        return name, db.in_transaction  # in_transaction: inside a group's shared transaction

    return work


def queue_behind_a_held_write(writer: GroupWriter, *works: Any) -> list[Future[Any]]:
    """Submit ``works`` while the writer is busy, so they are waiting together when it is free."""
    release, started = threading.Event(), threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        started.set()
        release.wait(5)

    first = writer.submit(hold)
    assert started.wait(5)
    futures = [writer.submit(work) for work in works]
    release.set()
    first.result(5)
    return futures


def test_a_lone_write_commits_on_its_own(database: tuple[GroupWriter, Path]) -> None:
    writer, path = database
    assert writer.submit(insert("a")).result(5) == ("a", False)
    assert names(path) == ["a"]


def test_writes_waiting_together_commit_together_and_a_failure_is_undone_alone(
    database: tuple[GroupWriter, Path],
) -> None:
    writer, path = database
    futures = queue_behind_a_held_write(
        writer, insert("a"), insert("b", fail=True), insert("a"), insert("c")  # the second "a": a duplicate key
    )
    assert futures[0].result(5) == ("a", True)
    with pytest.raises(ValueError, match="b"):
        futures[1].result(5)  # its own exception, its insert undone
    with pytest.raises(StoreError, match="IntegrityError"):
        futures[2].result(5)  # a sqlite3 error is translated
    assert futures[3].result(5) == ("c", True)
    assert names(path) == ["a", "c"]


def test_when_the_groups_commit_fails_every_write_in_it_fails(database: tuple[GroupWriter, Path]) -> None:
    writer, path = database
    # A deferred foreign key is checked at COMMIT: one bad row makes the whole group's commit fail.
    futures = queue_behind_a_held_write(writer, insert("a"), insert("orphan", parent=42), insert("c"))
    for future in futures:
        with pytest.raises(StoreError, match="IntegrityError"):
            future.result(5)
    assert names(path) == []
    assert writer.submit(insert("d")).result(5) == ("d", False)  # the writer goes on
    assert names(path) == ["d"]


def test_a_write_cancelled_before_its_turn_never_runs(database: tuple[GroupWriter, Path]) -> None:
    writer, path = database
    release, started = threading.Event(), threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        started.set()
        release.wait(5)

    writer.submit(hold)
    assert started.wait(5)
    cancelled, kept = writer.submit(insert("gone")), writer.submit(insert("kept"))
    assert cancelled.cancel()
    release.set()
    assert kept.result(5)[0] == "kept"
    assert names(path) == ["kept"]


def test_shutdown_finishes_what_was_submitted(tmp_path: Path, database: tuple[GroupWriter, Path]) -> None:
    writer, path = database
    futures = [writer.submit(insert(f"n{i:03}")) for i in range(200)]
    writer.shutdown()
    assert all(future.done() for future in futures)
    assert len(names(path)) == 200


def test_a_transaction_left_open_or_a_failed_commit_never_swallows_later_writes(
    database: tuple[GroupWriter, Path],
) -> None:
    writer, path = database

    def leaves_it_open(db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO item (name) VALUES ('open')")

    with pytest.raises(RuntimeError, match="open"):
        writer.submit(leaves_it_open).result(5)
    # A lone write whose own COMMIT fails (a deferred foreign key is checked there) is rolled back, not left open.
    with pytest.raises(StoreError, match="IntegrityError"):
        writer.submit(insert("orphan", parent=42)).result(5)
    assert writer.submit(insert("b")).result(5) == ("b", False)
    assert names(path) == ["b"]  # committed: another connection sees it, and nothing of the failed ones


def test_a_write_that_must_run_alone_is_never_grouped_and_keeps_its_place(database: tuple[GroupWriter, Path]) -> None:
    writer, path = database
    order: list[str] = []

    def schema(db: sqlite3.Connection) -> bool:
        order.append("schema")
        db.executescript("CREATE TABLE IF NOT EXISTS extra (id INTEGER);")  # commits any open transaction
        return db.in_transaction

    def recorded(name: str) -> Any:
        def work(db: sqlite3.Connection) -> Any:
            order.append(name)
            return insert(name)(db)

        return work

    release, started = threading.Event(), threading.Event()
    writer.submit(lambda db: (started.set(), release.wait(5)))
    assert started.wait(5)
    futures = [writer.submit(recorded("a")), writer.submit(schema, alone=True), writer.submit(recorded("c"))]
    release.set()
    assert [f.result(5) for f in futures] == [("a", False), False, ("c", False)]
    assert order == ["a", "schema", "c"]
    assert names(path) == ["a", "c"]


def test_the_writer_survives_any_exception_and_refuses_work_once_shut(database: tuple[GroupWriter, Path]) -> None:
    writer, path = database

    def interrupted(db: sqlite3.Connection) -> None:
        raise KeyboardInterrupt

    futures = queue_behind_a_held_write(writer, insert("a"), interrupted, insert("c"))
    for future in futures:
        with pytest.raises(KeyboardInterrupt):
            future.result(5)  # the group could not finish: none of it happened
    with pytest.raises(KeyboardInterrupt):
        writer.submit(interrupted).result(5)
    assert writer.submit(insert("d")).result(5) == ("d", False)
    assert names(path) == ["d"]
    writer.shutdown()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(insert("late"))


def test_a_file_system_error_is_translated_like_a_sqlite_one(database: tuple[GroupWriter, Path]) -> None:
    # The store's writes touch the file system too (its directory, a lock file): an OSError there is the database
    # being unavailable, and must reach the caller as the store's error, not as a 500 with a traceback.
    writer, path = database

    def unreachable(db: Any) -> None:
        raise FileNotFoundError("the database's directory is gone")

    with pytest.raises(StoreError, match="FileNotFoundError"):
        writer.submit(unreachable).result(5)
    assert writer.submit(insert("a")).result(5) == ("a", False)
