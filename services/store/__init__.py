"""What the service keeps, and the interface every store implements: the ``store`` package.

Two implementations sit behind ``Store``: ``SQLiteStore`` (``sqlite/``: embedded default, standard library) and
``PostgrestStore`` (``postgrest/``: Supabase, acting as the signed-in user so row-level security applies). Every
method takes the ``Caller`` explicitly: identity is a per-request value, never a global, an environment variable or
prompt text. Methods raise only ``errors.AppError`` subclasses; a conversation that is missing or owned by someone
else is ``ConversationNotFound`` in both cases, so existence is never revealed.

The package owns the records and the protocol (this module, which every layer above may import), what both backends
share (``shared.py``, for the backends only), the two backends, the form of a run's event log that both write
(``run_log.py``), what a search means (``search.py``), the text both keep alike (``text.py``: what the model's strings
are made into before anything stores or sends them), the numbers only PostgreSQL holds (``numbers.py``: read as their
exact text, never as a rounded or non-finite float), and which backend the settings name (``build.py``, for the
composition root and the command-line tools). It imports nothing above it: not the agents, the runs, the model or
the web edge.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from services.domains import Domain

Role = Literal["user", "assistant"]

# Title given to conversations the chat route creates on first use; the earlier service used the same constant.
AUTO_TITLE = "AI Chat"

# Every timestamp the API shows: ISO 8601 UTC with microseconds and a ``Z``, the format the earlier service's
# frontend parses (``2026-11-24T01:49:20.911133Z``), whatever the store keeps.
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# The most conversations a usage report lists (the most tokens first): a month of turns can touch hundreds of
# thousands, and the report's size must not follow them. migrations/018_usage_report_bounded.sql uses the same.
USAGE_CONVERSATIONS = 100

# Told how long each store call took: (store kind, operation, seconds). The app's metrics are one.
QueryObserver = Callable[[str, str, float], None]


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
    message_count: int  # every message of every branch
    metadata: dict[str, Any]
    active_leaf_id: str | None = None  # the end of the branch the user is on: moved by each send and by a switch

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    conversation_id: str
    role: Role
    content: str
    agent_type: str | None
    metadata: dict[str, Any]
    created_at: str
    parent_id: str | None = None  # the message it answers or follows; None for a first message
    # Its parent's children (itself included), oldest first: what a client draws as "< 2/3 >". Read with a branch,
    # never a column (``shared.from_row`` skips it).
    sibling_ids: tuple[str, ...] | None = field(default=None, metadata={"column": False})

    def to_json(self) -> dict[str, Any]:
        # ``timestamp`` is the earlier service's name for created_at; the frontend reads it.
        shown = {
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "agent_type": self.agent_type,
            "timestamp": self.created_at,
            "metadata": self.metadata,
            "parent_id": self.parent_id,
        }
        if self.sibling_ids is not None:
            shown["sibling_ids"] = list(self.sibling_ids)
        return shown


RunStatus = Literal["running", "complete", "error", "interrupted", "stopped"]


@dataclass(frozen=True, slots=True)
class NewRun:
    """A chat turn to begin: the user's message, the answer's placeholder and the run that writes it. Every id is
    generated here, so a retried ``begin_run`` inserts nothing twice."""

    conversation_id: str
    text: str
    title: str
    client_message_id: str | None = None
    # Where the turn goes (at most one; none: after the conversation's active leaf). ``parent_id``: after this
    # assistant message. ``edit_id``: a new user message beside this one (same parent). ``regenerate_id``: a new answer
    # beside this assistant message, to the same user message, which is not stored again (``text`` is unused).
    parent_id: str | None = None
    edit_id: str | None = None
    regenerate_id: str | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    user_message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    assistant_message_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(slots=True)
class CallUsage:
    """One model call of a run (the supervisor's or a specialist's), as the usage ledger keeps it: the model that
    answered, its tokens, its cost in USD (None: the model has no price) and whether the figures are estimated (a call
    cut short, ``services/agents/usage.py``). ``index`` is its place in the run: a row is written once per (run,
    index), however often a flush is sent again."""

    agent_type: str
    model_id: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    estimated: bool = False
    cost: float | None = None
    index: int = 0


BudgetPeriod = Literal["day", "month"]
BudgetUnit = Literal["tokens", "cost"]


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    """One budget: at most ``limit`` tokens or USD per UTC ``period``, which began at ``since`` (Unix time)."""

    period: BudgetPeriod
    unit: BudgetUnit
    limit: float
    since: float


@dataclass(frozen=True, slots=True)
class TurnBudget:
    """The caller's budgets and what this turn reserves against them until it ends (``services/limits/budgets.py``)."""

    limits: tuple[BudgetLimit, ...]
    reserve_tokens: int
    reserve_cost: float


