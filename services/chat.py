"""One chat turn: validate ownership, save the user's message, stream the answer, save the answer.

``ChatService.start_turn`` does everything that can still fail with an HTTP status (the conversation belongs to
someone else, the store is down) before the response starts; ``Turn.chunks`` is the stream itself. Whatever
happens after that (an upstream error, a client disconnect, a server shutdown), the assistant text produced so far
is saved with its outcome in ``metadata.status``, so nothing the user typed or saw is lost.

Chunks keep the earlier service's six keys (``type, content, tool_name, tool_call, error, agent_type``) so an
existing frontend keeps working, and add ``message_id``/``usage`` on ``complete`` and ``code``/``retryable`` on
``error``. Every stream ends with exactly one ``complete`` or ``error`` chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from errors import AppError
from services.agents import SUPERVISOR, AgentDone, AgentText, AgentToolCall, Assistant
from services.prompt import build_turns
from services.store import AUTO_TITLE, Caller, Message, NewMessage, Store

logger = logging.getLogger(__name__)

# How long saving a partial answer may take once the stream has been cancelled (shielded from that cancellation).
SAVE_ON_CANCEL_SECONDS = 10.0


def chunk(kind: str, agent_type: str | None, **fields: Any) -> dict[str, Any]:
    """An SSE chunk with the six keys the earlier service always sent, plus any extra ``fields``."""
    base: dict[str, Any] = {
        "type": kind,
        "content": None,
        "tool_name": None,
        "tool_call": None,
        "error": None,
        "agent_type": agent_type,
    }
    base.update(fields)
    return base


def error_chunk(error: AppError, agent_type: str | None) -> dict[str, Any]:
    return chunk("error", agent_type, error=error.user_message, code=error.code, retryable=error.retryable)


@dataclass(slots=True)
class _Outcome:
    """What the turn produced so far; saved as the assistant message however the turn ends."""

    agent_type: str = SUPERVISOR
    parts: list[str] = field(default_factory=list)
    status: str = "complete"
    error_code: str | None = None
    done: AgentDone | None = None

    def metadata(self, started: float) -> dict[str, Any]:
        meta: dict[str, Any] = {"status": self.status, "duration_ms": round((time.monotonic() - started) * 1000)}
        if self.error_code:
            meta["error_code"] = self.error_code
        if self.done is not None:
            meta["stop_reason"] = self.done.stop_reason
            meta["usage"] = self.done.usage
            if self.done.tool_calls:
                meta["tool_calls"] = self.done.tool_calls
        return meta


class ChatService:
    def __init__(self, store: Store, assistant: Assistant, history_max_messages: int, token_budget: int) -> None:
        self._store = store
        self._assistant = assistant
        self._history_max_messages = history_max_messages
        self._token_budget = token_budget

    async def start_turn(self, caller: Caller, conversation_id: str, text: str) -> Turn:
        """Everything before the first byte: ownership, the user's message saved, the prompt built.

        One store call (``Store.begin_turn``), not three: it sits on every turn's time to first token.
        """
        message = NewMessage(conversation_id, "user", text)
        user_message, history = await self._store.begin_turn(caller, AUTO_TITLE, message, self._history_max_messages)
        turns = build_turns(history, self._token_budget)
        return Turn(self._store, self._assistant, caller, user_message, turns)


class Turn:
    def __init__(
        self, store: Store, assistant: Assistant, caller: Caller, user_message: Message, turns: list[dict[str, Any]]
    ) -> None:
        self._store = store
        self._assistant = assistant
        self._caller = caller
        self.user_message = user_message
        self._turns = turns
        self._outcome = _Outcome()
        self._started = time.monotonic()

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        outcome = self._outcome
        try:
            async for item in self._generate():
                yield item
        except AppError as exc:
            outcome.status, outcome.error_code = "error", exc.code
            logger.warning("Chat turn failed: %s (%s)", exc.code, exc.message)
            await self._save_quietly()
            yield error_chunk(exc, outcome.agent_type)
            return
        except Exception:
            # A bug, not an expected failure: log it with its traceback, keep the partial answer, and still end
            # the stream with one error chunk so the client is never left with a silently truncated answer.
            logger.exception("Unexpected error in chat turn")
            outcome.status, outcome.error_code = "error", "INTERNAL_ERROR"
            await self._save_quietly()
            yield error_chunk(AppError(), outcome.agent_type)
            return
        except BaseException:
            # Cancelled: the client went away or the server is shutting down. Save what was produced; the save is
            # shielded from the cancellation that is unwinding this generator, and bounded so it cannot hang.
            outcome.status = "interrupted"
            with anyio.CancelScope(shield=True), anyio.move_on_after(SAVE_ON_CANCEL_SECONDS):
                await self._save_quietly()
            raise
        try:
            saved = await self._save()
        except AppError as exc:
            yield error_chunk(exc, outcome.agent_type)
            return
        usage = outcome.done.usage if outcome.done else None
        stop_reason = outcome.done.stop_reason if outcome.done else None
        yield chunk(
            "complete",
            outcome.agent_type,
            message_id=saved.id,
            conversation_id=saved.conversation_id,
            usage=usage,
            stop_reason=stop_reason,
        )

    async def _generate(self) -> AsyncIterator[dict[str, Any]]:
        outcome = self._outcome
        async for event in self._assistant.respond(self._caller, self._turns):
            if isinstance(event, AgentText):
                outcome.agent_type = event.agent_type
                outcome.parts.append(event.text)
                yield chunk("token", event.agent_type, content=event.text)
            elif isinstance(event, AgentToolCall):
                yield chunk("tool_call", event.agent_type, tool_name=event.tool_name, tool_call=event.payload)
            elif isinstance(event, AgentDone):
                outcome.agent_type = event.agent_type
                outcome.done = event

    async def _save(self) -> Message:
        outcome = self._outcome
        message = NewMessage(
            conversation_id=self.user_message.conversation_id,
            role="assistant",
            content="".join(outcome.parts),
            agent_type=outcome.agent_type,
            metadata=outcome.metadata(self._started),
        )
        return await self._store.add_message(self._caller, message)

    async def _save_quietly(self) -> None:
        """Save on a failure path, where a second failure must not replace the first (or a cancellation)."""
        try:
            await self._save()
        except AppError as exc:
            logger.error("Could not save the partial assistant message: %s", exc.code)
        except Exception:
            logger.exception("Could not save the partial assistant message")
