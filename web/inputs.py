"""Every route's inputs, declared once (``web/fields.py``), and the reading of a JSON body. Every problem becomes a
4xx ``AppError`` naming the field, never a 500; ``/openapi.json`` documents each input from the same declaration.
The client's ``history`` is accepted for compatibility with the earlier frontend, of any length (the body-size cap
bounds it) or null, and ignored: the prompt is built from stored history only.

A JSON body must be UTF-8 (RFC 8259 section 8.1), nested at most ``MAX_JSON_DEPTH`` deep, and hold no lone surrogate
and no NUL (U+0000) in any string: Python decodes ``\\ud800`` (and, from bytes, ``ED A0 80``) into a ``str`` that no
database and no UTF-8 encoder accepts, and PostgreSQL's text cannot hold a NUL, so such text is refused here, the
same on both stores, rather than failing at the write. (A search's ``q`` is not held to this: it is never stored,
and only its words reach a store.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from starlette.requests import ClientDisconnect, Request

from errors import BadRequest, ClientClosedRequest, RequestTimeout, UnsupportedMediaType, ValidationFailed
from services.runs.titles import title_from_message
from services.store import NewRun
from services.store.text import UNSTORABLE
from web import cursors
from web.fields import DEFAULT_MAX_INT, Field, Given, Inputs, invalid

MAX_MESSAGE_CHARS = 10_000
MAX_TITLE_CHARS = 200
MAX_QUERY_CHARS = 200  # a conversation search (``q``)
# Far longer than any cursor made here (about 110 characters); a longer value is not worth decoding.
MAX_CURSOR_CHARS = 256
# Deeper than any body the API defines (a chat body with history is 4 levels), far below Python's recursion limit.
MAX_JSON_DEPTH = 32
# Bounds for run inputs: far above any real answer (max tokens bound it), low enough to stay a small integer.
MAX_ANSWER_CHARS = 10_000_000
MAX_EVENT_ID = 10_000_000

# Text no store can keep (services/store/text.py). In a JSON body, strict UTF-8 leaves a \u escape as the only way
# to spell either (a raw NUL is a control character JSON refuses).
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")


async def json_body(request: Request, timeout: float) -> dict[str, Any]:
    """The request's JSON object, read within ``timeout`` seconds: a client trickling its body must not hold a
    connection and its buffer for as long as it likes."""
    if not is_json_type(request.headers.get("content-type", "")):
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


def is_json_type(content_type: str) -> bool:
    """``application/json`` or a ``+json`` type (``application/merge-patch+json``), any parameters, any case: what
    FastAPI read as JSON. A body without a Content-Type is not: FastAPI read it as JSON, but a browser sends one
    without preflight (a ``Blob`` body), so accepting it would let any site's page write as a user whenever
    authentication is off. The types browsers send without preflight (``text/plain``, forms) are refused alike."""
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


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
        if UNSTORABLE.search(name):
            raise ValidationFailed("A field name in the request body is not valid Unicode text.")
        if any(UNSTORABLE.search(text) for text in _strings(value)):
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


# -- every route's inputs -----------------------------------------------------------------------------------------
# One declaration each: the routes in app.py read them (``given = inputs.X.given(request)``) and web/openapi/ documents
# them. A field's ``doc`` may name its bounds: ``{low}``, ``{high}``, ``{max_chars}``.


def _path_id(name: str, what: str, component: str) -> Field:
    return Field(name, "uuid", "path", f"The {what}'s id.", required=True, component=component)


def _integer(name: str, what: str, component: str, default: int, low: int, high: int = DEFAULT_MAX_INT) -> Field:
    return Field(name, "int", "query", f"{what},", default=default, low=low, high=high, component=component)


def _cursor(name: str, doc: str, component: str, place: Callable[[str, str], Any]) -> Field:
    return Field(name, "cursor", "query", doc, max_chars=MAX_CURSOR_CHARS, decode=place, component=component)


CONVERSATION_ID = _path_id("conversation_id", "conversation", "ConversationId")
RUN_ID = _path_id("run_id", "run", "RunId")
ACTION_ID = _path_id("action_id", "pending action", "ActionId")
USER_ID = Field("user_id", "uuid", "query", "The caller; with auth on it must equal the token's sub (else 403 "
                "USER_ID_MISMATCH).", required=True, component="UserId")
BODY_USER_ID = Field("user_id", "uuid", required=True)
LAST_EVENT_ID = Field("Last-Event-ID", "int", "header", "What EventSource and fetch-event-source send when they "
                      "reconnect: the last event the client has, {low}..{high}; blank means absent. The events "
                      "streamed are those after it: on GET /api/chat/runs/{{run_id}}/events it wins over ?after; on "
                      "POST /api/chat/stream it applies to a repeated client_message_id, and a send that starts a run "
                      "streams it from its first event.", high=MAX_EVENT_ID, component="LastEventId")

CHAT_STREAM = Inputs(
    parameters=(LAST_EVENT_ID,),
    body_name="ChatRequest",
    body=(
        Field("message", "text", doc="1..{max_chars} characters (code points), not only whitespace. Required, but "
              "with regenerate_message_id, which sends no new message (ignored if sent).", max_chars=MAX_MESSAGE_CHARS),
        Field("conversation_id", "uuid", doc="Created on first use, owned by the caller.", required=True),
        dataclasses.replace(BODY_USER_ID, doc="The caller; with auth on, the token's sub."),
        Field("client_message_id", "uuid",
              doc="A new UUID per message: a repeat attaches to the run it started (idempotent send)."),
        Field("parent_message_id", "uuid", doc="The answer (an assistant message of this conversation) this message "
              "follows; default: the conversation's active leaf. The new branch becomes the active one."),
        Field("edit_message_id", "uuid", doc="Edit: a user message of this conversation that this message replaces "
              "on a new branch beside it (same parent); the old branch stays."),
        Field("regenerate_message_id", "uuid", doc="Regenerate: an assistant message of this conversation; a new "
              "answer to the same user message is added beside it (the user message is not stored again). At most "
              "one of parent_message_id, edit_message_id and regenerate_message_id."),
        # Ignored, so neither its length nor its items are checked (the earlier frontend sends every message, and null).
        Field("history", "list", doc="Accepted for the earlier frontend and ignored: the prompt is built from stored "
              "history. Any items, any length (MAX_REQUEST_BYTES bounds the body)."),
    ),
)
RUN_EVENTS = Inputs(
    parameters=(
        RUN_ID,
        USER_ID,
        _integer("after", "Replay events after this sequence number (Last-Event-ID wins)", "After", 0, 0, MAX_EVENT_ID),
        LAST_EVENT_ID,
    ),
)
STOP_RUN = Inputs(
    parameters=(RUN_ID,),
    body_name="StopRequest",
    body=(
        BODY_USER_ID,
        Field("seen_chars", "int", doc="Keep the answer's first N characters (Unicode code points, "
              "Array.from(text).length in JavaScript); omit to keep all that was generated.", high=MAX_ANSWER_CHARS),
    ),
)
LIST_CONVERSATIONS = Inputs(
    parameters=(
        USER_ID,
        _integer("limit", "Conversations per page", "Limit", 50, 1, 100),
        _integer("offset", "Conversations to skip", "Offset", 0, 0),
        _cursor("before", "Conversations older than this cursor (before_cursor of a page).", "Before",
                cursors.conversation_key),
        _cursor("after", "Conversations newer than this cursor (after_cursor of a page).", "AfterCursor",
                cursors.conversation_key),
        Field("q", "text", "query", "Search: conversations whose title or one of whose messages holds a word starting "
              "with each word of q (case-insensitive). At most {max_chars} characters; blank means absent.",
              max_chars=MAX_QUERY_CHARS, blank=True, strip=True, component="Search"),
    ),
)
CREATE_CONVERSATION = Inputs(
    body_name="CreateConversationRequest",
    body=(
        BODY_USER_ID,
        Field("title", "text", doc="Trimmed; blank is stored as null.", max_chars=MAX_TITLE_CHARS, blank=True,
              strip=True),
    ),
)
GET_CONVERSATION = Inputs(
    parameters=(
        CONVERSATION_ID,
        USER_ID,
        _integer("message_limit", "Messages per page", "MessageLimit", 100, 1, 500),
        _integer("message_offset", "Messages to skip", "MessageOffset", 0, 0),
        Field("message_order", "choice", "query", "asc: oldest first (the default); desc: newest first. Empty means "
              "asc.", default="asc", choices=("asc", "desc"), component="MessageOrder"),
        _cursor("message_before", "Messages older than this cursor (message_before_cursor).", "MessageBefore",
                cursors.message_key),
        _cursor("message_after", "Messages newer than this cursor (message_after_cursor).", "MessageAfter",
                cursors.message_key),
        Field("leaf", "uuid", "query", "Read another branch: the one through this message of the conversation, to "
              "its newest leaf (the active leaf is not moved). Default: the active branch.", component="Leaf"),
    ),
)
SET_ACTIVE_LEAF = Inputs(
    parameters=(CONVERSATION_ID,),
    body_name="SetActiveLeafRequest",
    body=(
        BODY_USER_ID,
        Field("message_id", "uuid", doc="A message of the conversation: the branch through it, to its newest leaf, "
              "becomes the active one.", required=True),
    ),
)
RENAME_CONVERSATION = Inputs(
    parameters=(CONVERSATION_ID,),
    body_name="RenameConversationRequest",
    body=(
        BODY_USER_ID,
        Field("title", "text", doc="1..{max_chars} characters, not only whitespace; trimmed.", required=True,
              max_chars=MAX_TITLE_CHARS, strip=True),
    ),
)
DELETE_CONVERSATION = Inputs(parameters=(CONVERSATION_ID, USER_ID))
GET_ACTION = Inputs(parameters=(ACTION_ID, USER_ID))
CONFIRM_ACTION = Inputs(parameters=(ACTION_ID,), body_name="ConfirmActionRequest", body=(BODY_USER_ID,))
GET_USAGE = Inputs(parameters=(
    USER_ID,
    Field("period", "choice", "query", "day: this UTC day (the default); month: this UTC month. Empty means day.",
          default="day", choices=("day", "month"), component="UsagePeriod"),
))
LOAD_SAMPLE_DATA = Inputs(body_name="SampleDataRequest", body=(
    dataclasses.replace(BODY_USER_ID, doc="The user to load them for; with auth on, the token's sub."),
))


def chat_turn(chat: Given) -> NewRun:
    """The turn a chat body asks for: its message (none for a regenerate) and where in the tree it goes. Every field
    is checked before the rules between them."""
    message, _ = chat["message"], chat["history"]  # history: checked, and ignored (the prompt comes from the store)
    conversation_id, _, client_message_id = chat["conversation_id"], chat["user_id"], chat["client_message_id"]
    branch = (chat["parent_message_id"], chat["edit_message_id"], chat["regenerate_message_id"])
    regenerate = branch[2]
    if message is None and regenerate is None:
        raise invalid("message", "is required")
    if sum(point is not None for point in branch) > 1:
        raise ValidationFailed("At most one of parent_message_id, edit_message_id and regenerate_message_id.")
    text = message if regenerate is None else ""
    return NewRun(conversation_id, text, title_from_message(text), client_message_id, *branch)


# Every route that takes input: /openapi.json's components are their parameters and bodies, in this order.
ROUTES = (CHAT_STREAM, RUN_EVENTS, STOP_RUN, LIST_CONVERSATIONS, CREATE_CONVERSATION, GET_CONVERSATION,
          RENAME_CONVERSATION, SET_ACTIVE_LEAF, DELETE_CONVERSATION, GET_ACTION, CONFIRM_ACTION, GET_USAGE,
          LOAD_SAMPLE_DATA)