@dataclass(frozen=True, slots=True)
class TurnLimits:
    """The caller's chat-turn limits, checked inside ``begin_run``'s transaction; None limits are not counted."""

    stale_seconds: float  # a running run whose heartbeat is older is dead: it ends and frees its slot
    events_ttl: float  # the caller's runs that ended longer ago lose their events (see ``maintain_runs``)
    window_seconds: int = 60
    chat_limit: int | None = None
    stream_limit: int | None = None
    budget: TurnBudget | None = None  # None: budgets are off, and admission reads no usage at all


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    conversation_id: str
    user_message_id: str
    assistant_message_id: str
    client_message_id: str | None
    status: RunStatus
    last_seq: int  # the last event written; kept up to date once the run has ended
    heartbeat_at: float  # Unix time of the generating worker's last heartbeat


BeginOutcome = Literal[
    "started", "existing", "conflict", "in_progress", "rate_limited", "streams_full", "budget_exceeded"
]


@dataclass(frozen=True, slots=True)
class BudgetRefusal:
    """The budget a turn would exceed: ``used`` counts the period's ledger and the reservations of the caller's runs
    still going; this turn's reservation on top of it would pass ``limit``."""

    period: BudgetPeriod
    unit: BudgetUnit
    limit: float
    used: float


@dataclass(frozen=True, slots=True)
class RunBegun:
    outcome: BeginOutcome
    run: Run | None = None  # started: the new run; existing/conflict: the earlier one; in_progress: the running one
    history: list[Message] = field(default_factory=list)  # started only
    retry_after: float = 0.0  # rate_limited, streams_full
    budget: BudgetRefusal | None = None  # budget_exceeded


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events ``first_seq..last_seq`` of a run as SSE frames (``services/store/run_log.py``), written in one flush."""

    first_seq: int
    last_seq: int
    frames: str


@dataclass(frozen=True, slots=True)
class RunView:
    run: Run
    message: Message
    batches: list[EventBatch]


@dataclass(frozen=True, slots=True)
class RunUpdate:
    """One run's part of a flush. Empty parts are skipped; an update with nothing to write still reads controls."""

    caller: Caller
    run_id: str
    message_id: str
    batch: EventBatch | None = None
    content: str | None = None  # the answer so far (with ``metadata`` and ``agent_type``), or the final answer
    metadata: dict[str, Any] | None = None
    agent_type: str | None = None
    heartbeat: bool = False
    final_status: RunStatus | None = None  # the run ended: status, ``ended_at`` and ``last_seq`` are set
    calls: tuple[CallUsage, ...] = ()  # the run's model calls not yet in the usage ledger, written with the rest
    # The run's conversation: where SQLite puts the calls of a run deleted with it (PostgreSQL reads it from the key).
    conversation_id: str | None = None


@dataclass(frozen=True, slots=True)
class UsageReport:
    """The caller's usage since a period's start: the ledger's totals by model and by conversation, and what their
    runs still going hold reserved beyond what they have used (``Store.usage_report``)."""

    by_model: list[dict[str, Any]]  # model_id, calls, estimated_calls, the four token counts, cost (None: unpriced)
    by_conversation: list[dict[str, Any]]  # conversation_id, calls, tokens, cost: the USAGE_CONVERSATIONS most used
    reserved_tokens: int
    reserved_cost: float
    conversations: int  # how many conversations have usage since then (by_conversation lists at most 100 of them)


@dataclass(frozen=True, slots=True)
class RunControl:
    stop: bool = False
    seen_chars: int | None = None
    gone: bool = False  # deleted with its conversation, or ended by another worker: stop generating
    deleted: bool = False  # gone because its row is: the conversation was deleted
    applied: bool = False  # this update was written (the run was still running when it came)
    # The store refused this update as bad input (text it cannot hold, say), not for a while: sent again, it would be
    # refused again. Nothing of it was written; the other runs of the flush were.
    rejected: bool = False


