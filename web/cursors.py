"""Paging cursors: opaque strings that hold a list item's place (``services.store.ConversationKey``,
``MessageKey``), made for responses and read back from query parameters.

A cursor is unpadded base64url of compact JSON, ``["c", updated_at, id]`` or ``["m", created_at, seq]``. It is opaque
to clients but not secret: it holds nothing the response did not show, and every read is scoped to the caller, so a
made-up cursor can only choose where the caller's own list starts. Reading one checks everything (its kind, a
timestamp in the stores' format, a UUID, a sequence number in range) so a bad cursor is a 422 naming the parameter,
never a store error. Its length and alphabet are checked first, by its declaration (``web/inputs.py``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime
from typing import Any

from errors import ValidationFailed
from services.store import Conversation, ConversationKey, MessageKey
from web.fields import NOT_A_CURSOR, Given, invalid, uuid_value

MAX_SEQ = 2**63 - 1  # SQLite's and PostgreSQL's bigint

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")  # services.store.TIMESTAMP_FORMAT


def conversation_cursor(conversation: Conversation) -> str:
    key = ConversationKey.of(conversation)
    return _encode(["c", key.updated_at, key.id])


def message_cursor(key: MessageKey) -> str:
    return _encode(["m", key.created_at, key.seq])


def seek(given: Given, before: str, after: str, offset: str) -> tuple[Any, Any]:
    """A paged request's ``before`` and ``after`` cursors (their keys, or None): at most one of them, and not with its
    ``offset``."""
    before_key, after_key = given[before], given[after]
    if before_key is not None and after_key is not None:
        raise invalid(before, f"cannot be combined with '{after}'")
    if (before_key is not None or after_key is not None) and given[offset]:
        raise invalid(offset, f"cannot be combined with '{before}' or '{after}'")
    return before_key, after_key


def conversation_key(value: str, name: str) -> ConversationKey:
    """The place a conversation cursor holds (its declaration has checked its length and alphabet)."""
    _, updated_at, conversation_id = _decode(value, name, "c")
    try:
        return ConversationKey(_timestamp(updated_at, name), uuid_value(conversation_id, name))
    except ValidationFailed:  # uuid_value's own message (it also refuses a non-string) would speak of an id
        raise _not_a_cursor(name) from None


def message_key(value: str, name: str) -> MessageKey:
    """The place a message cursor holds (its declaration has checked its length and alphabet)."""
    _, created_at, seq = _decode(value, name, "m")
    if type(seq) is not int or not 0 < seq <= MAX_SEQ:  # bool is an int; a JSON true is not a sequence number
        raise _not_a_cursor(name)
    return MessageKey(_timestamp(created_at, name), seq)


def _encode(parts: list[Any]) -> str:
    raw = json.dumps(parts, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode(value: str, name: str, kind: str) -> list[Any]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (binascii.Error, ValueError):  # bad padding, not UTF-8, not JSON
        raise _not_a_cursor(name) from None
    if not isinstance(parts, list) or len(parts) != 3 or parts[0] != kind:
        raise _not_a_cursor(name)
    return parts


def _timestamp(value: object, name: str) -> str:
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        raise _not_a_cursor(name)
    try:
        datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ")  # 2026-02-30 has the shape but is no time
    except ValueError:
        raise _not_a_cursor(name) from None
    return value


def _not_a_cursor(name: str) -> ValidationFailed:
    return invalid(name, NOT_A_CURSOR)
