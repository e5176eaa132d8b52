"""The Supabase store: the ``Store`` interface over PostgREST, acting as the signed-in user.

Every call forwards the caller's own access token (``services/postgrest_client.py``), so PostgreSQL's row-level
security (``migrations/001_agent_chat.sql``) is what keeps users apart; the ``user_id`` filters added here are
defence in depth, not the guarantee. The tables are the earlier service's ``agent_conversations`` and
``agent_messages`` in ``SUPABASE_SCHEMA``, so an existing project keeps its history.

Semantics match ``SQLiteStore`` exactly:

* a conversation that is missing or someone else's is ``NotFound(code="CONVERSATION_NOT_FOUND")`` (RLS hides the
  row, so the two cases look the same from here too);
* ``ensure_conversation`` inserts with ``on_conflict=id`` + ``resolution=ignore-duplicates`` (``ON CONFLICT DO
  NOTHING``): an id already taken, even by a row RLS hides, inserts nothing and raises nothing, and the scoped read
  that follows says ``NotFound``;
* ``add_message`` uses the client-generated message id the same way, so a retried insert is a no-op;
* messages come oldest first, ties broken by the insertion sequence; lists by ``updated_at`` descending.

Counters and timestamps are kept by the database's trigger. Timestamps are normalised to the SQLite store's format
(``2026-11-24T01:49:20.911133Z``): PostgREST renders ``timestamptz`` as ``...+00:00`` and drops trailing zeros.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone
from typing import Any

from errors import AppError, NotFound, UpstreamError
from services.postgrest_client import PostgrestClient, is_rls_violation, postgrest_failure
from services.store import Caller, Conversation, Message, NewMessage, Page

logger = logging.getLogger(__name__)

CONVERSATIONS = "agent_conversations"
MESSAGES = "agent_messages"
CONVERSATION_COLUMNS = "id,user_id,title,created_at,updated_at,last_message_at,message_count,metadata"
MESSAGE_COLUMNS = "id,conversation_id,role,content,agent_type,metadata,created_at"
# seq is the insertion order (an identity column); created_at comes first so the earlier service's rows, which got
# their seq when the migration added the column, still read in the order they were written.
OLDEST_FIRST = "created_at.asc,seq.asc"
NEWEST_FIRST = "created_at.desc,seq.desc"


def conversation_not_found() -> NotFound:
    return NotFound("Conversation not found.", code="CONVERSATION_NOT_FOUND")


class PostgrestStore:
    kind = "supabase"

    def __init__(self, client: PostgrestClient) -> None:
        self._rest = client

    async def open(self) -> None:
        """Nothing to open: the HTTP pool connects lazily, and a down database must not stop the service starting."""

    async def aclose(self) -> None:
        await self._rest.aclose()

    async def ping(self) -> None:
        await self._rest.probe(CONVERSATIONS)

    # -- conversations -----------------------------------------------------------------------------------------

    async def list_conversations(self, caller: Caller, limit: int, offset: int) -> Page:
        params = {
            "select": CONVERSATION_COLUMNS,
            "user_id": f"eq.{caller.user_id}",
            # The earlier service's updated_at is nullable; those rows go last, as SQLite's NULLs do in DESC order.
            "order": "updated_at.desc.nullslast,id.asc",
            "limit": str(limit),
            "offset": str(offset),
        }
        try:
            result = await self._rest.select(caller, CONVERSATIONS, params, count=True)
        except UpstreamError as exc:
            failure = postgrest_failure(exc)
            if failure is None or failure.code != "PGRST103":
                raise
            # 416: an offset past the end. SQLite answers an empty page with the total; so do we.
            count_only = {**params, "limit": "0", "offset": "0"}
            counted = await self._rest.select(caller, CONVERSATIONS, count_only, count=True)
            return Page([], counted.total or 0)
        total = result.total if result.total is not None else offset + len(result.rows)
        return Page([_conversation(row) for row in result.rows], total)

    async def create_conversation(
        self, caller: Caller, title: str | None, conversation_id: str | None = None
    ) -> Conversation:
        # A client-generated id makes the insert idempotent, so a retry after a lost response creates nothing twice.
        new_id = conversation_id or str(uuid.uuid4())
        row = {"id": new_id, "user_id": caller.user_id, "title": title}
        result = await self._rest.insert(caller, CONVERSATIONS, row, select=CONVERSATION_COLUMNS, on_conflict="id")
        if result.rows:
            return _conversation(result.rows[0])
        # Nothing inserted: our own earlier attempt (a retry) or an id already taken. Same answer as SQLite's.
        return await self.get_conversation(caller, new_id)

    async def get_conversation(self, caller: Caller, conversation_id: str) -> Conversation:
        params = {"select": CONVERSATION_COLUMNS, "id": f"eq.{conversation_id}", "user_id": f"eq.{caller.user_id}"}
        result = await self._rest.select(caller, CONVERSATIONS, params)
        if not result.rows:
            raise conversation_not_found()
        return _conversation(result.rows[0])

    async def ensure_conversation(self, caller: Caller, conversation_id: str, title: str) -> Conversation:
        # Read first: after its first turn a conversation exists, so this is usually the only round trip.
        try:
            return await self.get_conversation(caller, conversation_id)
        except NotFound:
            pass
        row = {"id": conversation_id, "user_id": caller.user_id, "title": title}
        result = await self._rest.insert(caller, CONVERSATIONS, row, select=CONVERSATION_COLUMNS, on_conflict="id")
        if result.rows:
            return _conversation(result.rows[0])
        # ON CONFLICT DO NOTHING skipped it: a concurrent first turn created it (found now), or another user owns
        # the id (RLS hides it: NotFound, and nothing was written).
        try:
            return await self.get_conversation(caller, conversation_id)
        except NotFound:
            logger.warning("Conversation %s belongs to another user; nothing written", conversation_id)
            raise

    async def delete_conversation(self, caller: Caller, conversation_id: str) -> None:
        params = {"id": f"eq.{conversation_id}", "user_id": f"eq.{caller.user_id}"}
        result = await self._rest.delete(caller, CONVERSATIONS, params)
        if not result.rows:
            raise conversation_not_found()

    # -- messages ----------------------------------------------------------------------------------------------

    async def list_messages(self, caller: Caller, conversation_id: str, limit: int, offset: int) -> list[Message]:
        await self.get_conversation(caller, conversation_id)
        params = {
            "select": MESSAGE_COLUMNS,
            "conversation_id": f"eq.{conversation_id}",
            "order": OLDEST_FIRST,
            "limit": str(limit),
            "offset": str(offset),
        }
        result = await self._rest.select(caller, MESSAGES, params)
        return [_message(row) for row in result.rows]

    async def recent_messages(self, caller: Caller, conversation_id: str, limit: int) -> list[Message]:
        await self.get_conversation(caller, conversation_id)
        params = {
            "select": MESSAGE_COLUMNS,
            "conversation_id": f"eq.{conversation_id}",
            "order": NEWEST_FIRST,
            "limit": str(limit),
        }
        result = await self._rest.select(caller, MESSAGES, params)
        return [_message(row) for row in reversed(result.rows)]

    async def add_message(self, caller: Caller, message: NewMessage) -> Message:
        row = {
            "id": message.id,
            "conversation_id": message.conversation_id,
            "role": message.role,
            "content": message.content,
            "agent_type": message.agent_type,
            "metadata": message.metadata,
        }
        try:
            result = await self._rest.insert(caller, MESSAGES, row, select=MESSAGE_COLUMNS, on_conflict="id")
        except AppError as exc:
            # The insert policy checks that the conversation is the caller's; the foreign key that it exists.
            failure = postgrest_failure(exc)
            if is_rls_violation(exc) or (failure is not None and failure.code == "23503"):
                raise conversation_not_found() from exc
            raise
        if result.rows:
            return _message(result.rows[0])
        # A replay of an insert that had succeeded: return the stored row.
        params = {
            "select": MESSAGE_COLUMNS,
            "id": f"eq.{message.id}",
            "conversation_id": f"eq.{message.conversation_id}",
        }
        stored = await self._rest.select(caller, MESSAGES, params)
        if not stored.rows:
            raise conversation_not_found()
        return _message(stored.rows[0])


def utc_timestamp(value: str | None) -> str | None:
    """PostgREST's ``timestamptz`` (``2026-11-24T01:49:20.9111+00:00``) in the SQLite store's format."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _required_timestamp(value: str | None) -> str:
    stamp = utc_timestamp(value)
    if stamp is None:
        raise UpstreamError("The database returned a row without a timestamp.", code="STORE_BAD_RESPONSE")
    return stamp


def _conversation(row: dict[str, Any]) -> Conversation:
    try:
        created_at = _required_timestamp(row["created_at"])
        return Conversation(
            id=row["id"],
            user_id=row["user_id"],
            title=row["title"],
            created_at=created_at,
            updated_at=utc_timestamp(row["updated_at"]) or created_at,
            last_message_at=utc_timestamp(row["last_message_at"]),
            message_count=row["message_count"] or 0,
            metadata=row["metadata"] or {},
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise UpstreamError("The database returned an unexpected row.", code="STORE_BAD_RESPONSE") from exc


def _message(row: dict[str, Any]) -> Message:
    try:
        return Message(
            id=row["id"],
            conversation_id=row["conversation_id"],
            role=row["role"],
            content=row["content"],
            agent_type=row["agent_type"],
            metadata=row["metadata"] or {},
            created_at=_required_timestamp(row["created_at"]),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise UpstreamError("The database returned an unexpected row.", code="STORE_BAD_RESPONSE") from exc