@dataclass(frozen=True, slots=True)
class ConversationPage:
    conversations: list[Conversation]
    total: int
    has_more: bool = False  # more conversations past this page, in the direction it was read


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """A conversation's place in the list (``updated_at`` descending, then ``id``): what a list cursor holds."""

    updated_at: str
    id: str

    @classmethod
    def of(cls, conversation: Conversation) -> ConversationKey:
        return cls(conversation.updated_at, conversation.id)


@dataclass(frozen=True, slots=True)
class MessageKey:
    """A message's place in its conversation (``created_at``, then the insertion ``seq``): what a message cursor
    holds. SQLite orders by ``seq`` alone, which follows ``created_at``."""

    created_at: str
    seq: int


@dataclass(frozen=True, slots=True)
class MessagePage:
    messages: list[Message]  # in the order asked for
    oldest: MessageKey | None  # the keys of the page's oldest and newest messages; None when it is empty
    newest: MessageKey | None
    has_more: bool  # more messages past this page, in the direction it was read
    leaf_id: str | None = None  # the end of the branch read


ActionKind = Literal["update", "delete"]


@dataclass(frozen=True, slots=True)
class NewAction:
    """A change the assistant prepared that only the user may carry out (``agents/actions.py``). ``changes`` holds
    the validated columns of an update (None for a delete); ``before`` the record's values it replaces, as the user
    is shown them (those columns of an update, every column of a delete). The id is generated here so a retried
    insert is a no-op."""

    table: str
    tool: str
    kind: ActionKind
    record_id: str
    changes: dict[str, Any] | None
    summary: str
    before: dict[str, Any]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True, slots=True)
class PendingAction:
    id: str
    user_id: str
    table: str
    tool: str
    kind: ActionKind
    record_id: str
    changes: dict[str, Any] | None
    before: dict[str, Any] | None  # None only on an action kept by an earlier version, which cannot be confirmed
    summary: str
    created_at: str
    expires_at: str
    used_at: str | None


@dataclass(frozen=True, slots=True)
class ActionDone:
    """A confirmed action, carried out: the updated record (as ``update_record`` returns it), or None after a delete."""

    action: PendingAction
    record: dict[str, Any] | None


