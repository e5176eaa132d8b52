"""Reading and checking request input. Every problem becomes a 4xx ``AppError`` naming the field, never a 500.

The limits are the contract's: a chat message is 1..10,000 characters, ``limit`` 1..100, ``message_limit`` 1..500,
offsets 0..1,000,000, ids are UUIDs. The client's ``history`` is accepted for compatibility with the earlier
frontend, of any length (the body-size cap bounds it) or null, and ignored: the prompt is built from stored history
only.

A JSON body must be UTF-8 (RFC 8259 section 8.1), nested at most ``MAX_JSON_DEPTH`` deep, and hold no lone surrogate
and no NUL (U+0000) in any string: Python decodes ``\\ud800`` (and, from bytes, ``ED A0 80``) into a ``str`` that no
database and no UTF-8 encoder accepts, and PostgreSQL's text cannot hold a NUL, so such text is refused here, the
same on both stores, rather than failing at the write. (A search's ``q`` is not held to this: it is never stored,
and only its words reach a store.)
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

from starlette.requests import ClientDisconnect, Request

from errors import BadRequest, ClientClosedRequest, RequestTimeout, UnsupportedMediaType, ValidationFailed

MAX_MESSAGE_CHARS = 10_000
MAX_TITLE_CHARS = 200
MAX_QUERY_CHARS = 200  # a conversation search (``q``)
# A query integer declared without an upper bound (the offsets) gets this one: far past any real page, and far
# inside the 64-bit integers SQLite and PostgreSQL bind (9223372036854775808 was a 500).
DEFAULT_MAX_INT = 1_000_000
# Deeper than any body the API defines (a chat body with history is 4 levels), far below Python's recursion limit.
MAX_JSON_DEPTH = 32
# Bounds for run inputs: far above any real answer (max tokens bound it), low enough to stay a small integer.
MAX_ANSWER_CHARS = 10_000_000
MAX_EVENT_ID = 10_000_000

# Used with fullmatch only: re.match with "$" also accepts a trailing newline.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# ASCII digits only: int() also takes " 1", "1_0" and other scripts' digits, many spellings of one value.
_INTEGER = re.compile(r"-?[0-9]{1,20}")
# Text no store can keep: a lone surrogate, or NUL. In a JSON body, strict UTF-8 leaves a \u escape as the only way
# to spell either (a raw NUL is a control character JSON refuses).
_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")


_DIGITS = re.compile(r"[0-9]{1,9}")


def invalid(field: str, problem: str) -> ValidationFailed:
    return ValidationFailed(f"'{field}' {problem}.", code="VALIDATION_ERROR")


async def json_body(request: Request, timeout: float) -> dict[str, Any]:
    """The request's JSON object, read within ``timeout`` seconds: a client trickling its body must not hold a
    connection and its buffer for as long as it likes."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType()
    try:
        async with asyncio.timeout(timeout):  # asyncio's own: an anyio scope costs several times more per request
            raw = await request.body()
    except ClientDisconnect:
        # The client left before sending the body it announced: not a server error, and nobody is left to answer.
        raise ClientClosedRequest() from None
    except TimeoutError:
        raise RequestTimeout() from None
    text = _utf8(raw)
    body = _parse_json(text)
    if not isinstance(body, dict):
        raise ValidationFailed("The request body must be a JSON object.")
    if _nesting(body) > MAX_JSON_DEPTH:
        raise _too_deep()
    if _UNSTORABLE_ESCAPE.search(text):
        _refuse_unstorable(body)
    return body


def _utf8(raw: bytes) -> str:
    try:
        # Decoded here, strictly: json.loads on bytes guesses UTF-16/32 and decodes UTF-8 with "surrogatepass".
        # "-sig" only drops a leading byte order mark, which RFC 8259 lets a parser ignore.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("The request body is not valid UTF-8.", code="MALFORMED_JSON") from None


