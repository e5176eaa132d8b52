"""The specialists' tools: five per domain (list, get, create, update, delete), derived from the declarations.

Each tool has a JSON schema that goes to the model (Bedrock ``toolConfig``) and is enforced here before any query:
unknown fields, wrong types, values outside the vocabulary and missing required fields are refused. ``id``,
``user_id`` and timestamps are not in any writable schema, so they cannot be written. Identity comes from the
request's ``Caller``, never from tool arguments. A failure returns a safe message for the model; exception text
never leaves this module.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal

from errors import AppError, NotFound
from services.domains import Column, Domain
from services.store import Caller, Store

logger = logging.getLogger(__name__)

Action = Literal["list", "get", "create", "update", "delete"]

MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20
MAX_TEXT = 2000
MAX_JSON_ITEMS = 100


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
        return {"toolSpec": {"name": self.name, "description": self.description, "inputSchema": {"json": self.schema}}}

    @property
    def shows_arguments(self) -> bool:
        """Filters and ids are safe to echo on the stream; the field values of creates and updates are not."""
        return self.action in ("list", "get", "delete")


@dataclass(frozen=True, slots=True)
class ToolResult:
    status: Literal["success", "error"]
    content: dict[str, Any]


# -- schemas ------------------------------------------------------------------------------------------------------


def column_schema(column: Column) -> dict[str, Any]:
    schema: dict[str, Any]
    if column.enum:
        schema = {"type": "string", "enum": list(column.enum)}
    elif column.type in ("integer", "number"):
        schema = {"type": column.type}
        if column.minimum is not None:
            schema["minimum"] = column.minimum
        if column.maximum is not None:
            schema["maximum"] = column.maximum
    elif column.type == "json":
        schema = {"type": "array", "items": {"type": "object"}, "maxItems": MAX_JSON_ITEMS}
    else:
        formats = {"date": "date", "time": "time", "uuid": "uuid", "email": "email"}
        schema = {"type": "string", "maxLength": MAX_TEXT}
        if column.type in formats:
            schema["format"] = formats[column.type]
    description = column.description or {"date": "YYYY-MM-DD", "time": "HH:MM"}.get(column.type, "")
    if description:
        schema["description"] = description
    return schema


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


ID_SCHEMA = {"type": "string", "format": "uuid", "description": "The record's id"}


def tools_for(domain: Domain) -> list[Tool]:
    columns = {c.name: column_schema(c) for c in domain.columns}
    filters = {name: columns[name] for name in domain.filters}
    limit = {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "description": f"At most {MAX_LIST_LIMIT}"}
    changes = {**_object(columns, []), "minProperties": 1}
    plural, one = domain.table, domain.singular
    return [
        Tool(f"list_{plural}", "list", domain, f"List the user's {plural}, optionally filtered.",
             _object({**filters, "limit": limit}, [])),
        Tool(f"get_{one}", "get", domain, f"Get one {one} by id.", _object({"id": ID_SCHEMA}, ["id"])),
        Tool(f"create_{one}", "create", domain, f"Create a {one}. Required: {', '.join(domain.required)}.",
             _object(columns, list(domain.required))),
        Tool(f"update_{one}", "update", domain, f"Change some fields of a {one}.",
             _object({"id": ID_SCHEMA, "changes": changes}, ["id", "changes"])),
        Tool(f"delete_{one}", "delete", domain,
             f"Delete a {one}. Only after the user explicitly confirmed; pass confirm=true.",
             _object({"id": ID_SCHEMA, "confirm": {"type": "boolean"}}, ["id", "confirm"])),
    ]


# -- validation ---------------------------------------------------------------------------------------------------

_TIME = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,), "array": (list,),
}


def validate(schema: dict[str, Any], value: Any, path: str = "input") -> None:
    """Check ``value`` against the subset of JSON Schema our tool schemas use; raise ``ToolInputError``."""
    expected = schema.get("type")
    if expected is not None and not _is_type(value, expected):
        raise ToolInputError(f"{path} must be of type {expected}")
    if "enum" in schema and value not in schema["enum"]:
        raise ToolInputError(f"{path} must be one of: {', '.join(schema['enum'])}")
    _check_bounds(schema, value, path)
    if isinstance(value, str):
        _check_format(schema.get("format"), value, path)
    if isinstance(value, dict):
        _check_object(schema, value, path)
    if isinstance(value, list):
        for index, item in enumerate(value):
            validate(schema.get("items", {}), item, f"{path}[{index}]")


def _is_type(value: Any, expected: str) -> bool:
    if isinstance(value, bool) and expected in ("integer", "number"):
        return False  # JSON true is not a number, although Python's bool is an int
    return isinstance(value, _TYPES[expected])


def _check_bounds(schema: dict[str, Any], value: Any, path: str) -> None:
    if "minimum" in schema and value < schema["minimum"]:
        raise ToolInputError(f"{path} must be at least {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        raise ToolInputError(f"{path} must be at most {schema['maximum']}")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        raise ToolInputError(f"{path} must be at most {schema['maxLength']} characters")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        raise ToolInputError(f"{path} must have at most {schema['maxItems']} items")


def _check_format(kind: str | None, value: str, path: str) -> None:
    if kind == "date":
        try:
            date.fromisoformat(value)
        except ValueError:
            raise ToolInputError(f"{path} must be a date written YYYY-MM-DD") from None
        if len(value) != 10:
            raise ToolInputError(f"{path} must be a date written YYYY-MM-DD")
    elif kind == "time" and not _TIME.match(value):
        raise ToolInputError(f"{path} must be a time written HH:MM")
    elif kind == "uuid":
        try:
            uuid.UUID(value)
        except ValueError:
            raise ToolInputError(f"{path} must be a record id (UUID)") from None
    elif kind == "email" and not _EMAIL.match(value):
        raise ToolInputError(f"{path} must be an email address")


def _check_object(schema: dict[str, Any], value: dict[str, Any], path: str) -> None:
    properties = schema.get("properties")
    for name in schema.get("required", []):
        if value.get(name) is None:
            raise ToolInputError(f"{path}.{name} is required")
    if len(value) < schema.get("minProperties", 0):
        raise ToolInputError(f"{path} must not be empty")
    if properties is None:
        return
    for name, item in value.items():
        if name not in properties:
            if schema.get("additionalProperties") is False:
                raise ToolInputError(f"{path}.{name} is not a known field")
            continue
        if item is not None:
            validate(properties[name], item, f"{path}.{name}")


# -- execution ----------------------------------------------------------------------------------------------------


async def run_tool(store: Store, caller: Caller, tool: Tool, arguments: Any) -> ToolResult:
    """Validate, then run one tool call as the caller. Never raises: failures become error results."""
    try:
        validate(tool.schema, arguments)
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
        limit = arguments.get("limit", DEFAULT_LIST_LIMIT)
        filters = {k: v for k, v in arguments.items() if k != "limit" and v is not None}
        rows = await store.list_records(caller, domain, filters, limit)
        return {"table": domain.table, "count": len(rows), "rows": [_public(r) for r in rows]}
    if tool.action == "get":
        return {"record": _public(await store.get_record(caller, domain, arguments["id"]))}
    if tool.action == "create":
        defaults = {c.name: c.default for c in domain.columns if c.default is not None}
        values = {**defaults, **{k: v for k, v in arguments.items() if v is not None}, "id": str(uuid.uuid4())}
        return {"created": _public(await store.insert_record(caller, domain, values))}
    if tool.action == "update":
        return {"updated": _public(await store.update_record(caller, domain, arguments["id"], arguments["changes"]))}
    if arguments["confirm"] is not True:
        raise ToolInputError("deletion was not confirmed; ask the user, then call again with confirm=true")
    await store.delete_record(caller, domain, arguments["id"])
    return {"deleted": arguments["id"]}


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """What the model may see of a row: everything but the owner id."""
    return {k: v for k, v in record.items() if k != "user_id"}
