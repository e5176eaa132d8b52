"""Reading and checking request input. Every problem becomes a 4xx ``AppError`` naming the field, never a 500.

The limits are the contract's: a chat message is 1..10,000 characters, ``limit`` 1..100, ``message_limit`` 1..500,
offsets are non-negative, ids are UUIDs. The client's ``history`` is accepted for compatibility with the earlier
frontend, bounded, and ignored: the prompt is built from stored history only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from errors import BadRequest, UnsupportedMediaType, ValidationFailed

MAX_MESSAGE_CHARS = 10_000
MAX_TITLE_CHARS = 200
MAX_HISTORY_ITEMS = 100

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def invalid(field: str, problem: str) -> ValidationFailed:
    return ValidationFailed(f"'{field}' {problem}.", code="VALIDATION_ERROR")


async def json_body(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType()
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The request body is not valid JSON.", code="MALFORMED_JSON") from None
    if not isinstance(body, dict):
        raise ValidationFailed("The request body must be a JSON object.")
    return body


def uuid_value(value: object, field: str) -> str:
    if not isinstance(value, str) or not _UUID.match(value):
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


def query_int(request: Request, name: str, default: int, low: int, high: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(name, "must be an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(name, f"must be {bound}")
    return value


@dataclass(frozen=True, slots=True)
class ChatInput:
    message: str
    conversation_id: str
    user_id: str


def chat_input(body: dict[str, Any]) -> ChatInput:
    message = text_value(required(body, "message"), "message", MAX_MESSAGE_CHARS)
    history = body.get("history", [])
    if not isinstance(history, list):
        raise invalid("history", "must be a list")
    if len(history) > MAX_HISTORY_ITEMS:
        raise invalid("history", f"must have at most {MAX_HISTORY_ITEMS} items")
    return ChatInput(
        message=message,
        conversation_id=uuid_value(required(body, "conversation_id"), "conversation_id"),
        user_id=uuid_value(required(body, "user_id"), "user_id"),
    )


def title_value(body: dict[str, Any]) -> str | None:
    title = body.get("title")
    if title is None:
        return None
    return text_value(title, "title", MAX_TITLE_CHARS, allow_blank=True).strip() or None
