"""The specialists' tools: five per domain (list, get, create, update, delete), derived from the declarations.

Each tool has a JSON schema that goes to the model (Bedrock ``toolConfig``) and is enforced here before any query:
unknown fields, wrong types, values outside the vocabulary and missing required fields are refused. ``id``,
``user_id`` and timestamps are not in any writable schema, so they cannot be written. Identity comes from the
request's ``Caller``, never from tool arguments. A failure returns a safe message for the model; exception text
never leaves this module.

Updates and deletes are not carried out here: they become pending actions the user confirms
(``actions.py``), so no tool argument can stand for the user's consent. Lists, gets and creates run at once:
they change no record that exists.

``validate`` implements the subset of JSON Schema the schemas use, every keyword at every depth (inside arrays too);
``null`` is accepted only where a schema's ``type`` lists ``"null"``. Beyond the schemas, every number must be finite
and within ``MAX_NUMBER`` (one both stores hold as sent), and every string, property names included, is bounded and
holds no character a store cannot keep (NUL, a lone surrogate). It answers the arguments with every uuid in the
canonical lower case, so both stores compare it alike (SQLite compares text, PostgreSQL uuids).
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

from errors import AppError, NotFound
from services.agents import actions
from services.domains import Column, Domain
from services.store import ActionKind, Caller, NewAction, Store, is_canonical_uuid
from services.store.text import UNSTORABLE

logger = logging.getLogger(__name__)

Action = Literal["list", "get", "create", "update", "delete"]

MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20
MAX_TEXT = 2000  # also the bound of a string whose schema gives none
# A list filter's text: every filter of a list goes in the URL of one PostgREST request, percent-encoded (up to 12
# characters for one), and a gateway refuses a long URL (414; nginx's default bound is 8 KB). Two filters this long
# stay far inside it, whatever their characters, and SQLite is held to the same bound.
MAX_FILTER_TEXT = 200
MAX_JSON_ITEMS = 100
MAX_NAME = 64  # an undeclared property name (a line item's keys)
MAX_DEPTH = 8  # our deepest schema is 4 (input, changes, line_items, an item)
MAX_EMAIL = 254  # RFC 5321's limit on a forward path, less its angle brackets
# Every number, at any depth, must be one both stores hold as sent, so a confirmation never meets one they refuse.
# SQLite keeps a number column as REAL (a double: every whole number up to 2**53 is exact, and binding an int past
# 2**63 fails) and PostgreSQL an integer column as a 32-bit integer. 10**15 is past any amount a painting business
# records and still exact in a double; integer columns keep PostgreSQL's range unless they declare a narrower one.
MAX_NUMBER = 10**15
MAX_INTEGER = 2**31 - 1

# One entry of a JSON column (an invoice's line_items): a flat object of short scalars, e.g. item, qty, price.
JSON_ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "maxProperties": 20,
    "additionalProperties": {"type": ["string", "number", "boolean", "null"], "maxLength": 500,
                             "minimum": -MAX_NUMBER, "maximum": MAX_NUMBER},
}


class ToolInputError(Exception):
    """Arguments the model sent do not fit the tool's schema; the message is safe to show the model."""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    action: Action
    domain: Domain
    description: str
    schema: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        return tool_spec(self.name, self.description, self.schema)

    @property
    def shows_arguments(self) -> bool:
        """Filters and ids are safe to echo on the stream; the field values of creates and updates are not."""
        return self.action in ("list", "get", "delete")

    def needs_confirmation(self, arguments: dict[str, Any]) -> bool:
        """Whether this validated call only prepares a pending action: every update and every delete. A list of
        columns worth guarding was tried and was wrong (an email, a phone, a note are damage too), and a model that
        changes a record has always read records first, so no narrower rule keeps planted text out."""
        return self.action in ("update", "delete")


@dataclass(frozen=True, slots=True)
class ToolResult:
    status: Literal["success", "error", "confirmation_required"]
    content: dict[str, Any]  # what the model sees
    shown: dict[str, Any] = field(default_factory=dict)  # what the tool_call chunk adds to the status


# -- schemas ------------------------------------------------------------------------------------------------------


