"""What the service keeps, and the interface every store implements.

Two implementations sit behind ``Store``: ``SQLiteStore`` (embedded default, standard library) and
``PostgrestStore`` (Supabase, acting as the signed-in user so row-level security applies). Every method takes the
``Caller`` explicitly: identity is a per-request value, never a global, an environment variable or prompt text.
Methods raise only ``errors.AppError`` subclasses; a conversation that is missing or owned by someone else is
``NotFound`` in both cases, so existence is never revealed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from services.domains import Domain

Role = Literal["user", "assistant"]

# Title given to conversations the chat route creates on first use; the earlier service used the same constant.
AUTO_TITLE = "AI Chat"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request acts for. ``access_token`` is the user's own JWT when auth is on (Supabase sends it on)."""

    user_id: str
    access_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    user_id: str
    title: str | None
    created_at: str
    updated_at: str
    last_message_at: str | None
    message_count: int
    metadata: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "title": self.title,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_message_at": self.last_message_at,
            "message_count": self.message_count,
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    conversation_id: str
    role: Role
    content: str
    agent_type: str | None
    metadata: dict[str, Any]
    created_at: str

    def to_json(self) -> dict[str, Any]:
        # ``timestamp`` is the earlier service's name for created_at; the frontend reads it.
        return {
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "agent_type": self.agent_type,
            "timestamp": self.created_at,
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to append; the id is generated here so a retried insert is idempotent."""

    conversation_id: str
    role: Role
    content: str
    agent_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True, slots=True)
class Page:
    conversations: list[Conversation]
    total: int


class Store(Protocol):
    kind: str

    async def ping(self) -> None:
        """Raise ``UpstreamUnavailable`` when the store cannot answer."""

    async def list_conversations(self, caller: Caller, limit: int, offset: int) -> Page:
        """The caller's conversations, most recent activity first."""

    async def create_conversation(self, caller: Caller, title: str | None, conversation_id: str | None = None) -> Conversation:
        """Create a conversation owned by the caller."""

    async def get_conversation(self, caller: Caller, conversation_id: str) -> Conversation:
        """The caller's conversation, or ``NotFound``."""

    async def ensure_conversation(self, caller: Caller, conversation_id: str, title: str) -> Conversation:
        """Return the caller's conversation, creating it if the id is unused; ``NotFound`` if someone else owns it."""

    async def delete_conversation(self, caller: Caller, conversation_id: str) -> None:
        """Delete the caller's conversation and its messages, or raise ``NotFound``."""

    async def list_messages(self, caller: Caller, conversation_id: str, limit: int, offset: int) -> list[Message]:
        """Messages of the caller's conversation, oldest first."""

    async def recent_messages(self, caller: Caller, conversation_id: str, limit: int) -> list[Message]:
        """The newest ``limit`` messages of the caller's conversation, returned oldest first."""

    async def add_message(self, caller: Caller, message: NewMessage) -> Message:
        """Append a message to the caller's conversation (``NotFound`` if it is not theirs)."""

    async def begin_turn(
        self, caller: Caller, title: str, message: NewMessage, history_limit: int
    ) -> tuple[Message, list[Message]]:
        """Everything a chat turn needs before the model is called, as one store call (one round trip, one thread
        hop, one transaction where the store has them): ``ensure_conversation(message.conversation_id, title)``,
        ``add_message(message)``, then ``recent_messages(history_limit)``. Returns (the saved message, the history
        including it, oldest first). ``NotFound`` if someone else owns the conversation; nothing is written then.
        """

    async def aclose(self) -> None:
        """Release connections."""

    # Business records (invoices, appointments, ...): the agents' tools read and write them only through these.
    # Table and column names come from the ``Domain`` declaration, never from user or model input.

    async def list_records(
        self, caller: Caller, domain: Domain, filters: dict[str, Any], limit: int
    ) -> list[dict[str, Any]]:
        """The caller's records matching every equality filter, in the domain's stable order."""

    async def get_record(self, caller: Caller, domain: Domain, record_id: str) -> dict[str, Any]:
        """One of the caller's records, or ``NotFound``."""

    async def insert_record(self, caller: Caller, domain: Domain, values: dict[str, Any]) -> dict[str, Any]:
        """Insert a record owned by the caller; ``values`` holds ``id`` (client-generated) and the columns."""

    async def update_record(
        self, caller: Caller, domain: Domain, record_id: str, values: dict[str, Any]
    ) -> dict[str, Any]:
        """Change some columns of one of the caller's records, or ``NotFound``."""

    async def delete_record(self, caller: Caller, domain: Domain, record_id: str) -> None:
        """Delete one of the caller's records, or ``NotFound``."""


def utc_now() -> str:
    """ISO 8601 UTC with microseconds and a ``Z``, the format the earlier service's frontend parses."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