class Store(Protocol):
    kind: str

    async def open(self) -> None:
        """Called once, before any other call (SQLite: makes its file and schema). A store that cannot be reached yet
        still opens: reads and writes then fail, and ``/health`` says so."""

    def set_query_observer(self, observer: QueryObserver) -> None:
        """Report how long each call of this interface takes, once per call, to ``observer`` (the app's metrics)."""

    async def ping(self) -> None:
        """Raise ``UpstreamUnavailable`` when the store cannot answer a read."""

    async def probe_write(self) -> bool | None:
        """Whether a small write commits now (a full disk or a read-only database says False while reads still
        work), or None where the store cannot check (PostgREST acts only as signed-in users)."""

    async def list_conversations(
        self, caller: Caller, limit: int, offset: int, *, before: ConversationKey | None = None,
        after: ConversationKey | None = None, search: str | None = None
    ) -> ConversationPage:
        """Most recent activity first (``updated_at`` descending, then ``id``). ``before``/``after`` (at most one, and
        only with ``offset`` 0) keep the ``limit`` conversations nearest the key on its older/newer side, in list
        order. ``search`` (``services/store/search.py``) keeps those whose title, or one of whose messages, holds
        every word of it. ``total`` counts every conversation the search keeps, whatever the page; ``has_more``: more
        follow past the page (newer ones for ``after``, older ones otherwise)."""

    async def rename_conversation(self, caller: Caller, conversation_id: str, title: str) -> Conversation:
        """A new title is activity: ``updated_at`` moves to now (never back), as the Supabase trigger has always
        done; the same title again changes nothing."""

    async def create_conversation(self, caller: Caller, title: str | None) -> Conversation:
        ...

    async def get_conversation(self, caller: Caller, conversation_id: str) -> Conversation:
        ...

    async def delete_conversation(self, caller: Caller, conversation_id: str) -> None:
        """Its messages and runs go with it."""

    async def message_page(
        self, caller: Caller, conversation_id: str, limit: int, offset: int = 0, *, newest_first: bool = False,
        before: MessageKey | None = None, after: MessageKey | None = None, leaf: str | None = None,
    ) -> MessagePage:
        """A page of one branch: the path from the first message to the branch's leaf, each message with its
        ``parent_id`` and ``sibling_ids``. The branch is the active leaf's, or with ``leaf`` that of the newest leaf
        below that message (the newest child at each step; ``MessageNotFound`` unless it is in this conversation).
        ``before``/``after`` (at most one, and only with ``offset`` 0) keep the ``limit`` messages nearest the key on
        its older/newer side; ``has_more``: more follow past the page (older ones for ``before``, or newest first
        without a key; newer ones otherwise)."""

    async def set_active_leaf(self, caller: Caller, conversation_id: str, message_id: str) -> Conversation:
        """Switch to the branch through ``message_id`` (its newest leaf below, as ``message_page``'s ``leaf``);
        ``MessageNotFound`` for a message not in the conversation."""

    # Chat runs (services/runs/): a chat turn's generation, its event log and its controls, shared by every worker
    # through the store. ``services/store/run_log.py`` holds the formats both stores write.

    async def begin_run(self, caller: Caller, new: NewRun, limits: TurnLimits, history_limit: int) -> RunBegun:
        """Admit and begin a chat turn as one store call and one transaction, in this order:

        1. ``new.client_message_id`` already used by the caller: ``existing`` (same conversation and text) or
           ``conflict``; nothing is written and nothing counted (a repeat must not cost the user a turn).
        2. ``maintain_runs`` for the caller: their dead runs end (freeing conversations and slots), and their
           expired events go.
        3. Someone else's conversation: ``NotFound``, nothing written. A run still going in this one: ``in_progress``.
        4. Limits that are set: the chat-rate hit is counted (and stays counted when refused: ``rate_limited``); the
           caller's running runs are the stream slots: ``streams_full`` at ``limits.stream_limit``, ``retry_after``
           the time until the soonest would lapse without a heartbeat. Then ``limits.budget``: the period's ledger,
           the caller's running runs' reservations and this turn's, past a limit, is ``budget_exceeded`` (nothing
           counted); a started run records its reservation.
        4a. A parent, edited or regenerated message (``NewRun``) not in this conversation is ``MessageNotFound``;
           one of the wrong role, ``ValidationFailed``; nothing written.
        5. ``started``: the conversation (created with ``new.title`` if the id is unused), the user's message (not for
           a regenerate), the history (the newest ``history_limit`` messages of the path to the user's message,
           oldest first), the assistant's placeholder (``status: streaming``, empty) under the user's message as the
           active leaf, and the run row, which records the history's ids (``prompt_message_ids``).
        """

    async def flush_runs(self, updates: list[RunUpdate]) -> dict[str, RunControl]:
        """Write each update, only while its run is ``running``, and read back the controls of those runs. One
        transaction for all (on PostgREST one request, by the runs' write keys, for every user's runs). Returns the
        control of every run whose transaction committed, ``applied`` when its update was written; a run missing from
        the result was not written and is sent again. An update's ``calls`` go to the usage ledger in the same
        transaction, once per (run, call index), under the run's user and conversation, whatever became of the run: one
        ended elsewhere, by its user or deleted with its conversation still cost what its calls cost. An update the
        store refuses as bad input fails only itself: its run's control says ``rejected`` and the others are written
        (on PostgREST at the cost of more requests, only then)."""

    async def read_run(self, caller: Caller, run_id: str, after: int | None) -> RunView:
        """With its assistant message and, unless ``after`` is None, the event batches holding events after
        ``after``; ``RUN_NOT_FOUND`` if it is missing or someone else's."""

    async def running_run(self, caller: Caller, conversation_id: str) -> Run | None:
        """The run generating an answer in the conversation (at most one), found in the runs' own table, never
        through a message's metadata, which says what was written, not who may read it."""

    async def request_stop(self, caller: Caller, run_id: str, seen_chars: int | None) -> None:
        """Ask the run's worker to stop it; a run that has ended stays as it is. ``RUN_NOT_FOUND`` if it is missing or
        someone else's."""

    async def maintain_runs(self, caller: Caller | None, stale_seconds: float, events_ttl: float) -> None:
        """End the runs whose heartbeat is older than ``stale_seconds`` (``interrupted``, or ``stopped`` cut to the
        seen characters when a stop was asked) with their last saved text and a terminal event, and delete the event
        batches of runs that ended more than ``events_ttl`` seconds ago but their terminal event. ``caller`` None
        means every user's runs, which a store acting only as users (PostgREST) cannot do and skips."""

    async def usage_report(self, caller: Caller, since: float) -> UsageReport:
        """The ledger since ``since`` (Unix time) summed by model and by conversation, and the reservations the
        caller's running runs still hold (each less what its calls have used)."""

    async def rate_limit_hit(self, caller: Caller, bucket: str, window_seconds: int, limit: int) -> tuple[bool, float]:
        """Count one request of ``caller`` in ``bucket``; return (allowed, seconds until the window resets), in one
        atomic statement, so limits hold across workers (``services/limits/rates.py``). A store that can only act as
        a signed-in user (PostgREST) returns ``(True, 0.0)`` for a caller without an access token; the edge (nginx
        ``limit_req``) limits anonymous traffic there."""

    async def aclose(self) -> None:
        ...

    # Business records (invoices, appointments, ...): the agents' tools read and write them only through these.
    # Table and column names come from the ``Domain`` declaration, never from user or model input. Each is scoped to
    # the caller's records: another user's is ``RECORD_NOT_FOUND``, as a missing one.

    async def list_records(
        self, caller: Caller, domain: Domain, filters: dict[str, Any], limit: int
    ) -> list[dict[str, Any]]:
        """Those matching every equality filter, in the domain's stable order."""

    async def get_record(self, caller: Caller, domain: Domain, record_id: str) -> dict[str, Any]:
        ...

    async def insert_record(self, caller: Caller, domain: Domain, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` holds ``id`` (client-generated) and the columns."""

    async def update_record(
        self, caller: Caller, domain: Domain, record_id: str, values: dict[str, Any]
    ) -> dict[str, Any]:
        ...

    async def delete_record(self, caller: Caller, domain: Domain, record_id: str) -> None:
        ...

    # Pending actions (agents/actions.py): the updates and deletes the assistant prepares and the user confirms.
    # Another user's action is ``ACTION_NOT_FOUND``, as a missing one.

    async def create_action(self, caller: Caller, new: NewAction, ttl_seconds: float) -> PendingAction:
        """Keep ``new`` for the caller to confirm within ``ttl_seconds`` (the store's clock); nothing else changes.
        The caller's actions that expired long ago are pruned on the way."""

    async def get_action(self, caller: Caller, action_id: str) -> PendingAction:
        """As kept, used or not, expired or not (a reloaded page shows its Confirm again)."""

    async def confirm_action(self, caller: Caller, action_id: str) -> ActionDone:
        """Carry out the action once: marking it used and running its change are one transaction, so of two
        concurrent confirmations one runs it and the other is refused. The change goes through the
        ``update_record``/``delete_record`` statements, as the caller, and only while the record still holds the
        action's ``before``, checked in the same transaction. Refusals: ``Conflict`` ``ACTION_ALREADY_USED``, ``Gone``
        ``ACTION_EXPIRED`` (also an action without ``before``, kept by an earlier version); a record gone meanwhile
        is ``RECORD_NOT_FOUND`` and one that no longer holds ``before`` ``RECORD_CHANGED``, both leaving the action
        unused."""


def utc_now() -> str:
    """Now, as the API shows every timestamp (``TIMESTAMP_FORMAT``)."""
    return datetime.now(timezone.utc).strftime(TIMESTAMP_FORMAT)


def is_canonical_uuid(value: str) -> bool:
    """Whether ``value`` is a UUID spelled as the service writes every id (``str(uuid.uuid4())``: lowercase,
    hyphenated), so it compares equal to the ids stored."""
    try:
        return str(uuid.UUID(value)) == value.lower()  # uuid.UUID also takes "{...}", "urn:uuid:..." and bare hex
    except ValueError:
        return False