def _parse_json(text: str) -> Any:
    try:
        return _JSON.decode(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError:
        raise BadRequest("The request body is not valid JSON.", code="MALFORMED_JSON") from None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")  # json.loads accepts NaN and Infinity; JSON does not


_JSON = json.JSONDecoder(parse_constant=_not_json)  # made once: json.loads with options builds a decoder per call


def _too_deep() -> BadRequest:
    return BadRequest(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.", code="MALFORMED_JSON")


def _nesting(value: dict[str, Any]) -> int:
    """How deep the containers go (the body itself is 1), level by level: no recursion, and strings are skipped."""
    depth, level = 0, [value]
    while level and depth <= MAX_JSON_DEPTH:
        depth += 1
        # Exact type tests (json.loads makes plain dicts and lists): a 256 KB body costs about as much as parsing it.
        level = [
            child
            for item in level
            for child in (item.values() if type(item) is dict else item)
            if type(child) in (dict, list)
        ]
    return depth


def _refuse_unstorable(body: dict[str, Any]) -> None:
    """422 naming the top-level field whose text (values or names, at any depth) holds a lone surrogate or a NUL."""
    for name, value in body.items():
        if _UNSTORABLE.search(name):
            raise ValidationFailed("A field name in the request body is not valid Unicode text.")
        if any(_UNSTORABLE.search(text) for text in _strings(value)):
            raise invalid(_shown(name), _UNSTORABLE_PROBLEM)


def _strings(value: Any) -> Iterator[str]:
    """Every string in ``value``, names included, at any depth (bounded by ``MAX_JSON_DEPTH``). Walked only for a body
    that spells an escape we refuse, so the usual body never pays for it."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for name, item in value.items():
            yield name
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


_UNSTORABLE_PROBLEM = "must be valid Unicode text without NUL characters (U+0000) or lone surrogates"


def _shown(name: str) -> str:
    return name if len(name) <= 64 else name[:64] + "..."  # an unknown field's name is the client's text


def uuid_value(value: object, field: str) -> str:
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise invalid(field, "must be a UUID")
    return value.lower()


def required(body: dict[str, Any], field: str) -> Any:
    if field not in body or body[field] is None:
        raise invalid(field, "is required")
    return body[field]


def text_value(value: object, field: str, max_chars: int, *, allow_blank: bool = False) -> str:
    if not isinstance(value, str):
        raise invalid(field, "must be a string")
    if not allow_blank and not value.strip():
        raise invalid(field, "must not be empty")
    if len(value) > max_chars:
        raise invalid(field, f"must be at most {max_chars} characters")
    return value


def query_uuid(request: Request, name: str) -> str:
    return uuid_value(request.query_params.get(name), name)


def query_int(request: Request, name: str, default: int, low: int, high: int = DEFAULT_MAX_INT) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not _INTEGER.fullmatch(raw) or not low <= int(raw) <= high:
        raise invalid(name, f"must be an integer between {low} and {high}")
    return int(raw)


@dataclass(frozen=True, slots=True)
class ChatInput:
    message: str
    conversation_id: str
    user_id: str
    client_message_id: str | None = None


def chat_input(body: dict[str, Any]) -> ChatInput:
    message = text_value(required(body, "message"), "message", MAX_MESSAGE_CHARS)
    # Ignored, so neither its length nor its items are checked (the earlier frontend sends every message, and null).
    if not isinstance(body.get("history"), (list, type(None))):
        raise invalid("history", "must be a list")
    return ChatInput(
        message=message,
        conversation_id=uuid_value(required(body, "conversation_id"), "conversation_id"),
        user_id=uuid_value(required(body, "user_id"), "user_id"),
        client_message_id=optional_uuid(body, "client_message_id"),
    )


def optional_uuid(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    return None if value is None else uuid_value(value, field)


@dataclass(frozen=True, slots=True)
class StopInput:
    user_id: str
    seen_chars: int | None


def stop_input(body: dict[str, Any]) -> StopInput:
    seen = body.get("seen_chars")
    # JSON Schema's integer, as /openapi.json declares it: 5.0 is one; a JSON true (a Python int) is not.
    if isinstance(seen, float) and seen.is_integer():
        seen = int(seen)
    if seen is not None and (not isinstance(seen, int) or isinstance(seen, bool) or not 0 <= seen <= MAX_ANSWER_CHARS):
        raise invalid("seen_chars", f"must be an integer between 0 and {MAX_ANSWER_CHARS}")
    return StopInput(uuid_value(required(body, "user_id"), "user_id"), seen)


def last_event_id(request: Request) -> int:
    """Where a resume starts: the ``Last-Event-ID`` header (what a browser's EventSource sends when it reconnects),
    else ``?after=N``, else the run's first event."""
    header = request.headers.get("last-event-id")
    if header is None or header.strip() == "":
        return query_int(request, "after", 0, 0, MAX_EVENT_ID)
    raw = header.strip()
    if not _DIGITS.fullmatch(raw) or int(raw) > MAX_EVENT_ID:
        raise invalid("Last-Event-ID", f"must be an integer between 0 and {MAX_EVENT_ID}")
    return int(raw)


def title_value(body: dict[str, Any]) -> str | None:
    """A new conversation's title: at most 200 characters once stripped; blank is none."""
    title = body.get("title")
    if title is None:
        return None
    return _stripped_title(title, allow_blank=True) or None


def new_title(body: dict[str, Any]) -> str:
    """A rename's title: required, and 1..200 characters once stripped (create's checks, but not blank)."""
    return _stripped_title(required(body, "title"), allow_blank=False)


def _stripped_title(value: object, *, allow_blank: bool) -> str:
    # Stripped before it is measured: the limit is on the title kept, not on the spaces around it.
    return text_value(value.strip() if isinstance(value, str) else value, "title", MAX_TITLE_CHARS,
                      allow_blank=allow_blank)


def query_text(request: Request, name: str, max_chars: int) -> str | None:
    """A free-text query parameter, stripped; None when absent or blank (as an empty ``limit=`` is its default)."""
    raw = request.query_params.get(name)
    if raw is None or not raw.strip():
        return None
    if len(raw) > max_chars:
        raise invalid(name, f"must be at most {max_chars} characters")
    return raw.strip()


def query_choice(request: Request, name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first is the default)."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return choices[0]
    if raw not in choices:
        raise invalid(name, f"must be one of {', '.join(choices)}")
    return raw
