"""``PostgrestStore``: each ``Store`` call as one or two PostgREST requests, as the caller (the package docstring,
``services/store/postgrest/__init__.py``, states the semantics it shares with SQLite)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from errors import (ActionAlreadyUsed, ActionExpired, ActionNotFound, AppError, ConversationNotFound, RateLimited,
                    RecordChanged, RecordNotFound, RunNotFound, UpstreamError)
from services.domains import BY_TABLE, Domain
from services.store import (ActionDone, Caller, Conversation, ConversationKey, ConversationPage, EventBatch, MessageKey,
                            MessagePage, NewAction, NewRun, PendingAction, Run, RunBegun, RunControl, RunUpdate,
                            RunView, TurnLimits, UsageReport)
from services.store.postgrest.client import PostgrestClient, is_rejected, postgrest_failure
from services.store.postgrest.params import (branch_seek, conversation_seek, filter_column, filter_value, is_uuid,
                                             owned, record_columns, record_order)
from services.store.postgrest.rows import (action_done_of, bad_response, branch_page_of, budget_json, controls_of,
                                           conversation_of, message_of, pending_action_of, reading, record_of,
                                           run_begun_of, run_of, settled, update_json, usage_report_of)
from services.store.shared import (QueryTiming, columns, observed, page_of_conversations, reads_downwards,
                                   wrong_branch_point)

logger = logging.getLogger(__name__)

ACTIONS = "pending_actions"
CONVERSATIONS = "agent_conversations"
CONVERSATION_COLUMNS = columns(Conversation, ",")
RUNS = "agent_runs"
RUN_COLUMNS = columns(Run, ",")
# The most runs one agent_runs_flush call carries (the function's own bound): a worker's flush is one request per
# this many runs generating on it, whatever the number of users.
FLUSH_BATCH = 500


def write_ceiling(result: dict[str, Any]) -> RateLimited:
    """The database's own ceiling on how fast one user adds rows (007), which the service's limits stay inside unless
    an operator raised them past it."""
    return RateLimited(retry_after=float(result.get("retry_after") or 1.0))


# How the run secret reaches SQL: PostgREST hands every request header to it, lowercased, as request.headers.
RUN_SECRET_HEADER = "x-canvalo-run-secret"


class UnansweredBegins:
    """Begins whose every attempt failed, by the caller's ``client_message_id``, while their run could still be waiting.

    The database may have committed one (PostgREST or the gateway failed after the transaction): its run then holds
    the conversation, and nobody generates it. The client sends the same turn again (the 503 is retryable); sent as
    that begin, with its ids and key, it finds its run and starts it, as a retry inside ``with_retry`` would have. A
    resend reaching another worker finds the run as ``existing``, until it is ended as dead (``RUN_STALE_SECONDS``).
    """

    LIMIT = 10_000  # entries kept at most: each is a few ids, and only failed begins make one

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], tuple[NewRun, str, float]] = {}

    def resend(self, caller: Caller, new: NewRun) -> tuple[NewRun, str]:
        """The begin to send for ``new`` and its write key: the unanswered one it repeats, or ``new`` with a new key."""
        kept = self._kept.pop((caller.user_id, new.client_message_id or ""), None)
        if kept is not None and kept[2] > time.monotonic() and _same_turn(kept[0], new):
            return kept[0], kept[1]
        return new, secrets.token_hex(32)

    def keep(self, caller: Caller, new: NewRun, write_key: str, seconds: float) -> None:
        if new.client_message_id is None:
            return  # a send without one is never sent again as the same turn
        now = time.monotonic()
        if len(self._kept) >= self.LIMIT:
            self._kept = {key: kept for key, kept in self._kept.items() if kept[2] > now}
        if len(self._kept) < self.LIMIT:
            self._kept[(caller.user_id, new.client_message_id)] = (new, write_key, now + seconds)


def _same_turn(kept: NewRun, new: NewRun) -> bool:
    return (kept.conversation_id, kept.text, kept.parent_id, kept.edit_id, kept.regenerate_id) == (
        new.conversation_id, new.text, new.parent_id, new.edit_id, new.regenerate_id)


class PostgrestStore(QueryTiming):
    kind = "supabase"

    def __init__(self, client: PostgrestClient, run_secret: str) -> None:
        self._rest = client
        # Shown with each begin: the database registers a run's write key only for the holder (017).
        self._run_secret = {RUN_SECRET_HEADER: run_secret}
        # The write key of every run this worker generates (007): made here for each begin_run, sent with each of the
        # run's flushes, forgotten once the run's end has been answered. It never leaves the service, and the database
        # registers one only with the run secret (017), so no client can write a run.
        self._write_keys: dict[str, str] = {}
        self._unanswered = UnansweredBegins()

    async def open(self) -> None:
        """Nothing to open: the HTTP pool connects lazily, and a down database must not stop the service starting."""

    async def aclose(self) -> None:
        await self._rest.aclose()

    @observed
    async def ping(self) -> None:
        await self._rest.probe(CONVERSATIONS)

    async def probe_write(self) -> bool | None:
        # Every write here acts as a signed-in user and a health probe has none, so there is nothing to try.
        return None

    # -- conversations -----------------------------------------------------------------------------------------

    @observed
    async def list_conversations(
        self, caller: Caller, limit: int, offset: int, *, before: ConversationKey | None = None,
        after: ConversationKey | None = None, search: str | None = None
    ) -> ConversationPage:
        if search is not None:
            return await self._search_conversations(caller, limit, offset, before, after, search)
        params = {
            "select": CONVERSATION_COLUMNS,
            "user_id": f"eq.{caller.user_id}",
            # The earlier service's updated_at was nullable; 006 fills it, and NULLs would go last as SQLite's do.
            "order": "updated_at.desc.nullslast,id.asc",
            "limit": str(limit + 1),  # one more, to know whether more follow
            "offset": str(offset),
        }
        if before is not None or after is not None:
            return await self._seek_conversations(caller, limit, {**params, **conversation_seek(before, after)}, after)
        try:
            result = await self._rest.select(caller, CONVERSATIONS, params, count=True)
        except UpstreamError as exc:
            failure = postgrest_failure(exc)
            if failure is None or failure.code != "PGRST103":
                raise
            # 416: an offset past the end. SQLite answers an empty page with the total; so do we.
            count_only = {**params, "limit": "0", "offset": "0"}
            counted = await self._rest.select(caller, CONVERSATIONS, count_only, count=True)
            return ConversationPage([], counted.total or 0)
        total = result.total if result.total is not None else offset + len(result.rows[:limit])
        return page_of_conversations(result.rows, limit, total, None, conversation_of)

    async def _seek_conversations(
        self, caller: Caller, limit: int, params: dict[str, str], after: ConversationKey | None
    ) -> ConversationPage:
        """A page past a cursor. The total is of all the caller's conversations, not of those past the cursor, so it
        is counted by a second request, sent alongside."""
        counting = {"select": "id", "user_id": f"eq.{caller.user_id}", "limit": "0"}
        result, counted = await asyncio.gather(
            self._rest.select(caller, CONVERSATIONS, params),
            self._rest.select(caller, CONVERSATIONS, counting, count=True),
        )
        return page_of_conversations(result.rows, limit, counted.total or 0, after, conversation_of)

    async def _search_conversations(
        self, caller: Caller, limit: int, offset: int, before: ConversationKey | None, after: ConversationKey | None,
        search: str,
    ) -> ConversationPage:
        """``agent_conversations_search`` (``migrations/007_checked_writes.sql``): one request, as the caller. The
        text goes as typed, whole, as one term (NUL, which PostgreSQL's text cannot hold, is a space): the database
        folds it into words with the function that folded the stored text and takes the first 32 distinct ones
        (``migrations/008_search_folding.sql``), as SQLite does (``MAX_TERMS``). Not split here: pieces cut at spaces
        count separators and repeats, which would push a later word out of the 32."""
        text = search.replace("\x00", " ")
        if not text.strip():
            return ConversationPage([], 0)
        args = {"p_terms": [text], "p_limit": limit + 1, "p_offset": offset,
                "p_before_at": before.updated_at if before else None, "p_before_id": before.id if before else None,
                "p_after_at": after.updated_at if after else None, "p_after_id": after.id if after else None}
        result = await self._rest.rpc(caller, "agent_conversations_search", args, idempotent=True)
        with reading():
            rows, total = result["rows"], int(result["total"])
        return page_of_conversations(rows, limit, total, after, conversation_of)

    @observed
    async def rename_conversation(self, caller: Caller, conversation_id: str, title: str) -> Conversation:
        # The table's trigger (001) moves updated_at to now.
        row = await self._rest.rpc(
            caller, "agent_conversation_rename", {"p_id": conversation_id, "p_title": title}, idempotent=True
        )
        if row is None:  # missing, or someone else's: the same answer
            raise ConversationNotFound()
        return conversation_of(row)

    @observed
    async def create_conversation(self, caller: Caller, title: str | None) -> Conversation:
        # A service-generated id makes the call idempotent, so a retry after a lost response creates nothing twice.
        args = {"p_id": str(uuid.uuid4()), "p_title": title}
        result = await self._rest.rpc(caller, "agent_conversation_create", args, idempotent=True)
        outcome = result.get("outcome") if isinstance(result, dict) else None
        if outcome == "done":
            return conversation_of(result["conversation"])
        if outcome == "not_found":  # the id is someone else's: SQLite's answer
            raise ConversationNotFound()
        if outcome == "rate_limited":
            raise write_ceiling(result)
        raise bad_response()

    @observed
    async def get_conversation(self, caller: Caller, conversation_id: str) -> Conversation:
        params = {"select": CONVERSATION_COLUMNS, "id": f"eq.{conversation_id}", "user_id": f"eq.{caller.user_id}"}
        result = await self._rest.select(caller, CONVERSATIONS, params)
        if not result.rows:
            raise ConversationNotFound()
        return conversation_of(result.rows[0])

    @observed
    async def delete_conversation(self, caller: Caller, conversation_id: str) -> None:
        # Retried, as a DELETE was: a replay whose first attempt committed says NotFound, as a second delete does.
        deleted = await self._rest.rpc(caller, "agent_conversation_delete", {"p_id": conversation_id}, idempotent=True)
        if deleted is not True:
            raise ConversationNotFound()

    # -- messages ----------------------------------------------------------------------------------------------

    @observed
    async def message_page(
        self, caller: Caller, conversation_id: str, limit: int, offset: int = 0, *, newest_first: bool = False,
        before: MessageKey | None = None, after: MessageKey | None = None, leaf: str | None = None,
    ) -> MessagePage:
        downwards = reads_downwards(before, after, newest_first)
        args = {"p_conversation_id": conversation_id, "p_leaf": leaf, "p_limit": limit + 1, "p_offset": offset,
                "p_downwards": downwards, **branch_seek(before, after)}
        result = settled(await self._rest.rpc(caller, "agent_message_branch", args, idempotent=True))
        return branch_page_of(result, limit, downwards, newest_first)

    @observed
    async def set_active_leaf(self, caller: Caller, conversation_id: str, message_id: str) -> Conversation:
        args = {"p_id": conversation_id, "p_message_id": message_id}
        result = await self._rest.rpc(caller, "agent_conversation_set_leaf", args, idempotent=True)
        return conversation_of(settled(result)["conversation"])

    # -- business records (services/domains.py; migrations/002_business_tables.sql) -------------------------------

    @observed
    async def list_records(
        self, caller: Caller, domain: Domain, filters: dict[str, Any], limit: int
    ) -> list[dict[str, Any]]:
        params = {"select": record_columns(domain), "user_id": f"eq.{caller.user_id}"}
        for name, value in filters.items():
            params[filter_column(domain, name)] = f"eq.{filter_value(value)}"
        params.update(order=record_order(domain), limit=str(limit))
        result = await self._rest.select(caller, domain.table, params)
        return [record_of(domain, row) for row in result.rows]

    @observed
    async def get_record(self, caller: Caller, domain: Domain, record_id: str) -> dict[str, Any]:
        return await self._fetch_record(caller, domain, record_id)

    @observed
    async def insert_record(self, caller: Caller, domain: Domain, values: dict[str, Any]) -> dict[str, Any]:
        row = {**values, "user_id": caller.user_id}
        # ON CONFLICT (id) DO NOTHING: a retried insert is a no-op, and the scoped read below answers it (NotFound if
        # the id is someone else's, as SQLite's INSERT OR IGNORE + scoped read).
        result = await self._rest.insert(caller, domain.table, row, select=record_columns(domain))
        if result.rows:
            return record_of(domain, result.rows[0])
        return await self._fetch_record(caller, domain, str(values["id"]))

    @observed
    async def update_record(
        self, caller: Caller, domain: Domain, record_id: str, values: dict[str, Any]
    ) -> dict[str, Any]:
        if not is_uuid(record_id):
            raise RecordNotFound(domain.singular)
        if not values:
            return await self._fetch_record(caller, domain, record_id)
        params = {"select": record_columns(domain), **owned(caller, record_id)}
        result = await self._rest.request(
            caller, "PATCH", domain.table, params=params, json_body=values, prefer=["return=representation"]
        )
        if not result.rows:  # missing, or hidden by row-level security: the same answer
            raise RecordNotFound(domain.singular)
        return record_of(domain, result.rows[0])

    @observed
    async def delete_record(self, caller: Caller, domain: Domain, record_id: str) -> None:
        if not is_uuid(record_id):
            raise RecordNotFound(domain.singular)
        result = await self._rest.delete(caller, domain.table, owned(caller, record_id))
        if not result.rows:
            raise RecordNotFound(domain.singular)

    # -- pending actions (services/agents/actions.py; migrations/010_confirm_every_change.sql) -------------------------

    @observed
    async def create_action(self, caller: Caller, new: NewAction, ttl_seconds: float) -> PendingAction:
        args = {"p_id": new.id, "p_table": new.table, "p_tool": new.tool, "p_kind": new.kind,
                "p_record_id": new.record_id, "p_changes": new.changes, "p_before": new.before,
                "p_summary": new.summary, "p_ttl_seconds": ttl_seconds}
        # Retried: the id is ours, so a replay whose first attempt committed inserts nothing and returns the row.
        row = await self._rest.rpc(caller, "pending_action_prepare", args, idempotent=True)
        if row is None:
            raise ActionNotFound()
        return pending_action_of(row)

    @observed
    async def get_action(self, caller: Caller, action_id: str) -> PendingAction:
        # A plain read: 005's select policy and 007's grant let a user read their own actions, and nothing more.
        if not is_uuid(action_id):
            raise ActionNotFound()
        rows = (await self._rest.select(caller, ACTIONS, {"select": "*", **owned(caller, action_id)})).rows
        if not rows:
            raise ActionNotFound()
        return pending_action_of(rows[0])

    @observed
    async def confirm_action(self, caller: Caller, action_id: str) -> ActionDone:
        if not is_uuid(action_id):
            raise ActionNotFound()
        # Not retried: a replay after a lost response would find the action used and refuse a change that was made.
        # The client sees the failure instead, and its own retry is told the truth (ACTION_ALREADY_USED).
        result = await self._rest.rpc(caller, "pending_action_apply", {"p_action_id": action_id}, idempotent=False)
        outcome = result.get("outcome") if isinstance(result, dict) else None
        if outcome == "done":
            return action_done_of(result)
        if outcome == "record_not_found" and result.get("table") in BY_TABLE:
            raise RecordNotFound(BY_TABLE[result["table"]].singular)
        refusals = {"not_found": ActionNotFound, "used": ActionAlreadyUsed, "expired": ActionExpired,
                    "record_changed": RecordChanged}
        if outcome not in refusals:
            raise bad_response()
        raise refusals[outcome]()

    async def _fetch_record(self, caller: Caller, domain: Domain, record_id: str) -> dict[str, Any]:
        if not is_uuid(record_id):  # SQLite finds nothing; PostgreSQL would refuse to compare it with a uuid
            raise RecordNotFound(domain.singular)
        params = {"select": record_columns(domain), **owned(caller, record_id)}
        result = await self._rest.select(caller, domain.table, params)
        if not result.rows:
            raise RecordNotFound(domain.singular)
        return record_of(domain, result.rows[0])

    # -- chat runs (services/runs/; migrations/004_agent_runs.sql) -------------------------------------------
    # Each store call is one RPC, so one request and one transaction, as the signed-in user: the functions are
    # SECURITY INVOKER and row-level security keeps every user to their own runs.

    @observed
    async def begin_run(self, caller: Caller, new: NewRun, limits: TurnLimits, history_limit: int) -> RunBegun:
        new, write_key = self._unanswered.resend(caller, new)
        args = {
            "p_run_id": new.id,
            "p_conversation_id": new.conversation_id,
            "p_text": new.text,
            "p_title": new.title,
            "p_user_message_id": new.user_message_id,
            "p_assistant_message_id": new.assistant_message_id,
            "p_stale_seconds": limits.stale_seconds,
            "p_events_ttl": limits.events_ttl,
            "p_window_seconds": limits.window_seconds,
            "p_history_limit": history_limit,
            "p_client_message_id": new.client_message_id,
            "p_chat_limit": limits.chat_limit,
            "p_stream_limit": limits.stream_limit,
            "p_write_key": write_key,
            # Always sent, so PostgREST resolves the one agent_run_begin that takes them (012).
            "p_parent_message_id": new.parent_id,
            "p_edit_message_id": new.edit_id,
            "p_regenerate_message_id": new.regenerate_id,
            "p_budget": budget_json(limits.budget),  # null when budgets are off: the function does no extra work
        }
        # Retried: every id and the key are ours, so a replay whose first attempt committed finds its own run and
        # answers as the first would have, counting and writing nothing. (A refusal whose answer was lost counts its
        # hit twice.)
        try:
            answer = await self._rest.rpc(caller, "agent_run_begin", args, idempotent=True, headers=self._run_secret)
        except AppError:
            self._unanswered.keep(caller, new, write_key, limits.stale_seconds)
            raise
        if isinstance(answer, dict) and answer.get("outcome") == "wrong_role":
            raise wrong_branch_point(new)  # worded as SQLite words it: the field sent, and what it must name
        begun = run_begun_of(settled(answer))
        if begun.outcome == "started":
            self._write_keys[new.id] = write_key
        return begun

    @observed
    async def flush_runs(self, updates: list[RunUpdate]) -> dict[str, RunControl]:
        # Every run's write key is its authority (migrations/009_keyed_flush.sql), so all of this worker's runs, of
        # any users, go in FLUSH_BATCH-sized calls with no user token: requests per flush do not grow with the users
        # streaming, and an answer outlives its user's access token. Retried: events only go forward (a batch
        # already stored is skipped), the text is overwritten and the end is written once.
        # A run whose key is gone has ended (its end was answered as such): nothing more of it is written.
        controls = {u.run_id: RunControl(gone=True) for u in updates if u.run_id not in self._write_keys}
        keyed = [update for update in updates if update.run_id in self._write_keys]
        for start in range(0, len(keyed), FLUSH_BATCH):
            controls.update(await self._flush_call(keyed[start:start + FLUSH_BATCH]))
        for update in updates:
            # Kept until the run's end is answered: a run ended elsewhere still sends its end, with the calls it
            # made meanwhile, which the key still records (017).
            control = controls.get(update.run_id)
            if control is not None and control.gone and update.final_status is not None:
                self._write_keys.pop(update.run_id, None)
        return controls

    async def _flush_call(self, updates: list[RunUpdate]) -> dict[str, RunControl]:
        """One ``agent_runs_flush`` call. One bad update fails the whole call (PostgreSQL reads ``p_updates`` whole:
        a NUL anywhere in it is 22P05), so a call refused for what it holds is sent again as two halves, until the
        updates at fault are alone and reported ``rejected``: the others are written, for about two more calls per
        bad update and halving, and only when there is one."""
        args = {"p_updates": [update_json(update, self._write_keys[update.run_id]) for update in updates]}
        try:
            rows = await self._rest.rpc_by_key("agent_runs_flush", args, idempotent=True)
        except UpstreamError as exc:
            if not is_rejected(exc):
                raise
            if len(updates) == 1:
                return {updates[0].run_id: RunControl(rejected=True)}
            half = len(updates) // 2
            return {**await self._flush_call(updates[:half]), **await self._flush_call(updates[half:])}
        return controls_of(rows)

    @observed
    async def read_run(self, caller: Caller, run_id: str, after: int | None) -> RunView:
        if not is_uuid(run_id):  # SQLite finds nothing; PostgreSQL would refuse to compare it with a uuid
            raise RunNotFound()
        result = await self._rest.rpc(caller, "agent_run_read", {"p_run_id": run_id, "p_after": after}, idempotent=True)
        if result is None:  # missing, or hidden by row-level security: the same answer
            raise RunNotFound()
        with reading():
            batches = [EventBatch(int(b["first_seq"]), int(b["last_seq"]), str(b["frames"])) for b in result["batches"]]
            return RunView(run_of(result["run"]), message_of(result["message"]), batches)

    @observed
    async def running_run(self, caller: Caller, conversation_id: str) -> Run | None:
        params = {"select": RUN_COLUMNS, "conversation_id": f"eq.{conversation_id}", "user_id": f"eq.{caller.user_id}",
                  "status": "eq.running"}
        rows = (await self._rest.select(caller, RUNS, params)).rows
        return run_of(rows[0]) if rows else None

    @observed
    async def request_stop(self, caller: Caller, run_id: str, seen_chars: int | None) -> None:
        if not is_uuid(run_id):
            raise RunNotFound()
        args = {"p_run_id": run_id, "p_seen_chars": seen_chars}
        found = await self._rest.rpc(caller, "agent_run_stop", args, idempotent=True)
        if found is not True:
            raise RunNotFound()

    @observed
    async def maintain_runs(self, caller: Caller | None, stale_seconds: float, events_ttl: float) -> None:
        if caller is None:
            # Every user's runs would need rights beyond any one user's, and this store never holds a service key.
            # Dead runs are ended when their user next touches them (begin_run, or a viewer finding one stale).
            return
        args = {"p_stale_seconds": stale_seconds, "p_events_ttl": events_ttl}
        # Retried: a run is ended once (claimed while still running) and a purge deletes nothing twice.
        await self._rest.rpc(caller, "agent_runs_maintain", args, idempotent=True)

    @observed
    async def usage_report(self, caller: Caller, since: float) -> UsageReport:
        args = {"p_since": datetime.fromtimestamp(since, timezone.utc).isoformat()}
        return usage_report_of(await self._rest.rpc(caller, "agent_usage_report", args, idempotent=True))

    # -- rate limits (services/limits/rates.py; migrations/003_rate_limits.sql) --------------------------------------
    # A caller without an access token cannot be counted as a user here (the function keys on auth.uid()); that is
    # only the address-keyed count of a failed authentication, which the edge (nginx limit_req) limits instead.

    @observed
    async def rate_limit_hit(self, caller: Caller, bucket: str, window_seconds: int, limit: int) -> tuple[bool, float]:
        if not caller.access_token:
            return True, 0.0
        args = {"p_bucket": bucket, "p_window_seconds": window_seconds, "p_max_hits": limit}
        # Not retried: a replay after a lost response would count the request twice.
        rows = await self._rest.rpc(caller, "rate_limit_hit", args, idempotent=False)
        with reading():
            (row,) = rows
            return bool(row["allowed"]), float(row["retry_after"])
