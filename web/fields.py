"""One declared input (a path id, a query parameter, a header or a JSON body field), and a route's inputs.

A ``Field`` is the one place an input's name, kind, bounds, default and description are written: ``Field.read``
checks a value against them and ``Field.schema`` / ``Field.parameter`` describe them in ``/openapi.json``, the way
``settings.py`` parses and documents its fields from one declaration and ``services/tools.py`` checks tool arguments
against the schemas it sends the model. ``web/inputs.py`` declares every route's inputs with it.

A route reads its inputs by name through its ``Inputs`` (``given = LIST_CONVERSATIONS.given(request)``, then
``given["limit"]``), each one checked when the route asks for it: ``user_id`` first, by ``web.caller.caller_of``,
which counts the request against its caller before any other input is checked. A name the declaration lacks is a
``KeyError``, so a route cannot read an input its operation does not document. Every problem is a 422
``VALIDATION_ERROR`` naming the input.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Literal

from starlette.requests import Request

from errors import ValidationFailed

Schema = dict[str, Any]
Kind = Literal["uuid", "int", "text", "choice", "cursor", "list"]
Where = Literal["path", "query", "header", "body"]

# A query integer declared without an upper bound (the offsets) gets this one: far past any real page, and far
# inside the 64-bit integers SQLite and PostgreSQL bind (a value past them would fail there, as a server error).
DEFAULT_MAX_INT = 1_000_000

UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
CURSOR_PATTERN = "^[A-Za-z0-9_-]+$"  # unpadded base64url (web/cursors.py)
UUID: Schema = {"$ref": "#/components/schemas/Uuid"}
NULL: Schema = {"type": "null"}
CURSOR: Schema = {"type": "string", "pattern": CURSOR_PATTERN}
NOT_A_CURSOR = "must be a cursor from an earlier response"

# Used with fullmatch only (re.match with "$" also accepts a trailing newline); the document's patterns, compiled.
_UUID = re.compile(UUID_PATTERN)
_CURSOR = re.compile(CURSOR_PATTERN)
# ASCII digits only: int() also takes " 1", "1_0" and other scripts' digits, many spellings of one value.
_INTEGER = re.compile(r"-?[0-9]{1,20}")
_DIGITS = re.compile(r"[0-9]{1,9}")  # a header's integer: no sign


def invalid(field: str, problem: str) -> ValidationFailed:
    return ValidationFailed(f"'{field}' {problem}.", code="VALIDATION_ERROR")


def uuid_value(value: object, field: str) -> str:
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise invalid(field, "must be a UUID")
    return value.lower()


@dataclass(frozen=True, slots=True)
class Field:
    """One input. ``doc`` may name the bounds as ``{low}``, ``{high}``, ``{default}`` and ``{max_chars}``.

    Absent (or, in a query or header, empty) is ``default``; ``required`` refuses that instead. A body field that is
    not required may be null, and a path id is always required."""

    name: str
    kind: Kind
    where: Where = "body"
    doc: str = ""
    required: bool = False
    default: Any = None
    low: int = 0
    high: int = DEFAULT_MAX_INT
    max_chars: int = 0  # text and cursor
    blank: bool = False  # text: blank is allowed, and read as absent (None)
    strip: bool = False  # text: kept without surrounding whitespace (a body field is measured without it too)
    choices: tuple[str, ...] = ()
    decode: Callable[[str, str], Any] | None = None  # cursor: (value, name) -> what it points at (web/cursors.py)
    component: str = ""  # a parameter's name under the document's components.parameters

    def read(self, raw: Any) -> Any:
        """The input as sent (None when absent), checked: its value, or its default when absent."""
        return _READERS[self.kind](self, raw)

    def schema(self) -> Schema:
        """The value's JSON Schema; a body field's carries the description (a parameter's is beside it)."""
        schema = _SCHEMAS[self.kind](self, self.where == "body" and not self.required)
        if self.where == "body" and self.doc:
            schema["description"] = self.description()
        return schema

    def parameter(self) -> Schema:
        """The OpenAPI parameter object of a path id, query parameter or header."""
        return {"name": self.name, "in": self.where, "required": self.required, "description": self.description(),
                "schema": self.schema()}

    def description(self) -> str:
        text = self.doc.format(low=self.low, high=self.high, default=self.default, max_chars=self.max_chars)
        if self.kind == "int" and self.where == "query":
            text += f" {self.low}..{self.high}; empty or absent means {self.default}."
        if self.kind == "cursor":
            text += (f" Opaque; at most {self.max_chars} characters; empty means absent. Not with an offset, nor with "
                     "the opposite cursor (422).")
        return text


# -- reading ------------------------------------------------------------------------------------------------------


def _absent(field: Field) -> Any:
    if field.required and field.where == "body":
        raise invalid(field.name, "is required")
    return field.default


def _uuid(field: Field, raw: Any) -> Any:
    if raw is None and not field.required:
        return field.default
    if raw is None or (raw == "" and field.where == "query"):
        raise invalid(field.name, "is required")  # not "must be a UUID": the client sent none (?user_id= is none)
    return uuid_value(raw, field.name)


def _int(field: Field, raw: Any) -> Any:
    if field.where == "body":
        return _json_int(field, raw)
    text = raw.strip() if field.where == "header" and raw is not None else raw
    if not text:
        return field.default
    digits = _DIGITS if field.where == "header" else _INTEGER
    if not digits.fullmatch(text) or not field.low <= int(text) <= field.high:
        raise invalid(field.name, f"must be an integer between {field.low} and {field.high}")
    return int(text)


def _json_int(field: Field, value: Any) -> Any:
    # JSON Schema's integer, as /openapi.json declares it: 5.0 is one; a JSON true (a Python int) is not.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None:
        return _absent(field)
    if not isinstance(value, int) or isinstance(value, bool) or not field.low <= value <= field.high:
        raise invalid(field.name, f"must be an integer between {field.low} and {field.high}")
    return value


def _text(field: Field, raw: Any) -> Any:
    if field.where != "body":
        # A query's text: blank is absent (as an empty ``limit=`` is its default); measured as sent.
        if raw is None or not raw.strip():
            return field.default
        if len(raw) > field.max_chars:
            raise invalid(field.name, f"must be at most {field.max_chars} characters")
        return raw.strip() if field.strip else raw
    if raw is None:
        return _absent(field)
    if not isinstance(raw, str):
        raise invalid(field.name, "must be a string")
    # Stripped before it is measured: the limit is on the text kept, not on the spaces around it.
    value = raw.strip() if field.strip else raw
    if not field.blank and not value.strip():
        raise invalid(field.name, "must not be empty")
    if len(value) > field.max_chars:
        raise invalid(field.name, f"must be at most {field.max_chars} characters")
    return (value or None) if field.blank else value


def _choice(field: Field, raw: Any) -> Any:
    if raw is None or raw == "":
        return field.default
    if raw not in field.choices:
        raise invalid(field.name, f"must be one of {', '.join(field.choices)}")
    return raw


def _cursor(field: Field, raw: Any) -> Any:
    if raw is None or raw == "":
        return field.default
    if len(raw) > field.max_chars or not _CURSOR.fullmatch(raw):
        raise invalid(field.name, NOT_A_CURSOR)
    assert field.decode is not None
    return field.decode(raw, field.name)


def _list(field: Field, raw: Any) -> Any:
    if raw is None:
        return _absent(field)
    if not isinstance(raw, list):
        raise invalid(field.name, "must be a list")
    return raw


_READERS: dict[str, Callable[[Field, Any], Any]] = {
    "uuid": _uuid, "int": _int, "text": _text, "choice": _choice, "cursor": _cursor, "list": _list,
}


# -- documenting --------------------------------------------------------------------------------------------------


def _type(name: str, nullable: bool) -> str | list[str]:
    return [name, "null"] if nullable else name


def _int_schema(field: Field, nullable: bool) -> Schema:
    schema: Schema = {"type": _type("integer", nullable), "minimum": field.low, "maximum": field.high}
    if field.default is not None:
        schema["default"] = field.default
    return schema


def _text_schema(field: Field, nullable: bool) -> Schema:
    if field.blank:
        return {"type": _type("string", nullable), "maxLength": field.max_chars}
    # Not only whitespace.
    return {"type": _type("string", nullable), "minLength": 1, "maxLength": field.max_chars, "pattern": "\\S"}


_SCHEMAS: dict[str, Callable[[Field, bool], Schema]] = {
    "uuid": lambda field, nullable: {"anyOf": [dict(UUID), NULL]} if nullable else dict(UUID),
    "int": _int_schema,
    "text": _text_schema,
    "choice": lambda field, nullable: {"enum": list(field.choices), "default": field.default},
    "cursor": lambda field, nullable: dict(CURSOR),
    "list": lambda field, nullable: {"type": _type("array", nullable)},
}


# -- a route's inputs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inputs:
    """One route's inputs: its path ids, query parameters and headers (``parameters``), and the fields of its JSON
    body, documented as the schema ``body_name``."""

    parameters: tuple[Field, ...] = ()
    body: tuple[Field, ...] = ()
    body_name: str = ""
    _by_name: dict[str, Field] = dataclass_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {field.name: field for field in (*self.parameters, *self.body)}
        assert len(by_name) == len(self.parameters) + len(self.body), "one name, one input"
        object.__setattr__(self, "_by_name", by_name)

    def given(self, request: Request, body: dict[str, Any] | None = None) -> Given:
        """The request's inputs (and ``body``'s, once read), each checked when it is read."""
        return Given(self._by_name, request, body)

    def body_schema(self) -> Schema:
        """The body's schema: open (the service ignores fields it does not know); null counts as missing."""
        return {
            "type": "object",
            "required": [field.name for field in self.body if field.required],
            "properties": {field.name: field.schema() for field in self.body},
        }


# No repr (it would print the body, a user's message, into any log or report that shows it) and no equality.
@dataclass(slots=True, repr=False, eq=False)
class Given:
    """One request's declared inputs, by name: ``given["limit"]`` reads and checks ``limit`` when it is asked for."""

    _fields: dict[str, Field]
    _request: Request
    _body: dict[str, Any] | None

    def __getitem__(self, name: str) -> Any:
        field = self._fields[name]  # a KeyError: the route's declaration has no such input
        if field.where == "body":
            assert self._body is not None, f"{name}: the body has not been read"
            return field.read(self._body.get(name))
        if field.where == "query":
            return field.read(self._request.query_params.get(name))
        if field.where == "header":
            return field.read(self._request.headers.get(name))
        return field.read(self._request.path_params.get(name))
