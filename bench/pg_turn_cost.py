"""What a chat turn costs PostgreSQL on the production store, statement by statement.

What: starts a throwaway cluster (tests/pg.py's binaries, with ``pg_stat_statements`` preloaded and ``track = all``, so
statements inside our functions are counted too), creates the Supabase database with every migration, then, on one
connection and acting as PostgREST does (``role`` and ``request.jwt.claims`` set per transaction), begins ``USERS``
turns (``api.agent_run_begin``) and flushes each run ``FLUSHES`` times with five token events and its text, then its
end (``api.agent_runs_flush``, 200 runs a call). Prints the time per begin and per flushed update, the statements by
total time and the functions by their own time.

Why: the benchmark's production target measures the whole (PostgreSQL's CPU per turn from /proc); this says which
statement it goes to, without the stand-in, the service or the network in between. Serial, so the figures are of one
session's work; under load they are higher.

    .venv/bin/python bench/pg_turn_cost.py [USERS] [FLUSHES]     # default 300 5
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from psycopg.types.json import Jsonb  # noqa: E402

from bench import procs  # noqa: E402
from tests import pg  # noqa: E402

FLUSH_BATCH = 200


def start(root: str) -> pg.Cluster:
    binaries, user = pg.pg_bin(), pg._server_user()
    data, sockets, port = f"{root}/data", f"{root}/sock", procs.free_port()
    os.makedirs(sockets)
    if user is not None:
        for path in (root, sockets):
            shutil.chown(path, user, user)
    pg._run([str(binaries / "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C",
             "--no-sync"], user)
    options = (f"-c listen_addresses='' -k {sockets} -p {port} -c fsync=off -c synchronous_commit=off "
               "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all "
               "-c track_functions=all -c timezone=UTC")
    pg._run([str(binaries / "pg_ctl"), "-D", data, "-l", f"{root}/log", "-o", options, "-w", "start"], user)
    return pg.Cluster(sockets, port)


def call(db: psycopg.Connection[Any], claims: dict[str, str], function: str, args: dict[str, Any]) -> Any:
    with db.transaction():
        # The headers as the service's requests carry them: its begins show the run secret (migrations/017).
        db.execute("select set_config('search_path', 'api', true), set_config('role', %s, true),"
                   " set_config('request.jwt.claims', %s, true), set_config('request.headers', %s, true)",
                   (claims["role"], json.dumps(claims), json.dumps(pg.SERVICE)))
        named = ", ".join(f"{name} => %s" for name in args)
        return db.execute(f"select api.{function}({named})", list(args.values())).fetchone()[0]  # type: ignore[index]


def begin_args() -> dict[str, Any]:
    return {"p_run_id": str(uuid.uuid4()), "p_conversation_id": str(uuid.uuid4()), "p_text": "What invoices do I have?",
            "p_title": "What invoices do I have?", "p_user_message_id": str(uuid.uuid4()),
            "p_assistant_message_id": str(uuid.uuid4()), "p_stale_seconds": 30.0, "p_events_ttl": 600.0,
            "p_window_seconds": 60, "p_history_limit": 50, "p_write_key": secrets.token_hex(32),
            "p_client_message_id": str(uuid.uuid4()), "p_chat_limit": 1000, "p_stream_limit": 10}


def turns(db: psycopg.Connection[Any], users: list[str], flushes: int) -> tuple[float, float]:
    """Seconds per begin and per flushed update."""
    runs, started = [], time.perf_counter()
    for user in users:
        args = begin_args()
        outcome = call(db, {"sub": user, "role": "authenticated"}, "agent_run_begin", args)
        assert outcome["outcome"] == "started", outcome
        runs.append((args["p_run_id"], args["p_write_key"]))
    begun, started = time.perf_counter() - started, time.perf_counter()
    text, seq = "", 0
    for round_ in range(flushes + 1):
        final = round_ == flushes
        frames = "".join(f'id: {seq + k}\ndata: {{"type":"token","content":"word{k} "}}\n\n' for k in range(1, 6))
        text += "".join(f"word{k} " for k in range(1, 6))
        updates = [{"run_id": run, "write_key": key, "first_seq": seq + 1, "last_seq": seq + 5, "frames": frames,
                    "content": text, "metadata": {"status": "complete" if final else "streaming"},
                    "agent_type": "supervisor", "heartbeat": True, "final_status": "complete" if final else None}
                   for run, key in runs]
        for at in range(0, len(updates), FLUSH_BATCH):
            call(db, {"role": "anon"}, "agent_runs_flush", {"p_updates": Jsonb(updates[at:at + FLUSH_BATCH])})
        seq += 5
    return begun / len(users), (time.perf_counter() - started) / (len(users) * (flushes + 1))


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    flushes = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    root = tempfile.mkdtemp(prefix="canvalo-pgcost-")
    if pg._server_user() is not None:
        shutil.chown(root, "postgres", "postgres")
    cluster = start(root)
    try:
        pg.create_supabase_database(cluster, "cost")
        users = [str(uuid.uuid4()) for _ in range(count)]
        with cluster.connect("cost") as admin:
            admin.execute("create extension pg_stat_statements")
            admin.execute("update canvalo_private.settings set value = 1000000 where name = 'writes_per_minute'")
            for user in users:
                admin.execute("insert into auth.users (id) values (%s)", (user,))
            admin.execute("select pg_stat_statements_reset(), pg_stat_reset()")
        with psycopg.connect(cluster.dsn("cost", "authenticator"), autocommit=True) as db:
            per_begin, per_update = turns(db, users, flushes)
        print(f"{count} begins, {flushes + 1} flushes each: {per_begin * 1000:.2f} ms a begin, "
              f"{per_update * 1000:.2f} ms a flushed update (client wall, serial)")
        with cluster.connect("cost") as admin:
            print("\ncalls  total ms  ms/call  statement")
            for calls, total, mean, query in admin.execute(
                    "select calls, total_exec_time, total_exec_time / calls,"
                    " left(regexp_replace(query, '\\s+', ' ', 'g'), 90)"
                    " from pg_stat_statements order by total_exec_time desc limit 20"):
                print(f"{calls:5d} {total:9.1f} {mean:8.3f}  {query}")
            print("\ncalls  self ms  function")
            for name, calls, own in admin.execute(
                    "select funcname, calls, self_time from pg_stat_user_functions order by self_time desc limit 12"):
                print(f"{calls:5d} {own:8.1f}  {name}")
    finally:
        subprocess.run([str(pg.pg_bin() / "pg_ctl"), "-D", f"{root}/data", "-m", "immediate", "stop"],
                       user=pg._server_user(), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
