"""The specialist agents' domains, declared as data: adding a domain is adding an entry to ``DOMAINS``.

Each ``Domain`` names its agent (the ``agent_type`` on the stream), its table and columns, which fields a new record
needs and their defaults, the status vocabulary, how lists are ordered, and, for the built-in local responder that
stands in for a model, the words that route a message to it and the columns it shows of a row. Tables, tool schemas
and the SQLite DDL are all derived from it.
Tables and columns follow the earlier service's ``api.invoices`` and sibling tables; every table also has ``id``,
``user_id``, ``created_at`` and ``updated_at``, which no tool can write. Nothing here says which columns matter to
guard: every update and every delete waits for the user's confirmation (``services/agents/actions.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

ColumnType = Literal["text", "date", "time", "integer", "number", "uuid", "json", "email"]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: ColumnType = "text"
    required: bool = False
    default: Any = None
    enum: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class Domain:
    agent_type: str
    table: str
    singular: str
    description: str
    instructions: str
    columns: tuple[Column, ...]
    order_by: tuple[tuple[str, Literal["asc", "desc"]], ...]
    # The words that route a message to it besides its singular and table names (``keywords`` adds those).
    also_routed_by: tuple[str, ...]
    filters: tuple[str, ...] = ()
    # What the built-in responder shows of each row (a model reads them all): what names it, then its status.
    shown: tuple[str, ...] = ()

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)

    @property
    def keywords(self) -> tuple[str, ...]:
        """The words that route a message to this domain (the built-in responder's), its names first."""
        return (self.singular, self.table, *self.also_routed_by)

    @property
    def label(self) -> str:
        """The column that names a record to its owner (an invoice's number, a contact's name): the first required."""
        return self.required[0]


_COMMON_RULES = (
    "Use your tools to read and change the user's records; never invent records, amounts or dates. "
    "Ask for any required field you do not have before creating a record. "
    "Changing or deleting a record only prepares the change: the user confirms it themselves in the app, so tell "
    "them what is waiting for their confirmation and never say it is done. "
    "Answer briefly in plain language; format money with two decimals and dates as written."
)


def _instructions(role: str) -> str:
    return f"You are Canvalo's {role} for a painting contractor. {_COMMON_RULES}"


def _status(default: str, *values: str) -> Column:
    return Column("status", enum=values, default=default, description="Record status")


DOMAINS: tuple[Domain, ...] = (
    Domain(
        agent_type="invoices", table="invoices", singular="invoice",
        description="Invoices: amounts billed to clients, due dates, payments and balances.",
        instructions=_instructions("invoicing specialist"),
        columns=(
            Column("invoice_number", required=True, description="Invoice number, e.g. INV-1043"),
            Column("client_name", required=True),
            Column("client_email", "email"),
            Column("client_id", "uuid"),
            Column("project_id", "uuid"),
            Column("issue_date", "date"),
            Column("due_date", "date", required=True),
            Column("paid_date", "date"),
            Column("subtotal", "number", default=0, minimum=0),
            Column("tax_rate", "number", default=0, minimum=0),
            Column("tax_amount", "number", default=0, minimum=0),
            Column("discount_amount", "number", default=0, minimum=0),
            Column("total_amount", "number", required=True, minimum=0),
            Column("amount_paid", "number", default=0, minimum=0),
            Column("line_items", "json", default=[]),
            _status("draft", "draft", "sent", "viewed", "partial", "paid", "overdue", "cancelled"),
            Column("notes"),
            Column("terms"),
            Column("payment_method"),
        ),
        order_by=(("created_at", "desc"),),
        also_routed_by=("billing", "billed", "unpaid", "payment", "paid", "inv", "owed", "owing"),
        filters=("status", "client_name", "invoice_number", "client_id"),
        shown=("invoice_number", "client_name", "status", "total_amount", "amount_paid", "due_date", "paid_date"),
    ),
    Domain(
        agent_type="appointments", table="appointments", singular="appointment",
        description="Appointments: site visits, estimates and jobs on the calendar.",
        instructions=_instructions("scheduling specialist"),
        columns=(
            Column("client_name", required=True),
            Column("client_id", "uuid"),
            Column("title"),
            Column("description"),
            Column("scheduled_date", "date", required=True),
            Column("scheduled_time", "time", required=True, description="Start time, HH:MM (24-hour)"),
            Column("duration_minutes", "integer", default=60, minimum=1, maximum=24 * 60),
            Column("location"),
            _status("scheduled", "scheduled", "confirmed", "completed", "cancelled", "no_show"),
            Column("notes"),
        ),
        order_by=(("scheduled_date", "asc"), ("scheduled_time", "asc")),
        also_routed_by=("schedule", "scheduled", "reschedule", "calendar", "visit", "booking", "meeting"),
        filters=("status", "client_name", "scheduled_date", "client_id"),
        shown=("title", "client_name", "status", "scheduled_date", "scheduled_time", "location"),
    ),
    Domain(
        agent_type="projects", table="projects", singular="project",
        description="Projects: painting jobs with their client, dates, budget and progress.",
        instructions=_instructions("project specialist"),
        columns=(
            Column("name", required=True),
            Column("client_name", required=True),
            Column("client_id", "uuid"),
            Column("description"),
            Column("start_date", "date"),
            Column("end_date", "date"),
            Column("budget", "number", minimum=0),
            _status("planning", "planning", "in_progress", "completed", "on_hold", "cancelled"),
            Column("notes"),
        ),
        order_by=(("created_at", "desc"),),
        also_routed_by=("job", "jobs"),
        filters=("status", "client_name", "client_id"),
        shown=("name", "client_name", "status", "start_date", "end_date", "budget"),
    ),
    Domain(
        agent_type="proposals", table="proposals", singular="proposal",
        description="Proposals and estimates sent to prospective clients.",
        instructions=_instructions("proposals specialist"),
        columns=(
            Column("title", required=True),
            Column("client_name", required=True),
            Column("client_id", "uuid"),
            Column("description"),
            Column("total_amount", "number", minimum=0),
            Column("valid_until", "date"),
            _status("draft", "draft", "sent", "viewed", "accepted", "rejected", "expired"),
            Column("notes"),
        ),
        order_by=(("created_at", "desc"),),
        also_routed_by=("estimate", "estimates", "quote", "quotes", "bid", "bids"),
        filters=("status", "client_name", "client_id"),
        shown=("title", "client_name", "status", "total_amount", "valid_until"),
    ),
    Domain(
        agent_type="contacts", table="contacts", singular="contact",
        description="Contacts: clients, suppliers and leads with their details.",
        instructions=_instructions("contacts specialist"),
        columns=(
            Column("name", required=True),
            Column("email", "email"),
            Column("phone"),
            Column("company"),
            Column("address"),
            Column("contact_type", enum=("client", "supplier", "lead", "other"), default="client", description="Kind"),
            Column("notes"),
        ),
        order_by=(("name", "asc"),),
        also_routed_by=("client", "clients", "customer", "customers", "supplier", "suppliers", "lead", "leads"),
        filters=("contact_type", "name", "company"),
        shown=("name", "contact_type", "company", "email", "phone"),
    ),
    Domain(
        agent_type="reviews", table="reviews", singular="review",
        description="Reviews clients left, their ratings and the replies to them.",
        instructions=_instructions("reviews specialist"),
        columns=(
            Column("reviewer_name", required=True),
            Column("rating", "integer", required=True, minimum=1, maximum=5),
            Column("comment"),
            Column("source", description="Where it was posted, e.g. Google"),
            _status("pending", "pending", "published", "responded", "hidden"),
            Column("response"),
        ),
        order_by=(("created_at", "desc"),),
        also_routed_by=("rating", "ratings", "feedback", "testimonial", "testimonials"),
        filters=("status", "rating"),
        shown=("reviewer_name", "rating", "status", "source", "comment"),
    ),
    Domain(
        agent_type="campaigns", table="campaigns", singular="campaign",
        description="Marketing campaigns: email, SMS, social and direct mail.",
        instructions=_instructions("marketing specialist"),
        columns=(
            Column("name", required=True),
            Column("campaign_type", enum=("email", "sms", "social", "direct_mail"), default="email"),
            Column("description"),
            Column("start_date", "date"),
            Column("end_date", "date"),
            Column("budget", "number", minimum=0),
            _status("draft", "draft", "scheduled", "active", "paused", "completed"),
        ),
        order_by=(("created_at", "desc"),),
        also_routed_by=("marketing", "newsletter", "promotion", "promotions"),
        filters=("status", "campaign_type"),
        shown=("name", "campaign_type", "status", "start_date", "end_date", "budget"),
    ),
    Domain(
        agent_type="tasks", table="tasks", singular="task",
        description="Tasks and to-dos, with priority, due date and project.",
        instructions=_instructions("task specialist"),
        columns=(
            Column("title", required=True),
            Column("description"),
            Column("due_date", "date"),
            Column("priority", enum=("low", "medium", "high", "urgent"), default="medium"),
            _status("todo", "todo", "in_progress", "completed", "cancelled"),
            Column("project_id", "uuid"),
        ),
        order_by=(("due_date", "asc"), ("created_at", "asc")),
        also_routed_by=("todo", "to-do", "to-dos", "reminder", "reminders"),
        filters=("status", "priority", "project_id"),
        shown=("title", "status", "priority", "due_date"),
    ),
    Domain(
        agent_type="settings", table="goals", singular="goal",
        description="Business goals and targets (revenue, projects, personal, team) and progress towards them.",
        instructions=_instructions("goals and settings specialist"),
        columns=(
            Column("title", required=True),
            Column("description"),
            Column("goal_type", enum=("revenue", "project", "personal", "team"), default="revenue"),
            Column("target_value", "number"),
            Column("current_value", "number", default=0),
            Column("target_date", "date"),
            Column("progress", "integer", default=0, minimum=0, maximum=100),
            _status("not_started", "not_started", "in_progress", "completed", "abandoned"),
        ),
        order_by=(("target_date", "asc"), ("created_at", "asc")),
        also_routed_by=("target", "targets", "settings", "preferences"),
        filters=("status", "goal_type"),
        shown=("title", "goal_type", "status", "progress", "current_value", "target_value", "target_date"),
    ),
)

BY_AGENT = {domain.agent_type: domain for domain in DOMAINS}
BY_TABLE = {domain.table: domain for domain in DOMAINS}
