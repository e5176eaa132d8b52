"""What a signed-in user can do at the Data API: read their own chat rows, and write only through checked functions.

Every call here is what any browser holding a session can send: the publishable key and the user's own access token,
straight to PostgREST (the stand-in over real PostgreSQL 15 with every migration, ``tests/fake_postgrest.py``).
The world is built by the service's own store (``PostgrestStore``), so the rows are the ones production writes. Each
test compares the two users' rows before and after the attack: a refusal that still changed something fails too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb
from starlette.testclient import TestClient

from services.domains import BY_TABLE
from services.retry import RetryPolicy
from services.store import CallUsage, Caller, EventBatch, NewAction, NewRun, Run, RunUpdate, TurnLimits
from services.store import run_log
from services.store.postgrest.client import PostgrestClient
from services.store.postgrest.store import PostgrestStore
from tests.conftest import DATABASE, AuthHeaders
from tests.pg import MIGRATIONS_DIR, RUN_SECRET, SERVICE, act_as, create_supabase_database
from tests.support import new_id, window_room
from tests.tokens import TEST_PUBLISHABLE_KEY, mint

pytestmark = pytest.mark.anyio

REST = "/rest/v1/"
LIMITS = TurnLimits(stale_seconds=30, events_ttl=3600)
CHAT_TABLES = ("agent_conversations", "agent_messages", "agent_runs", "agent_run_events", "pending_actions",
               "agent_usage")
# Every function a user can call through the Data API. A new one fails test_every_api_function_is_attacked until it
# is added to ATTACKS below, so no write path goes untried.
API_FUNCTIONS = {
    "agent_conversation_create", "agent_conversation_delete", "agent_conversation_rename",
    "agent_conversation_set_leaf", "agent_conversations_search", "agent_message_branch", "agent_run_begin", "agent_run_read", "agent_run_stop", "agent_runs_flush",
    "agent_runs_maintain", "agent_usage_report", "pending_action_apply", "pending_action_prepare", "rate_limit_hit",
}


@dataclass
class Account:
    """One user's world, written by the service's store: a finished turn, a turn still generating, an invoice and a
    pending change to it."""

    caller: Caller
    conversation: str
    done: Run  # complete, with events
    running: Run  # still generating, in a second conversation
    write_key: str  # the running run's, as the store keeps it
    invoice: str
    action: str


@pytest.fixture
async def store(fake_postgrest: Any, supabase_url: str) -> AsyncIterator[PostgrestStore]:
    retry = RetryPolicy(attempts=3, base_delay=0, max_delay=0, max_total=5)
    made = PostgrestStore(PostgrestClient(supabase_url, "api", TEST_PUBLISHABLE_KEY, retry=retry, timeout=10),
                          RUN_SECRET)
    await made.open()
    yield made
    await made.aclose()


@pytest.fixture
def rest(supabase_url: str) -> Callable[..., httpx.Response]:
    """A request as ``caller``: the publishable key and their own token, nothing else."""

    def call(method: str, path: str, caller: Caller, **kwargs: Any) -> httpx.Response:
        signed = {"Authorization": f"Bearer {caller.access_token}"} if caller.access_token else {}  # else anon
        headers = {"apikey": TEST_PUBLISHABLE_KEY, **signed, "Prefer": "return=representation",
                   **kwargs.pop("headers", {})}
        return httpx.request(method, f"{supabase_url}{REST}{path}", headers=headers, timeout=10, **kwargs)

    return call


@pytest.fixture
def account(store: PostgrestStore, register_user: Callable[[str], None]) -> Callable[[], Any]:
    async def make() -> Account:
        user = new_id()
        register_user(user)
        caller = Caller(user, mint(user))
        done = await _begin(store, caller, new_id(), "What invoices do I have?")
        frames = run_log.frame(1, run_log.chunk("token", "invoices", content="You have one.", run_id=done.id))
        await store.flush_runs([RunUpdate(caller, done.id, done.assistant_message_id, EventBatch(1, 1, frames),
                                          "You have one.", {"status": "complete", "run_id": done.id}, "invoices",
                                          True, "complete", (CallUsage("invoices", "m", 10, 2, cost=0.5),))])
        running = await _begin(store, caller, new_id(), "And proposals?")
        invoice = new_id()
        await store.insert_record(caller, BY_TABLE["invoices"], {
            "id": invoice, "invoice_number": "INV-1", "client_name": "Ada", "due_date": "2026-12-01",
            "total_amount": 50, "status": "draft"})
        action = await store.create_action(caller, NewAction("invoices", "update_invoice", "update", invoice,
                                                             {"status": "paid"}, "Mark INV-1 paid",
                                                             {"status": "draft"}), 600)
        return Account(caller, done.conversation_id, done, running, store._write_keys[running.id], invoice, action.id)

    return make


async def _begin(store: PostgrestStore, caller: Caller, conversation: str, text: str) -> Run:
    begun = await store.begin_run(caller, NewRun(conversation, text, text), LIMITS, 20)
    assert begun.outcome == "started" and begun.run is not None
    return begun.run


@pytest.fixture
def rows(pg_cluster: Any) -> Callable[..., list[str]]:
    """Every row the given users own, anywhere the chat lives (and their invoices and run keys), as text."""

    def read(*callers: Caller) -> list[str]:
        users = [c.user_id for c in callers]
        owned = {
            "api.agent_conversations t": "t.user_id = any(%(u)s::uuid[])",
            "api.agent_messages t": "t.conversation_id in (select id from api.agent_conversations"
                                    " where user_id = any(%(u)s::uuid[]))",
            "api.agent_runs t": "t.user_id = any(%(u)s::uuid[])",
            "api.agent_run_events t": "t.run_id in (select id from api.agent_runs where user_id = any(%(u)s::uuid[]))",
            "api.pending_actions t": "t.user_id = any(%(u)s::uuid[])",
            "api.agent_usage t": "t.user_id = any(%(u)s::uuid[])",
            "api.invoices t": "t.user_id = any(%(u)s::uuid[])",
            "canvalo_private.run_keys t": "t.user_id = any(%(u)s::uuid[])",
        }
        with pg_cluster.connect(DATABASE) as db:
            found = []
            for table, condition in owned.items():
                query = f"select '{table}: ' || to_jsonb(t)::text from {table} where {condition}"
                found += [row[0] for row in db.execute(query, {"u": users})]  # type: ignore[arg-type]
        return sorted(found)

    return read


# -- the tables: SELECT and nothing more -----------------------------------------------------------------------------


def _direct_writes(victim: Account, attacker: Account) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """INSERT, UPDATE and DELETE on every chat table, aimed at the victim's rows and at the attacker's own."""
    for target in (victim, attacker):
        by_id = {
            "agent_conversations": target.conversation, "agent_messages": target.done.assistant_message_id,
            "agent_runs": target.done.id, "pending_actions": target.action,
        }
        inserts = {
            "agent_conversations": {"id": new_id(), "user_id": attacker.caller.user_id, "title": "planted"},
            "agent_messages": {"id": new_id(), "conversation_id": target.conversation, "role": "user",
                               "content": "planted", "metadata": {"status": "streaming", "run_id": victim.running.id}},
            "agent_runs": {"id": new_id(), "user_id": attacker.caller.user_id, "conversation_id": target.conversation,
                           "user_message_id": target.done.user_message_id,
                           "assistant_message_id": victim.done.assistant_message_id},
            "agent_run_events": {"run_id": target.running.id, "seq": 1, "last_seq": 1, "frames": "id: 1\ndata: {}\n\n"},
            "pending_actions": {"id": new_id(), "user_id": attacker.caller.user_id, "table_name": "invoices",
                                "tool": "delete_invoice", "kind": "delete", "record_id": target.invoice,
                                "summary": "planted", "expires_at": "2099-01-01T00:00:00Z"},
            "agent_usage": {"run_id": target.done.id, "call_index": 7, "user_id": attacker.caller.user_id,
                            "conversation_id": target.conversation, "agent_type": "invoices", "model_id": "m",
                            "input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0},
        }
        changes = {
            "agent_conversations": {"title": "renamed"}, "agent_messages": {"content": "rewritten"},
            "agent_runs": {"status": "running", "assistant_message_id": victim.done.user_message_id},
            "agent_run_events": {"frames": "forged"}, "pending_actions": {"used_at": None},
            "agent_usage": {"input_tokens": 0, "cost": 0},  # a refund
        }
        for table in CHAT_TABLES:
            row_filter = ({"run_id": f"eq.{target.done.id}"} if table in ("agent_run_events", "agent_usage")
                          else {"id": f"eq.{by_id[table]}"})
            yield "POST", table, {"json": inserts[table]}
            key = {"agent_run_events": "run_id,seq", "agent_usage": "run_id,call_index"}.get(table, "id")
            yield "POST", table, {"json": inserts[table], "params": {"on_conflict": key},
                                  "headers": {"Prefer": "resolution=merge-duplicates"}}
            yield "PATCH", table, {"params": row_filter, "json": changes[table]}
            yield "DELETE", table, {"params": row_filter}


async def test_the_chat_tables_are_read_only_through_the_data_api(
    account: Callable[[], Any], rest: Callable[..., httpx.Response], rows: Callable[..., list[str]]
) -> None:
    alice, bob = await account(), await account()
    before = rows(alice.caller, bob.caller)
    for method, table, kwargs in _direct_writes(alice, bob):
        for caller in (bob.caller, alice.caller):
            response = rest(method, table, caller, **kwargs)
            assert (response.status_code, response.json()["code"]) == (403, "42501"), (method, table, kwargs)
    assert rows(alice.caller, bob.caller) == before
    # Reading stays as it was: each sees their own rows, never the other's.
    for table in CHAT_TABLES:
        mine = rest("GET", table, alice.caller, params={"select": "*"}).json()
        assert mine and all(_owner(row, alice) for row in mine), table


def _owner(row: dict[str, Any], account: Account) -> bool:
    return (row.get("user_id") == account.caller.user_id or row.get("conversation_id") == account.conversation
            or row.get("conversation_id") == account.running.conversation_id
            or row.get("run_id") in (account.done.id, account.running.id))


def test_the_migration_leaves_authenticated_only_select_on_chat_tables(pg_cluster: Any) -> None:
    with pg_cluster.connect(DATABASE) as db:
        for table in CHAT_TABLES:
            granted = [privilege for privilege in ("select", "insert", "update", "delete", "truncate")
                       if db.execute("select has_table_privilege('authenticated', %s, %s)",
                                     (f"api.{table}", privilege)).fetchone()[0]]  # type: ignore[index]
            columns = db.execute(
                "select count(*) from information_schema.column_privileges where table_schema = 'api'"
                " and table_name = %s and grantee in ('authenticated', 'anon', 'PUBLIC')"
                " and privilege_type <> 'SELECT'", (table,)).fetchone()
            assert (granted, columns) == (["select"], (0,)), table
        private = db.execute("select has_schema_privilege('authenticated', 'canvalo_private', 'usage')").fetchone()
        assert private == (False,)


# -- the functions: each checks the caller owns every row it touches --------------------------------------------------


def _begin_args(conversation: str, **overrides: Any) -> dict[str, Any]:
    args = {"p_run_id": new_id(), "p_conversation_id": conversation, "p_text": "hi", "p_title": "hi",
            "p_user_message_id": new_id(), "p_assistant_message_id": new_id(), "p_stale_seconds": 30,
            "p_events_ttl": 3600, "p_window_seconds": 60, "p_history_limit": 10, "p_write_key": "k" * 64}
    return {**args, **overrides}


def _flush(run: Run, key: str | None, **update: Any) -> dict[str, Any]:
    return {"p_updates": [{"run_id": run.id, "write_key": key, **update}]}


def _prepare_args(record_id: str, **overrides: Any) -> dict[str, Any]:
    args = {"p_id": new_id(), "p_table": "invoices", "p_tool": "delete_invoice", "p_kind": "delete",
            "p_record_id": record_id, "p_changes": None, "p_before": {"invoice_number": "INV-1"}, "p_summary": "x",
            "p_ttl_seconds": 600}
    return {**args, **overrides}


def _attacks(alice: Account, bob: Account) -> list[tuple[str, Caller, dict[str, Any]]]:
    """(function, as whom, arguments): Bob with Alice's ids, anyone with no token at all, and Alice with her own ids
    in wrong combinations. A run's write key is the authority to write it (009), so no one is tried with Alice's key
    but Alice: it never leaves the service."""
    frames = "id: 2\ndata: {\"type\":\"token\",\"content\":\"SYSTEM NOTE: confirm your card\"}\n\n"
    forged = {"first_seq": 1, "last_seq": 1, "frames": frames, "content": "SYSTEM NOTE: confirm your card",
              "metadata": {"status": "complete"}, "final_status": "complete", "heartbeat": True,
              "calls": [{"call_index": 3, "agent_type": "invoices", "model_id": "m", "input_tokens": 1,
                         "output_tokens": 1, "cache_read_tokens": 0, "cache_write_tokens": 0, "cost": 0}]}
    a, b, anon = alice.caller, bob.caller, Caller("anon")
    return [
        ("agent_conversation_create", b, {"p_id": alice.conversation, "p_title": "mine now"}),
        ("agent_conversation_rename", b, {"p_id": alice.conversation, "p_title": "renamed"}),
        ("agent_conversation_delete", b, {"p_id": alice.conversation}),
        ("agent_conversations_search", b, {"p_terms": ["invoices"], "p_limit": 10}),
        ("agent_run_begin", b, _begin_args(alice.conversation)),
        ("agent_run_begin", b, _begin_args(new_id(), p_run_id=alice.running.id)),
        ("agent_run_begin", b, _begin_args(new_id(), p_user_message_id=alice.done.user_message_id)),
        ("agent_run_begin", b, _begin_args(new_id(), p_assistant_message_id=alice.done.assistant_message_id)),
        ("agent_run_begin", a, _begin_args(alice.conversation, p_assistant_message_id=alice.done.user_message_id)),
        ("agent_run_begin", a, _begin_args(new_id(), p_run_id=alice.running.id, p_write_key="x" * 64)),
        # Branch points (012): another user's message, or one of the wrong role, is refused before anything is written.
        ("agent_run_begin", b, _begin_args(bob.conversation, p_parent_message_id=alice.done.assistant_message_id)),
        ("agent_run_begin", b, _begin_args(new_id(), p_regenerate_message_id=alice.done.assistant_message_id)),
        ("agent_run_begin", b, _begin_args(alice.conversation, p_edit_message_id=alice.done.user_message_id)),
        ("agent_run_begin", a, _begin_args(alice.conversation, p_edit_message_id=alice.done.assistant_message_id)),
        ("agent_run_begin", a, _begin_args(alice.conversation, p_regenerate_message_id=alice.done.user_message_id)),
        ("agent_run_begin", a, _begin_args(alice.conversation, p_parent_message_id=alice.done.assistant_message_id,
                                           p_edit_message_id=alice.done.user_message_id)),
        ("agent_conversation_set_leaf", b, {"p_id": alice.conversation, "p_message_id": alice.done.user_message_id}),
        ("agent_conversation_set_leaf", b, {"p_id": bob.conversation, "p_message_id": alice.done.user_message_id}),
        ("agent_message_branch", b, {"p_conversation_id": alice.conversation}),
        ("agent_message_branch", b, {"p_conversation_id": bob.conversation, "p_leaf": alice.done.user_message_id}),
        ("agent_runs_flush", b, _flush(alice.running, bob.write_key, **forged)),
        ("agent_runs_flush", b, _flush(alice.done, bob.write_key, **forged)),
        ("agent_runs_flush", anon, _flush(alice.running, None, **forged)),
        ("agent_runs_flush", anon, _flush(alice.running, bob.write_key, **forged)),
        ("agent_runs_flush", a, _flush(alice.running, None, **forged)),  # no key: the service's run is not hers
        ("agent_runs_flush", a, _flush(alice.running, "x" * 64, **forged)),
        ("agent_runs_flush", a, _flush(alice.done, alice.write_key, **forged)),  # ended: written once
        ("agent_runs_flush", a, {"p_updates": [{"run_id": alice.running.id, "write_key": alice.write_key,
                                                "first_seq": 5, "last_seq": 5, "frames": frames}]}),  # a gap
        ("agent_runs_flush", a, _flush(alice.running, alice.write_key, final_status="running")),
        # Bounds on one call: too many updates, an id near the integer's end (which would have wedged the run).
        ("agent_runs_flush", a, {"p_updates": [{"run_id": alice.running.id, "write_key": alice.write_key}] * 501}),
        ("agent_runs_flush", a, _flush(alice.running, alice.write_key, first_seq=1, last_seq=2147483647,
                                       frames=frames)),
        ("agent_run_read", b, {"p_run_id": alice.running.id, "p_after": 0}),
        ("agent_run_stop", b, {"p_run_id": alice.running.id, "p_seen_chars": 0}),
        ("agent_runs_maintain", b, {"p_stale_seconds": 0.001, "p_events_ttl": 0}),
        ("pending_action_prepare", b, _prepare_args(alice.invoice)),
        ("pending_action_prepare", b, _prepare_args(bob.invoice, p_id=alice.action)),
        ("pending_action_prepare", a, _prepare_args(alice.invoice, p_kind="update",
                                                    p_changes={"user_id": bob.caller.user_id},
                                                    p_before={"user_id": alice.caller.user_id})),
        ("pending_action_prepare", a, _prepare_args(alice.done.user_message_id, p_table="agent_messages")),
        # A before that names a column the change does not set, or none at all, or a value its column cannot hold.
        ("pending_action_prepare", a, _prepare_args(alice.invoice, p_kind="update", p_changes={"status": "paid"},
                                                    p_before={"status": "draft", "notes": None})),
        ("pending_action_prepare", a, _prepare_args(alice.invoice, p_before=None)),
        ("pending_action_prepare", a, _prepare_args(alice.invoice, p_kind="update",
                                                    p_changes={"total_amount": "9" * 200 + "x"},
                                                    p_before={"total_amount": 50})),
        ("pending_action_apply", b, {"p_action_id": alice.action}),
        ("rate_limit_hit", b, {"p_bucket": "chat", "p_window_seconds": 60, "p_max_hits": 1}),
        # The ledger (013): Bob reads only his own; a begin's budget cannot be negative (a refund by reservation).
        ("agent_usage_report", b, {"p_since": "2000-01-01T00:00:00Z"}),
        ("agent_run_begin", a, _begin_args(new_id(), p_budget={"limits": [], "reserve_tokens": -1000000,
                                                                "reserve_cost": 0})),
        ("agent_run_begin", a, _begin_args(new_id(), p_budget={"limits": [{"period": "week", "unit": "tokens",
                                                                           "limit": 1, "since": 0}],
                                                                "reserve_tokens": 0, "reserve_cost": 0})),
    ] + [(name, anon, {}) for name in sorted(API_FUNCTIONS - {"agent_runs_flush"})]  # refused to anon, unread


async def test_every_api_function_is_attacked(pg_cluster: Any, account: Callable[[], Any]) -> None:
    with pg_cluster.connect(DATABASE) as db:
        callable_by_users = {
            name for (name,) in db.execute(
                "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
                " where n.nspname = 'api' and has_function_privilege('authenticated', p.oid, 'execute')")
        }
        callable_by_anon = {
            name for (name,) in db.execute(
                "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
                " where n.nspname = 'api' and has_function_privilege('anon', p.oid, 'execute')")
        }
        anon_tables = db.execute(
            "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = 'api'"
            " and (has_table_privilege('anon', c.oid, 'select, insert, update, delete, truncate, references')"
            "      or (c.relkind = 'S' and has_sequence_privilege('anon', c.oid, 'usage, select, update')))"
            " and c.relkind in ('r', 'v', 'm', 'p', 'f', 'S')").fetchone()
    alice, bob = await account(), await account()
    assert callable_by_users == API_FUNCTIONS == {name for name, _, _ in _attacks(alice, bob)}
    # With no token, the run write key's function and nothing else (009): no table, no other function.
    assert (callable_by_anon, anon_tables) == ({"agent_runs_flush"}, (0,))


async def test_no_function_writes_another_users_rows_or_breaks_a_reference(
    account: Callable[[], Any], rest: Callable[..., httpx.Response], rows: Callable[..., list[str]]
) -> None:
    alice, bob = await account(), await account()
    before = rows(alice.caller)
    answers = []
    for function, caller, args in _attacks(alice, bob):
        response = rest("POST", f"rpc/{function}", caller, json=args)
        assert response.status_code < 500, (function, response.text)
        answers.append((function, response.status_code, response.text))
    assert rows(alice.caller) == before, answers
    # And nothing leaked on the way: Bob's reads of Alice's ids found nothing.
    found = {function: text for function, status, text in answers if status == 200}
    assert json.loads(found["agent_run_read"]) is None
    assert json.loads(found["agent_message_branch"]) == {"outcome": "message_not_found"}  # the last one: Bob's own
    usage = json.loads(found["agent_usage_report"])
    assert {row["conversation_id"] for row in usage["by_conversation"]} == {bob.conversation}
    searched = json.loads(found["agent_conversations_search"])["rows"]
    assert searched and {row["user_id"] for row in searched} == {bob.caller.user_id}


async def test_a_run_is_written_only_by_the_worker_that_began_it(
    store: PostgrestStore, account: Callable[[], Any], rest: Callable[..., httpx.Response],
    rows: Callable[..., list[str]],
) -> None:
    alice = await account()
    run = alice.running
    # Alice, calling the function the service calls, with her own token: nothing she sends without the key lands.
    forged = {"first_seq": 1, "last_seq": 1, "frames": "id: 1\ndata: {}\n\n", "content": "forged", "heartbeat": True}
    before = rows(alice.caller)
    answer = rest("POST", "rpc/agent_runs_flush", alice.caller, json=_flush(run, None, **forged))
    # Without the key the run is not hers to write, and the answer tells nothing of it.
    assert answer.json() == [{"run_id": run.id, "stop": False, "seen_chars": None, "gone": True, "deleted": True,
                              "applied": False}]
    assert rows(alice.caller) == before
    # The service's flushes, which carry the key, do; and only forward.
    tokens = [run_log.frame(i, run_log.chunk("token", "invoices", content=f"t{i}", run_id=run.id)) for i in (1, 2, 3)]
    first = RunUpdate(alice.caller, run.id, run.assistant_message_id, EventBatch(1, 2, "".join(tokens[:2])), "t1t2",
                      {"status": "streaming", "run_id": run.id, "seq": 2}, "invoices")
    assert (await store.flush_runs([first]))[run.id].gone is False
    # A flush whose answer was lost is sent again with what came since: the new event is kept, nothing twice.
    again = RunUpdate(alice.caller, run.id, run.assistant_message_id, EventBatch(1, 3, "".join(tokens)))
    await store.flush_runs([again])
    view = await store.read_run(alice.caller, run.id, 0)
    assert [(b.first_seq, b.last_seq) for b in view.batches] == [(1, 2), (3, 3)]
    assert "".join(b.frames for b in view.batches) == "".join(tokens)
    assert view.message.content == "t1t2"


@pytest.mark.parametrize("shown", [None, "", "x" * 48, RUN_SECRET[:-1], RUN_SECRET.upper(), "x" + RUN_SECRET])
async def test_a_user_calling_begin_directly_is_refused_and_can_write_nothing(
    shown: str | None, account: Callable[[], Any], rest: Callable[..., httpx.Response],
    rows: Callable[..., list[str]],
) -> None:
    """Only the service begins a run that can be written (017): without its run secret, a begin is refused whole, so
    no user ever holds a write key, and the flush (as anon, outside the database's write ceiling) writes nothing of
    theirs: not events, not text, not ledger rows, whatever limits, budget or key the caller chose."""
    alice = await account()
    before = rows(alice.caller)
    args = _begin_args(new_id(), p_chat_limit=None, p_stream_limit=None)
    headers = {} if shown is None else {"X-Canvalo-Run-Secret": shown}
    refused = rest("POST", "rpc/agent_run_begin", alice.caller, json=args, headers=headers)
    assert (refused.status_code, refused.json()["code"]) == (403, "28P01")
    call = {"call_index": 0, "agent_type": "invoices", "model_id": "m", "input_tokens": 1, "output_tokens": 1,
            "cache_read_tokens": 0, "cache_write_tokens": 0, "cost": 1000}
    flushed = rest("POST", "rpc/agent_runs_flush", Caller("anon"),
                   json=_flush(Run(args["p_run_id"], "", "", "", None, "running", 0, 0), args["p_write_key"],
                               first_seq=1, last_seq=1, frames="id: 1\ndata: {}\n\n", content="my own words",
                               heartbeat=True, calls=[call]))
    assert flushed.json()[0]["gone"] is True
    assert rows(alice.caller) == before


async def test_a_run_key_outlives_its_run_for_a_day_and_goes_when_its_user_begins_again(
    store: PostgrestStore, account: Callable[[], Any], pg_cluster: Any
) -> None:
    """Keys say whose run they were (017), so a run deleted with its conversation still has its calls recorded; a key
    whose run is not running goes a day after it was made, when its user next begins, and a running run's stays."""
    alice, bob = await account(), await account()
    gone = await _begin(store, alice.caller, new_id(), "deleted meanwhile")
    await store.delete_conversation(alice.caller, gone.conversation_id)

    def keys(user: str) -> dict[str, tuple[str, str]]:
        with pg_cluster.connect(DATABASE) as db:
            found = db.execute("select run_id::text, user_id::text, conversation_id::text"
                               " from canvalo_private.run_keys where user_id = %s", (user,)).fetchall()
        return {run: (owner, conversation) for run, owner, conversation in found}

    mine = keys(alice.caller.user_id)
    assert mine[gone.id] == (alice.caller.user_id, gone.conversation_id)  # its run is gone, its key is not
    assert {alice.done.id, alice.running.id} <= set(mine)
    with pg_cluster.connect(DATABASE) as db:
        db.execute("update canvalo_private.run_keys set created_at = now() - interval '25 hours'"
                   " where user_id = any(%s::uuid[])", ([alice.caller.user_id, bob.caller.user_id],))
    new = await _begin(store, alice.caller, new_id(), "again")
    assert set(keys(alice.caller.user_id)) == {alice.running.id, new.id}
    assert set(keys(bob.caller.user_id)) == {bob.done.id, bob.running.id}  # another user's begin purges only theirs


def test_every_version_of_begin_needs_the_run_secret(pg_cluster: Any) -> None:
    """The check is on the run's key, which every agent_run_begin registers: an earlier file run again alone brings
    back its own begin, and that one is refused without the secret too (and takes it, with it)."""
    name = "run_secret_rerun"
    create_supabase_database(pg_cluster, name)
    user = new_id()
    with pg_cluster.connect(name) as db:
        db.execute("insert into auth.users (id) values (%s)", (user,))
        for earlier in ("007_checked_writes.sql", "013_usage_ledger.sql", "015_lean_begin.sql"):
            db.execute((MIGRATIONS_DIR / earlier).read_text())  # type: ignore[arg-type]
            args = _begin_args(new_id())
            named = ", ".join(f"{key} => %({key})s" for key in args)
            for headers, refused in (({}, True), (SERVICE, False)):
                try:
                    with db.transaction():
                        act_as(db, user, headers=headers)
                        outcome = db.execute(f"select api.agent_run_begin({named})", args).fetchone()[0]["outcome"]
                except psycopg.errors.InvalidPassword:  # 28P01
                    outcome = "refused"
                assert (outcome == "refused") is refused, (earlier, headers, outcome)
                args = {**args, "p_run_id": new_id(), "p_user_message_id": new_id(),
                        "p_assistant_message_id": new_id(), "p_conversation_id": new_id()}


@pytest.mark.parametrize("bad", [{"p_stale_seconds": 0}, {"p_stale_seconds": None}, {"p_events_ttl": -1},
                                 {"p_events_ttl": None}, {"p_history_limit": -1}, {"p_write_key": "k" * 63}])
async def test_begin_refuses_bad_arguments_and_writes_nothing(
    bad: dict[str, Any], account: Callable[[], Any], rest: Callable[..., httpx.Response],
    rows: Callable[..., list[str]],
) -> None:
    """Its run-maintenance arguments too, which 015 checks itself since it calls agent_runs_maintain only when a run
    needs it: a turn with a nonsense staleness or events lifetime is refused, not begun."""
    alice = await account()
    before = rows(alice.caller)
    refused = rest("POST", "rpc/agent_run_begin", alice.caller, json=_begin_args(new_id(), **bad))
    assert (refused.status_code, refused.json()["code"]) == (400, "22023")
    assert rows(alice.caller) == before


def _frames(run: Run, first: int, last: int) -> str:
    return "".join(run_log.frame(i, run_log.chunk("token", "invoices", content=f"t{i}", run_id=run.id))
                   for i in range(first, last + 1))


async def test_one_flush_judges_each_update_alone_and_ends_at_the_events_it_stored(
    store: PostgrestStore, account: Callable[[], Any], rest: Callable[..., httpx.Response], pg_cluster: Any,
    rows: Callable[..., list[str]],
) -> None:
    """One call carries many runs and writes each step for all of them at once (014): each update is still judged
    alone, a bad one skipped and the others applied, and an end sent with its last events ends at them."""
    alice = await account()
    ending, bad = alice.running, await _begin(store, alice.caller, new_id(), "b")
    resent = await _begin(store, alice.caller, new_id(), "c")
    await store.flush_runs([RunUpdate(alice.caller, resent.id, resent.assistant_message_id,
                                      EventBatch(1, 1, _frames(resent, 1, 1)))])
    ended = await _begin(store, alice.caller, new_id(), "d")
    key = store._write_keys.__getitem__
    ended_key = key(ended.id)  # the store forgets it once the end is answered
    await store.flush_runs([RunUpdate(alice.caller, ended.id, ended.assistant_message_id,
                                      EventBatch(1, 1, _frames(ended, 1, 1)), final_status="error")])
    call = {"call_index": 0, "agent_type": "invoices", "model_id": "m", "input_tokens": 1, "output_tokens": 1,
            "cache_read_tokens": 0, "cache_write_tokens": 0}
    bad_before = await store.read_run(alice.caller, bad.id, 0)
    unknown = new_id()
    updates = [
        {"run_id": ending.id, "write_key": key(ending.id), "first_seq": 1, "last_seq": 2,
         "frames": _frames(ending, 1, 2), "content": "t1t2", "metadata": {"status": "complete"},
         "final_status": "complete", "calls": [call]},
        {"run_id": bad.id, "write_key": key(bad.id), "first_seq": 1, "last_seq": 1, "frames": _frames(bad, 1, 1),
         "content": "x", "heartbeat": True, "final_status": "running", "calls": [call]},
        {"run_id": resent.id, "write_key": key(resent.id), "first_seq": 1, "last_seq": 3,
         "frames": _frames(resent, 1, 3), "heartbeat": True},
        {"run_id": ended.id, "write_key": ended_key, "final_status": "error", "last_seq": 1},  # its end again
        {"run_id": alice.done.id, "write_key": "k" * 64, "final_status": "complete", "last_seq": 1},
        {"run_id": unknown, "write_key": "k" * 64, "heartbeat": True},
    ]
    answer = {row.pop("run_id"): row for row in rest("POST", "rpc/agent_runs_flush", Caller("anon"),
                                                     json={"p_updates": updates}).json()}
    written, refused = {"stop": False, "seen_chars": None, "gone": False, "deleted": False, "applied": True}, {
        "stop": False, "seen_chars": None, "gone": True, "deleted": True, "applied": False}
    assert answer == {ending.id: {**written, "gone": True}, bad.id: {**written, "applied": False},
                      resent.id: written, ended.id: {**written, "gone": True}, alice.done.id: refused,
                      unknown: refused}
    view = await store.read_run(alice.caller, ending.id, 0)
    assert (view.run.status, view.run.last_seq, [(b.first_seq, b.last_seq) for b in view.batches]) == (
        "complete", 2, [(1, 2)])
    assert (view.message.content, view.message.metadata) == ("t1t2", {"status": "complete", "run_id": ending.id})
    assert await store.read_run(alice.caller, bad.id, 0) == bad_before
    view = await store.read_run(alice.caller, resent.id, 0)
    assert "".join(b.frames for b in view.batches) == _frames(resent, 1, 3)
    with pg_cluster.connect(DATABASE) as db:
        ledger = db.execute("select run_id::text from api.agent_usage where run_id = any(%s::uuid[])",
                            ([ending.id, bad.id],)).fetchall()
    assert ledger == [(ending.id,)]
    # A run named twice in one call is refused whole: both updates would be judged against the same stored state.
    before = rows(alice.caller)
    twice = [{"run_id": resent.id, "write_key": key(resent.id), "heartbeat": True, "content": "again"}] * 2
    refused_call = rest("POST", "rpc/agent_runs_flush", Caller("anon"), json={"p_updates": twice})
    assert (refused_call.status_code, refused_call.json()["code"]) == (400, "22023")
    assert rows(alice.caller) == before


async def test_concurrent_flushes_lock_their_runs_in_one_order(
    store: PostgrestStore, account: Callable[[], Any], pg_cluster: Any
) -> None:
    """Two workers' flushes can name the same runs in different orders (a run's retry and the next flush): each
    locks its runs in run id order, so neither holds one run while it waits for another the other holds (a deadlock,
    which PostgreSQL ends by failing one flush)."""
    alice = await account()
    low, high = sorted([alice.running, await _begin(store, alice.caller, new_id(), "b")], key=lambda run: run.id)
    updates = [{"run_id": run.id, "write_key": store._write_keys[run.id], "heartbeat": True} for run in (high, low)]
    with pg_cluster.connect(DATABASE) as holder, pg_cluster.connect(DATABASE) as flusher, \
            pg_cluster.connect(DATABASE) as watcher:
        holder.execute("begin")
        holder.execute("select 1 from api.agent_runs where id = %s for update", (low.id,))
        pid = flusher.info.backend_pid
        flushing = asyncio.create_task(asyncio.to_thread(
            lambda: flusher.execute("select api.agent_runs_flush(%s)", (Jsonb(updates),)).fetchone()))
        for _ in range(500):
            waiting = watcher.execute("select wait_event_type from pg_stat_activity where pid = %s", (pid,))
            if waiting.fetchone() == ("Lock",):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the flush never waited for the run held")
        # It waits for the lower run holding nothing, so the higher one, sent first, is free to take.
        holder.execute("select 1 from api.agent_runs where id = %s for update nowait", (high.id,))
        holder.execute("commit")
        flushed = await flushing
    assert sorted(row["run_id"] for row in flushed[0] if row["applied"]) == [low.id, high.id]


def test_running_an_earlier_migration_again_keeps_every_write_checked(pg_cluster: Any) -> None:
    """Every migration is safe to run again, alone too: 001, 004, 005 and 006 bring back their grants, write
    policies and SECURITY INVOKER functions, and 007's lock closes them again (a reviewer reopened the cross-user
    overwrite by running 004 again after 007); 005 and 007 bring back the pending-action functions 010 replaced,
    which confirmed whatever the record held, and 010's lock closes those until 010 runs again."""
    name = "rerun_earlier"
    create_supabase_database(pg_cluster, name)
    warnings: list[str] = []
    with pg_cluster.connect(name) as db:
        db.add_notice_handler(lambda notice: warnings.append(notice.message_primary or ""))

        def surface() -> tuple[set[str], int, set[str]]:
            writable = {table for table in CHAT_TABLES for privilege in ("insert", "update", "delete")
                        if db.execute("select has_table_privilege('authenticated', %s, %s)",
                                      (f"api.{table}", privilege)).fetchone()[0]}  # type: ignore[index]
            policies = db.execute("select count(*) from pg_policies where schemaname = 'api' and cmd <> 'SELECT'"
                                  " and tablename = any(%s)", (list(CHAT_TABLES),)).fetchone()[0]  # type: ignore[index]
            invokers = {row[0] for row in db.execute(
                "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'api'"
                " and not p.prosecdef and has_function_privilege('authenticated', p.oid, 'execute')")}
            return writable, policies, invokers

        # Each alone: only the one reader that runs as the caller stays open; old writers stay closed until 007.
        for early in ("001_agent_chat.sql", "004_agent_runs.sql", "005_pending_actions.sql",
                      "006_search_and_paging.sql"):
            db.execute((MIGRATIONS_DIR / early).read_text())  # type: ignore[arg-type]
            assert surface() == (set(), 0, {"agent_run_read"}), early
        assert any("apply 007_checked_writes.sql again" in warning for warning in warnings)
        db.execute((MIGRATIONS_DIR / "007_checked_writes.sql").read_text())  # type: ignore[arg-type]
        assert surface() == (set(), 0, {"agent_run_read"})
        # One agent_run_begin, 012's: two would make PostgREST's resolution by name ambiguous (PGRST203).
        begins = db.execute("select pg_get_function_identity_arguments(oid) from pg_proc"
                            " where proname = 'agent_run_begin'").fetchall()
        assert len(begins) == 1 and "p_regenerate_message_id" in begins[0][0]

        def executable() -> set[str]:
            return {row[0] for row in db.execute(
                "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
                " where n.nspname = 'api' and has_function_privilege('authenticated', p.oid, 'execute')")}

        assert executable() == API_FUNCTIONS
        assert any("apply 010_confirm_every_change.sql again" in warning for warning in warnings)
        db.execute((MIGRATIONS_DIR / "010_confirm_every_change.sql").read_text())  # type: ignore[arg-type]
        assert executable() == API_FUNCTIONS
        old = db.execute("select count(*) from pg_proc where proname in ('pending_action_create',"
                         " 'pending_action_confirm')").fetchone()
        assert old == (0,)


def test_007_removes_runs_that_earlier_grants_let_a_user_point_at_another_users_messages(pg_cluster: Any) -> None:
    """Rows planted under 004's grants survive no upgrade: a run of Bob's pointing at Alice's messages (her text
    could be guessed through it, her answer's agent read) is removed; Alice's own run is kept."""
    name = "legacy_crossing_runs"
    create_supabase_database(pg_cluster, name, migrate=False)
    alice, bob = new_id(), new_id()
    ids = {key: new_id() for key in ("run", "conversation", "user_message", "answer", "bobs", "bobs_run")}
    with pg_cluster.connect(name) as db:
        for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
            if path.name < "007":
                db.execute(path.read_text())  # type: ignore[arg-type]
        db.execute("insert into auth.users (id) values (%s), (%s)", (alice, bob))
        act_as(db, alice, local=False)
        db.execute("select api.agent_run_begin(%(run)s, %(conversation)s, 'my bank pin is 4821', 'A',"
                   " %(user_message)s, %(answer)s, 30, 3600, 60, 10)", ids)
        act_as(db, bob, local=False)
        db.execute("insert into api.agent_conversations (id, user_id) values (%s, %s)", (ids["bobs"], bob))
        db.execute("insert into api.agent_runs (id, user_id, conversation_id, user_message_id, assistant_message_id,"
                   " client_message_id) values (%s, %s, %s, %s, %s, %s)",
                   (ids["bobs_run"], bob, ids["bobs"], ids["user_message"], ids["answer"], new_id()))
        db.execute("reset role")
        db.execute((MIGRATIONS_DIR / "007_checked_writes.sql").read_text())  # type: ignore[arg-type]
        kept = {row[0] for row in db.execute("select id::text from api.agent_runs")}
    assert kept == {ids["run"]}


async def test_the_database_keeps_its_own_write_ceiling(
    pg_cluster: Any, account: Callable[[], Any], rest: Callable[..., httpx.Response]
) -> None:
    # The ceiling counts per clock minute (007's over_write_ceiling): the account's writes and these in one minute.
    await asyncio.sleep(window_room(60, 15))
    alice = await account()  # four rows added already: two turns, an action
    with pg_cluster.connect(DATABASE) as db:
        db.execute("update canvalo_private.settings set value = 5 where name = 'writes_per_minute'")
    try:
        answers = [rest("POST", "rpc/agent_conversation_create", alice.caller,
                        json={"p_id": new_id(), "p_title": None}).json()["outcome"] for _ in range(3)]
        turn = rest("POST", "rpc/agent_run_begin", alice.caller, json=_begin_args(new_id())).json()
    finally:
        with pg_cluster.connect(DATABASE) as db:
            db.execute("update canvalo_private.settings set value = 240 where name = 'writes_per_minute'")
    assert answers[-1] == "rate_limited" and turn["outcome"] == "rate_limited" and turn["retry_after"] > 0


# -- reading a conversation: runs are found in their own table, once ------------------------------------------------

STORES = ("supabase",)


def test_planted_metadata_neither_costs_reads_nor_shows_another_users_answer(
    client: TestClient, auth_headers: AuthHeaders, fake_postgrest: Any, pg_cluster: Any
) -> None:
    alice, conversation = new_id(), new_id()
    sent = client.post("/api/chat/stream", json={"message": "Hello", "conversation_id": conversation,
                                                 "user_id": alice}, headers=auth_headers(alice))
    assert sent.status_code == 200
    bobs_run = new_id()
    # What 001-006 let a user insert: 500 messages that say an answer is streaming, one naming another user's run.
    # They continue the conversation's branch (012), so the read below shows them.
    planted = [new_id() for _ in range(500)]
    with pg_cluster.connect(DATABASE) as db:
        (leaf,) = db.execute("select active_leaf_id::text from api.agent_conversations where id = %s",
                             (conversation,)).fetchone()
        db.cursor().executemany(
            "insert into api.agent_messages (id, conversation_id, role, content, metadata, parent_id)"
            " values (%s, %s, 'user', %s, jsonb_build_object('status', 'streaming', 'run_id', %s::text), %s)",
            [(planted[g - 1], conversation, f"planted {g}", bobs_run if g == 1 else new_id(), ([leaf] + planted)[g - 1])
             for g in range(1, 501)])
        db.execute("update api.agent_conversations set active_leaf_id = %s where id = %s", (planted[-1], conversation))
    fake_postgrest.reset()
    shown = client.get(f"/api/conversations/{conversation}",
                       params={"user_id": alice, "message_limit": 500, "message_order": "desc"},
                       headers=auth_headers(alice))
    assert shown.status_code == 200
    paths = [r.path.removeprefix(REST) for r in fake_postgrest.requests]
    assert sum(p.startswith(("agent_runs", "rpc/agent_run")) for p in paths) == 1, paths
    assert [m["content"] for m in reversed(shown.json()["messages"])] == [f"planted {g}" for g in range(1, 501)]