def column_schema(column: Column) -> dict[str, Any]:
    schema: dict[str, Any]
    if column.enum:
        schema = {"type": "string", "enum": list(column.enum), "maxLength": max(map(len, column.enum))}
    elif column.type in ("integer", "number"):
        largest = MAX_INTEGER if column.type == "integer" else MAX_NUMBER
        # Always both bounds, so the model is told the range validate enforces.
        schema = {"type": column.type,
                  "minimum": -largest if column.minimum is None else column.minimum,
                  "maximum": largest if column.maximum is None else column.maximum}
    elif column.type == "json":
        schema = {"type": "array", "items": JSON_ITEM_SCHEMA, "maxItems": MAX_JSON_ITEMS}
    else:
        lengths = {"date": 10, "time": 5, "uuid": 36, "email": MAX_EMAIL}
        schema = {"type": "string", "maxLength": lengths.get(column.type, MAX_TEXT)}
        if column.type in lengths:
            schema["format"] = column.type
    description = column.description or {"date": "YYYY-MM-DD", "time": "HH:MM"}.get(column.type, "")
    if description:
        schema["description"] = description
    return schema


def tool_spec(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A tool as Converse's ``toolConfig`` lists it."""
    return {"toolSpec": {"name": name, "description": description, "inputSchema": {"json": schema}}}


def object_schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null. Enums are left as they are: ``validate`` applies no other keyword to an allowed null."""
    return {**schema, "type": [schema["type"], "null"]}


def _filter_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A column's schema as a list filter: its text no longer than ``MAX_FILTER_TEXT``."""
    if schema["type"] != "string":
        return schema
    return {**schema, "maxLength": min(schema["maxLength"], MAX_FILTER_TEXT)}


def _clearable(column: Column) -> bool:
    """Whether an update may set the column to null: not a required field, a vocabulary or one with a default."""
    return not column.required and not column.enum and column.default is None


ID_SCHEMA = {"type": "string", "format": "uuid", "maxLength": 36, "description": "The record's id"}


def tools_for(domain: Domain) -> list[Tool]:
    columns = {c.name: column_schema(c) for c in domain.columns}
    # In a list or a create, null means "not given": no filter, or the column's default.
    filters = {name: _nullable(_filter_schema(columns[name])) for name in domain.filters}
    optional = {c.name: columns[c.name] if c.required else _nullable(columns[c.name]) for c in domain.columns}
    limit = {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "description": f"At most {MAX_LIST_LIMIT}"}
    changeable = {c.name: _nullable(columns[c.name]) if _clearable(c) else columns[c.name] for c in domain.columns}
    changes = {**object_schema(changeable, []), "minProperties": 1}
    plural, one = domain.table, domain.singular
    return [
        Tool(f"list_{plural}", "list", domain, f"List the user's {plural}, optionally filtered.",
             object_schema({**filters, "limit": _nullable(limit)}, [])),
        Tool(f"get_{one}", "get", domain, f"Get one {one} by id.", object_schema({"id": ID_SCHEMA}, ["id"])),
        Tool(f"create_{one}", "create", domain, f"Create a {one}. Required: {', '.join(domain.required)}.",
             object_schema(optional, list(domain.required))),
        Tool(f"update_{one}", "update", domain,
             f"Change some fields of a {one}. The change waits for the user to confirm it in the app.",
             object_schema({"id": ID_SCHEMA, "changes": changes}, ["id", "changes"])),
        # No confirm flag: the model sets every argument, so none can stand for the user's consent.
        Tool(f"delete_{one}", "delete", domain,
             f"Delete a {one}. The deletion waits for the user to confirm it in the app.",
             object_schema({"id": ID_SCHEMA}, ["id"])),
    ]


# -- validation ---------------------------------------------------------------------------------------------------

# Used with fullmatch only: with re.match, "$" also accepts a trailing newline.
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # date.fromisoformat alone also takes 2026-W01-1 and 20260101
_TIME = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,),
    "array": (list,), "null": (type(None),),
}


