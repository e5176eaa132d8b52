"""The building blocks of the document's schemas: references, nullable and closed objects, shared property shapes."""

from __future__ import annotations

from typing import Any

from web.fields import CURSOR, NULL, UUID, Schema

__all__ = ["BEFORE", "BOOLEAN", "CHANGES", "COUNT", "CURSOR", "NULL", "STRING", "TIMESTAMP", "UUID", "Schema", "closed",
           "nullable", "ref", "schema"]


def ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def schema(name: str) -> Schema:
    return ref("schemas", name)


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def closed(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    """A response object: every key listed, nothing else."""
    return {
        "type": "object",
        "required": list(properties) if required is None else required,
        "properties": properties,
        "additionalProperties": False,
        **extra,
    }


# A pending action's change, exact (services/agents/actions.py): what it replaces, and the new values of an update.
BEFORE: Schema = {"type": "object", "description": "The record's values the change replaces, as the user was shown "
                  "them: the columns an update sets, or every column of a delete."}
CHANGES: Schema = {**nullable({"type": "object"}), "description": "The new values of an update; null for a delete."}
TIMESTAMP: Schema = {"$ref": "#/components/schemas/Timestamp"}
STRING: Schema = {"type": "string"}
BOOLEAN: Schema = {"type": "boolean"}
COUNT: Schema = {"type": "integer", "minimum": 0}