def validate(schema: dict[str, Any], value: Any, path: str = "input", depth: int = 0) -> Any:
    """Check ``value`` against ``schema``; raise ``ToolInputError``. Only these keywords are checked, at any depth,
    each on values of its kind: ``type`` (a name or a list), ``enum``, ``minimum``, ``maximum``, ``maxLength``,
    ``maxItems``, ``format`` (date, time, uuid, email), ``properties``, ``required``, ``additionalProperties``,
    ``minProperties``, ``maxProperties``, ``items``; a tool schema using any other would not be enforced. A null the
    ``type`` allows means "no value", so no other keyword applies to it. Answers ``value`` as the tools use it: every
    ``uuid`` lower-cased."""
    if depth > MAX_DEPTH:
        raise ToolInputError(f"{path} is nested too deeply")
    expected = schema.get("type")
    if expected is not None and not _is_type(value, expected):
        names = expected if isinstance(expected, list) else [expected]
        raise ToolInputError(f"{path} must be of type {' or '.join(names)}")
    if value is None:
        return None
    if "enum" in schema and value not in schema["enum"]:
        raise ToolInputError(f"{path} must be one of: {', '.join(schema['enum'])}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolInputError(f"{path} must be a finite number")  # NaN passes every minimum and maximum
    _check_bounds(schema, value, path)
    if isinstance(value, str):
        return _check_format(schema.get("format"), value, path)
    if isinstance(value, dict):
        return _check_object(schema, value, path, depth)
    if isinstance(value, list):
        return [validate(schema.get("items", {}), item, f"{path}[{index}]", depth + 1)
                for index, item in enumerate(value)]
    return value


def _is_type(value: Any, expected: str | list[str]) -> bool:
    if isinstance(expected, list):
        return any(_is_type(value, name) for name in expected)
    if isinstance(value, bool) and expected in ("integer", "number"):
        return False  # JSON true is not a number, although Python's bool is an int
    return isinstance(value, _TYPES[expected])


def _check_bounds(schema: dict[str, Any], value: Any, path: str) -> None:
    """The bounds of ``value``'s own kind (JSON Schema: a keyword ignores values it does not describe)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # A number no schema bounds is still bounded: Python's ints have no size, JSON's numbers no range.
        low = max(schema.get("minimum", -MAX_NUMBER), -MAX_NUMBER)
        high = min(schema.get("maximum", MAX_NUMBER), MAX_NUMBER)
        if value < low:
            raise ToolInputError(f"{path} must be at least {low}")
        if value > high:
            raise ToolInputError(f"{path} must be at most {high}")
    elif isinstance(value, str):
        limit = schema.get("maxLength", MAX_TEXT)  # every string is bounded, described or not
        if len(value) > limit:
            raise ToolInputError(f"{path} must be at most {limit} characters")
        _check_storable(value, path)
    elif isinstance(value, list) and "maxItems" in schema and len(value) > schema["maxItems"]:
        raise ToolInputError(f"{path} must have at most {schema['maxItems']} items")
    elif isinstance(value, dict):
        if len(value) < schema.get("minProperties", 0):
            raise ToolInputError(f"{path} must not be empty")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            raise ToolInputError(f"{path} must have at most {schema['maxProperties']} fields")


def _check_storable(text: str, what: str) -> None:
    """Refuse what no store keeps alike: PostgreSQL's text cannot hold a NUL, and no UTF-8 encoder (SQLite's
    binding, httpx's JSON) can write a lone surrogate. Refused on both stores alike, in values and names."""
    if UNSTORABLE.search(text):
        raise ToolInputError(f"{what} must not contain a NUL character or half a surrogate pair")


def _check_format(kind: str | None, value: str, path: str) -> str:
    """``value`` as the tools use it, once it is of its ``format``: a uuid in lower case, anything else as it is."""
    if kind == "date" and not _is_date(value):
        raise ToolInputError(f"{path} must be a date written YYYY-MM-DD")
    if kind == "time" and not _TIME.fullmatch(value):
        raise ToolInputError(f"{path} must be a time written HH:MM")
    if kind == "uuid":
        if not is_canonical_uuid(value):
            raise ToolInputError(f"{path} must be a record id (UUID)")
        return value.lower()  # the spelling every id is stored in: SQLite compares text, PostgreSQL uuids
    if kind == "email" and not _EMAIL.fullmatch(value):
        raise ToolInputError(f"{path} must be an email address")
    return value


def _is_date(value: str) -> bool:
    if not _DATE.fullmatch(value):
        return False
    try:
        date.fromisoformat(value)  # the calendar: no 2026-02-30
    except ValueError:
        return False
    return True


def _check_object(schema: dict[str, Any], value: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
    for name in schema.get("required", []):
        if value.get(name) is None:
            raise ToolInputError(f"{path}.{name} is required")
    properties = schema.get("properties", {})
    additional = schema.get("additionalProperties", {})  # JSON Schema's default: any value, under our bounds
    checked: dict[str, Any] = {}
    for name, item in value.items():
        if name in properties:
            checked[name] = validate(properties[name], item, f"{path}.{name}", depth + 1)
            continue
        if len(name) > MAX_NAME:
            raise ToolInputError(f"{path} has a field name longer than {MAX_NAME} characters")
        _check_storable(name, f"{path}'s field names")
        if additional is False:
            raise ToolInputError(f"{path}.{name} is not a known field")
        checked[name] = validate(additional if isinstance(additional, dict) else {}, item, f"{path}.{name}", depth + 1)
    return checked


# -- execution ----------------------------------------------------------------------------------------------------


async def run_tool(
    store: Store, caller: Caller, tool: Tool, arguments: Any, action_ttl: float = actions.DEFAULT_TTL_SECONDS
) -> ToolResult:
    """Validate, then run one tool call as the caller, or keep it as a pending action for ``action_ttl`` seconds
    when it needs the user's confirmation. Never raises: failures become error results."""
    try:
        arguments = validate(tool.schema, arguments)
        if tool.needs_confirmation(arguments):
            return await _prepare(store, caller, tool, arguments, action_ttl)
        return ToolResult("success", await _execute(store, caller, tool, arguments))
    except ToolInputError as exc:
        return ToolResult("error", {"error": f"Invalid arguments: {exc}."})
    except NotFound:
        return ToolResult("error", {"error": f"No {tool.domain.singular} with that id was found."})
    except AppError as exc:
        logger.warning("Tool %s failed: %s", tool.name, exc.code)
        return ToolResult("error", {"error": "The records could not be reached right now. Try again later."})
    except Exception:
        logger.exception("Tool %s failed unexpectedly", tool.name)
        return ToolResult("error", {"error": "The tool failed unexpectedly."})


async def _execute(store: Store, caller: Caller, tool: Tool, arguments: dict[str, Any]) -> dict[str, Any]:
    domain = tool.domain
    if tool.action == "list":
        limit = arguments.get("limit") or DEFAULT_LIST_LIMIT  # null means the default; the schema refuses 0
        filters = {k: v for k, v in arguments.items() if k != "limit" and v is not None}
        rows = await store.list_records(caller, domain, filters, limit)
        return {"table": domain.table, "count": len(rows), "rows": [_public(r) for r in rows]}
    if tool.action == "get":
        return {"record": _public(await store.get_record(caller, domain, arguments["id"]))}
    if tool.action == "create":
        defaults = {c.name: c.default for c in domain.columns if c.default is not None}
        values = {**defaults, **{k: v for k, v in arguments.items() if v is not None}, "id": str(uuid.uuid4())}
        return {"created": _public(await store.insert_record(caller, domain, values))}
    raise ValueError(f"{tool.name} needs the user's confirmation")  # run_tool sends it to _prepare; never reached


async def _prepare(
    store: Store, caller: Caller, tool: Tool, arguments: dict[str, Any], ttl: float
) -> ToolResult:
    """Keep the call as a pending action and change nothing. The record must exist and be the caller's now (else
    the usual "not found" result); the summary and ``before`` are written from this one read of it."""
    domain = tool.domain
    record = await store.get_record(caller, domain, arguments["id"])
    kind: ActionKind = "delete" if tool.action == "delete" else "update"
    changes = arguments["changes"] if kind == "update" else None
    before = actions.before_values(domain, kind, record, changes)
    if inexact := actions.inexact_columns(before):  # the confirmation compares what the user was shown
        return ToolResult("error", {"error": actions.inexact_to_confirm(domain, inexact)})
    summary = actions.describe(domain, kind, record, changes)
    if len(summary) > actions.MAX_SUMMARY:  # shown whole or not kept: the user confirms only what they can read
        return ToolResult("error", {"error": actions.too_large_to_show()})
    new = NewAction(domain.table, tool.name, kind, record["id"], changes, summary, before)
    pending = await store.create_action(caller, new, ttl)
    return ToolResult("confirmation_required", actions.for_model(pending), actions.for_stream(pending))


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """What the model may see of a row: everything but the owner id."""
    return {k: v for k, v in record.items() if k != "user_id"}
