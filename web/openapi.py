"""The OpenAPI 3.1 description of the HTTP API, as plain data: ``GET /openapi.json`` serves it, ``/docs`` renders it.

Frontend developers generate clients from it, so it says what the code does, not what it should do: the bounds come
from ``web/inputs.py`` (its constants, or the literals ``app.py`` passes to it), and every error response is the
``errors.AppError.body`` envelope. ``tests/test_openapi.py`` keeps it true: every route and every query parameter,
header and body field the route functions read must be declared here, real responses (errors and SSE chunks
included) must validate against these schemas, and a schemathesis run against a live server must find no 5xx and
no undocumented status or body.

Deliberate choices:

- Response objects are closed (``additionalProperties: false``), so a new response field fails the tests until it
  is documented. Request bodies stay open: the service ignores fields it does not know.
- OpenAPI 3.1 has no keyword for the items of an event stream (3.2 adds ``itemSchema``); by the convention that
  3.2 formalises, and that tools such as schemathesis read, the ``text/event-stream`` schema describes one event
  (``StreamEvent``: ``id``, ``event``, ``data``), whose ``data`` is JSON (``contentMediaType``) matching
  ``contentSchema`` ``StreamChunk`` (a ``oneOf`` on ``type``).
- 405 (wrong method) and 500 cannot belong to one operation's list honestly (405 answers a method the path does
  not have); they are components, named in ``info.description``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from web.cursors import MAX_CURSOR_CHARS
from web.inputs import (
    DEFAULT_MAX_INT,
    MAX_ANSWER_CHARS,
    MAX_EVENT_ID,
    MAX_MESSAGE_CHARS,
    MAX_QUERY_CHARS,
    MAX_TITLE_CHARS,
)

Schema = dict[str, Any]

UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

# The integer query parameters' (default, minimum, maximum), as app.py and web/inputs.py pass them to
# inputs.query_int; tests/test_openapi.py probes every declared bound over HTTP on both sides of its edge.
QUERY_INTEGERS: dict[str, tuple[int, int, int]] = {
    "limit": (50, 1, 100),
    "offset": (0, 0, DEFAULT_MAX_INT),
    "message_limit": (100, 1, 500),
    "message_offset": (0, 0, DEFAULT_MAX_INT),
    "after": (0, 0, MAX_EVENT_ID),
}


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> Schema:
    return _ref("schemas", name)


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _closed(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    """A response object: every key listed, nothing else."""
    return {
        "type": "object",
        "required": list(properties) if required is None else required,
        "properties": properties,
        "additionalProperties": False,
        **extra,
    }


UUID: Schema = {"$ref": "#/components/schemas/Uuid"}
# A pending action's change, exact (services/agents/actions.py): what it replaces, and the new values of an update.
BEFORE: Schema = {"type": "object", "description": "The record's values the change replaces, as the user was shown "
                  "them: the columns an update sets, or every column of a delete."}
CHANGES: Schema = {**_nullable({"type": "object"}), "description": "The new values of an update; null for a delete."}
TIMESTAMP: Schema = {"$ref": "#/components/schemas/Timestamp"}
NULL: Schema = {"type": "null"}
CURSOR: Schema = {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"}


# -- schemas ------------------------------------------------------------------------------------------------------


def _conversation_properties() -> dict[str, Schema]:
    return {
        "id": UUID,
        "user_id": UUID,
        "title": _nullable({"type": "string"}),
        "created_at": TIMESTAMP,
        "updated_at": TIMESTAMP,
        "last_message_at": _nullable(TIMESTAMP),
        "message_count": {"type": "integer", "minimum": 0},
        "metadata": {"type": "object"},
    }


def _chunk(kind: str, description: str, properties: dict[str, Schema], optional: tuple[str, ...] = ()) -> Schema:
    """One SSE chunk type: the earlier service's six keys (null where unused), ``run_id``, and its own keys."""
    base: dict[str, Schema] = {
        "type": {"const": kind},
        "content": NULL,
        "tool_name": NULL,
        "tool_call": NULL,
        "error": NULL,
        "agent_type": _nullable({"type": "string"}),
        "run_id": UUID,
    }
    base.update(properties)
    required = [name for name in base if name not in optional]
    return _closed(base, required, description=description)


def _schemas() -> dict[str, Schema]:
    conversation = _conversation_properties()
    error_codes = "Stable, upper case; clients branch on it. Known codes are listed on each response."
    return {
        "Uuid": {
            "type": "string",
            "format": "uuid",
            "pattern": UUID_PATTERN,
            "description": "A UUID in its 36-character form, either case (the service answers in lower case).",
        },
        "Timestamp": {
            "type": "string",
            "format": "date-time",
            "description": "ISO 8601 in UTC, e.g. 2026-11-24T01:49:20.911133Z.",
        },
        "Root": _closed({"status": {"const": "ok"}, "service": {"type": "string"}, "version": {"type": "string"}}),
        "Health": _closed(
            {
                "status": {"enum": ["healthy", "degraded", "unhealthy"]},
                "service": {"type": "string"},
                "version": {"type": "string"},
                "environment": {"enum": ["development", "production"]},
                "store": _closed(
                    {
                        "kind": {"enum": ["sqlite", "supabase"]},
                        "reachable": {"type": "boolean"},
                        "readable": {"type": "boolean"},
                        "writable": {
                            "type": ["boolean", "null"],
                            "description": "null where the store cannot check (Supabase acts only as signed-in users).",
                        },
                    }
                ),
                "model": _closed(
                    {
                        "provider": {"type": "string", "examples": ["local", "bedrock"]},
                        "model_id": _nullable({"type": "string"}),
                        "configured": {"type": "boolean"},
                        "is_llm": {"type": "boolean"},
                        "note": {"type": "string"},
                    }
                ),
                "auth": _closed(
                    {"mode": {"enum": ["none", "jwt", "jwks", "supabase-auth", "jwt+jwks", "jwt+supabase-auth"]}}
                ),
                "runs": _closed(
                    {
                        "generating": {"type": "integer", "minimum": 0},
                        "unsaved": {
                            "type": "integer", "minimum": 0,
                            "description": "Answers that ended on this worker but wait for the store to save them "
                            "(kept in memory, retried every 250 ms).",
                        },
                    }
                ),
                "supabase_configured": {"type": "boolean"},
                "bedrock_model": _nullable({"type": "string"}),
            },
            description="What is running and whether it works. Nothing secret.",
        ),
        "Conversation": _closed(conversation),
        "ConversationWithMessages": _closed(
            {
                **conversation,
                "messages": {
                    "type": "array",
                    "items": _schema("Message"),
                    "description": "Oldest first (newest first with message_order=desc).",
                },
                "message_has_more": {"type": "boolean", "description": "More messages past this page, read on."},
                "message_before_cursor": _nullable(
                    {**CURSOR, "description": "The page's oldest message: ?message_before= reads older ones."}
                ),
                "message_after_cursor": _nullable(
                    {**CURSOR, "description": "The page's newest message: ?message_after= reads newer ones."}
                ),
            }
        ),
        "ConversationList": _closed(
            {
                "conversations": {
                    "type": "array",
                    "items": _schema("Conversation"),
                    "description": "Most recent activity first.",
                },
                "total": {"type": "integer", "minimum": 0},
                "limit": {"type": "integer", "minimum": 1},
                "offset": {"type": "integer", "minimum": 0},
                "has_more": {"type": "boolean", "description": "More conversations past this page, read on."},
                "before_cursor": _nullable(
                    {**CURSOR, "description": "The page's last (oldest) conversation: ?before= reads on past it."}
                ),
                "after_cursor": _nullable(
                    {**CURSOR, "description": "The page's first (newest) conversation: ?after= reads back past it."}
                ),
            }
        ),
        "Message": _closed(
            {
                "id": UUID,
                "role": {"enum": ["user", "assistant"]},
                "content": {"type": "string"},
                "agent_type": _nullable({"type": "string"}),
                "timestamp": TIMESTAMP,
                "metadata": _schema("MessageMetadata"),
            }
        ),
        "MessageMetadata": {
            "type": "object",
            "description": "Open: an assistant message records how its answer went; a user message's is usually {}.",
            "properties": {
                "status": {
                    "enum": ["streaming", "complete", "error", "interrupted", "stopped"],
                    "description": "streaming: a run is still writing it (see run_id and seq).",
                },
                "run_id": UUID,
                "seq": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "While streaming: the last event the content includes; resume with ?after=seq.",
                },
                "error_code": {"type": "string"},
                "stop_reason": _nullable({"type": "string"}),
                "usage": _nullable(_schema("Usage")),
                "duration_ms": {"type": "integer", "minimum": 0},
                "tool_calls": {"type": "array", "items": {"type": "object"}},
                "model_id": {
                    "type": "string",
                    "description": "The model that answered (its latest call): BEDROCK_MODEL_ID, or a fallback when "
                    "that one was throttled or failing. Absent when no model answered.",
                },
                "model_ids": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Only when the turn's calls were answered by more than one model: each, in order.",
                },
            },
        },
        "Deleted": _closed({"status": {"const": "deleted"}, "conversation_id": UUID}),
        "ActionConfirmed": _closed(
            {
                "status": {"const": "done"},
                "action_id": UUID,
                "action": {"enum": ["update", "delete"]},
                "table": {"type": "string"},
                "result": {
                    "oneOf": [
                        _closed({"updated": _nullable({"type": "object"})}),
                        _closed({"deleted": {"type": "string"}}),
                    ],
                    "description": "As the tools' own results: {updated: record} or {deleted: record id}.",
                },
                "before": {**BEFORE, "description": BEFORE["description"] + " Put back, they undo the change."},
                "changes": CHANGES,
            }
        ),
        "Usage": _closed({"input_tokens": {"type": "integer", "minimum": 0},
                          "output_tokens": {"type": "integer", "minimum": 0}}),
        # -- request bodies: open (unknown fields are ignored); null counts as missing for a required field.
        "ChatRequest": {
            "type": "object",
            "required": ["message", "conversation_id", "user_id"],
            "properties": {
                "message": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_MESSAGE_CHARS,
                    "pattern": "\\S",
                    "description": f"1..{MAX_MESSAGE_CHARS} characters (code points), not only whitespace.",
                },
                "conversation_id": {**UUID, "description": "Created on first use, owned by the caller."},
                "user_id": {**UUID, "description": "The caller; with auth on, the token's sub."},
                "client_message_id": {
                    **_nullable(UUID),
                    "description": "A new UUID per message: a repeat attaches to the run it started (idempotent send).",
                },
                "history": {
                    "type": ["array", "null"],
                    "description": "Accepted for the earlier frontend and ignored: the prompt is built from stored "
                    "history. Any items, any length (MAX_REQUEST_BYTES bounds the body).",
                },
            },
        },
        "StopRequest": {
            "type": "object",
            "required": ["user_id"],
            "properties": {
                "user_id": UUID,
                "seen_chars": {
                    "type": ["integer", "null"],
                    "minimum": 0,
                    "maximum": MAX_ANSWER_CHARS,
                    "description": "Keep the answer's first N characters (Unicode code points, "
                    "Array.from(text).length in JavaScript); omit to keep all that was generated.",
                },
            },
        },
        "CreateConversationRequest": {
            "type": "object",
            "required": ["user_id"],
            "properties": {
                "user_id": UUID,
                "title": {
                    "type": ["string", "null"],
                    "maxLength": MAX_TITLE_CHARS,
                    "description": "Trimmed; blank is stored as null.",
                },
            },
        },
        "RenameConversationRequest": {
            "type": "object",
            "required": ["user_id", "title"],
            "properties": {
                "user_id": UUID,
                "title": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_TITLE_CHARS,
                    "pattern": "\\S",
                    "description": f"1..{MAX_TITLE_CHARS} characters, not only whitespace; trimmed.",
                },
            },
        },
        "ConfirmActionRequest": {"type": "object", "required": ["user_id"], "properties": {"user_id": UUID}},
        # -- errors
        "Error": {
            "type": "object",
            "required": ["code", "message", "userMessage", "suggestedActions", "retryable"],
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$", "description": error_codes},
                "message": {"type": "string", "description": "A safe technical summary, for logs and developers."},
                "userMessage": {"type": "string", "description": "Plain language, for the user."},
                "suggestedActions": {"type": "array", "items": {"type": "string"}},
                "retryable": {"type": "boolean"},
                "retryAfter": {"type": "integer", "minimum": 1, "description": "Seconds; with 429 (and some 503)."},
                "runId": {**UUID, "description": "RUN_IN_PROGRESS: the run still generating; attach to it or stop it."},
                "limit": {"enum": ["chat", "api", "streams"], "description": "RATE_LIMIT_EXCEEDED: which limit."},
            },
            "description": "The five keys are always there; some errors add keys (retryAfter, runId, limit).",
        },
        "ErrorEnvelope": _closed({"error": _schema("Error")}, description="Every non-2xx response."),
        # -- the event stream
        "StreamEvent": {
            "type": "object",
            "description": "One Server-Sent Event as EventSource parses it: an `id: <seq>` line and one `data:` line. "
            "Comment lines (`: ping`) are not events.",
            "required": ["data"],
            "properties": {
                "id": {
                    "type": "string",
                    "pattern": "^[0-9]+$",
                    "description": "The event's sequence number in its run (1, 2, ...): Last-Event-ID on reconnect. "
                    "The shutdown notice has no id line.",
                },
                "event": {"const": "message", "description": "Never set: EventSource's default type."},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": _schema("StreamChunk"),
                },
            },
            "additionalProperties": False,
        },
        "StreamChunk": {
            "description": "The JSON of one SSE event's data line. Every stream ends with exactly one complete or "
            "error chunk; concatenate the token contents in order.",
            "oneOf": [_schema(name) for name in ("TokenChunk", "ToolCallChunk", "CompleteChunk", "ErrorChunk")],
            "discriminator": {
                "propertyName": "type",
                "mapping": {
                    "token": "#/components/schemas/TokenChunk",
                    "tool_call": "#/components/schemas/ToolCallChunk",
                    "complete": "#/components/schemas/CompleteChunk",
                    "error": "#/components/schemas/ErrorChunk",
                },
            },
        },
        "TokenChunk": _chunk(
            "token", "Text written by agent_type.", {"content": {"type": "string"}, "agent_type": {"type": "string"}}
        ),
        "ToolCallChunk": _chunk(
            "tool_call",
            "A tool started or finished, or the supervisor handed over (tool_name transfer_to_specialist).",
            {"tool_name": {"type": "string"}, "tool_call": _schema("ToolCall"), "agent_type": {"type": "string"}},
        ),
        "ToolCall": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"enum": ["started", "success", "error", "confirmation_required"]},
                "agent": {"type": "string"},
                "tool_use_id": {"type": "string"},
                "duration_ms": {"type": "integer", "minimum": 0},
                "arguments": {"type": "object", "description": "Only for list, get and delete tools."},
                "action_id": {**UUID, "description": "confirmation_required: POST /api/actions/{action_id}/confirm."},
                "action": {"enum": ["update", "delete"]},
                "record_id": {"type": "string"},
                "summary": {"type": "string", "description": "What confirming will do, every value whole, as JSON "
                            "text with invisible characters escaped, for the Confirm button."},
                "before": BEFORE,
                "changes": CHANGES,
                "expires_at": TIMESTAMP,
            },
        },
        "CompleteChunk": _chunk(
            "complete",
            "The answer finished (or was stopped) and was saved as message_id.",
            {
                "message_id": UUID,
                "conversation_id": UUID,
                "usage": _nullable(_schema("Usage")),
                "stop_reason": _nullable({"type": "string"}),
                "status": {"enum": ["complete", "stopped"]},
            },
        ),
        "ErrorChunk": _chunk(
            "error",
            "The turn failed; error is a plain-language message. The shutdown notice (code SERVER_SHUTTING_DOWN, "
            "no id: line) carries no run_id.",
            {"error": {"type": "string"}, "code": {"type": "string"}, "retryable": {"type": "boolean"}},
            optional=("run_id",),
        ),
        "OpenAPIDocument": {
            "type": "object",
            "required": ["openapi", "info", "paths"],
            "properties": {"openapi": {"type": "string", "pattern": "^3\\.1\\."}},
        },
    }


# -- parameters, headers, responses -------------------------------------------------------------------------------


def _query_integer(name: str, description: str) -> Schema:
    default, low, high = QUERY_INTEGERS[name]
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": f"{description} {low}..{high}; empty or absent means {default}.",
        "schema": {"type": "integer", "minimum": low, "maximum": high, "default": default},
    }


def _path_id(name: str, what: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": f"The {what}'s id.", "schema": UUID}


def _cursor(name: str, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": f"{description} Opaque; at most {MAX_CURSOR_CHARS} characters; empty means absent. Not with "
        "an offset, nor with the opposite cursor (422).",
        "schema": CURSOR,
    }


def _parameters() -> dict[str, Schema]:
    return {
        "UserId": {
            "name": "user_id",
            "in": "query",
            "required": True,
            "description": "The caller; with auth on it must equal the token's sub (else 403 USER_ID_MISMATCH).",
            "schema": UUID,
        },
        "ConversationId": _path_id("conversation_id", "conversation"),
        "RunId": _path_id("run_id", "run"),
        "ActionId": _path_id("action_id", "pending action"),
        "Limit": _query_integer("limit", "Conversations per page,"),
        "Offset": _query_integer("offset", "Conversations to skip,"),
        "MessageLimit": _query_integer("message_limit", "Messages per page,"),
        "MessageOffset": _query_integer("message_offset", "Messages to skip,"),
        "After": _query_integer("after", "Replay events after this sequence number (Last-Event-ID wins),"),
        "Before": _cursor("before", "Conversations older than this cursor (before_cursor of a page)."),
        "AfterCursor": _cursor("after", "Conversations newer than this cursor (after_cursor of a page)."),
        "Search": {
            "name": "q",
            "in": "query",
            "required": False,
            "description": "Search: conversations whose title or one of whose messages holds a word starting with "
            f"each word of q (case-insensitive). At most {MAX_QUERY_CHARS} characters; blank means absent.",
            "schema": {"type": "string", "maxLength": MAX_QUERY_CHARS},
        },
        "MessageBefore": _cursor("message_before", "Messages older than this cursor (message_before_cursor)."),
        "MessageAfter": _cursor("message_after", "Messages newer than this cursor (message_after_cursor)."),
        "MessageOrder": {
            "name": "message_order",
            "in": "query",
            "required": False,
            "description": "asc: oldest first (the default); desc: newest first. Empty means asc.",
            "schema": {"enum": ["asc", "desc"], "default": "asc"},
        },
        "LastEventId": {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": f"What EventSource sends on reconnect: resume after this event, 0..{MAX_EVENT_ID}. "
            "Wins over ?after; blank means absent.",
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_ID},
        },
    }


def _headers() -> dict[str, Schema]:
    def header(description: str, schema: Schema | None = None) -> Schema:
        return {"description": description, "schema": schema or {"type": "string"}}

    seconds = {"type": "integer", "minimum": 0}
    return {
        "X-Request-ID": {
            **header("The request's id (a sane X-Request-ID sent by the client or proxy is kept), as logged."),
            "required": True,
        },
        "X-Run-ID": header("The run's id, as in every chunk's run_id.", UUID),
        "Retry-After": header("Seconds to wait before trying again.", {"type": "integer", "minimum": 1}),
        "RateLimit-Limit": header("The limit that was hit, per window.", seconds),
        "RateLimit-Remaining": header("Requests left in the window (0 on a refusal).", seconds),
        "RateLimit-Reset": header("Seconds until the window ends.", seconds),
        "Allow": header("Every method the path has."),
    }


def _header_refs(*names: str, required: tuple[str, ...] = ()) -> dict[str, Schema]:
    headers: dict[str, Schema] = {"X-Request-ID": {**_ref("headers", "X-Request-ID")}}
    for name in names:
        headers[name] = _ref("headers", name)
    for name in required:
        # A $ref cannot carry siblings that change it; a required header is written out in full.
        headers[name] = {**_headers()[name], "required": True}
    return headers


def _error(description: str, codes: tuple[str, ...], *, retryable: bool | None = None, **headers: Any) -> Schema:
    """An error response: the envelope, the codes it may carry, and ``retryable`` when the status fixes it."""
    schema: Schema = _schema("ErrorEnvelope")
    if retryable is not None:
        schema = {
            "allOf": [
                schema,
                {"properties": {"error": {"properties": {"retryable": {"const": retryable}}}}},
            ]
        }
    response: Schema = {
        "description": f"{description} Codes: {', '.join(codes)}.",
        "content": {"application/json": {"schema": schema}},
        "x-error-codes": list(codes),
    }
    response.update(headers)
    return response


BODY_ERRORS = ("400", "408", "413", "415", "422", "499")
API_ERRORS = ("401", "403", "422", "429", "500", "502", "503", "504")


def _responses() -> dict[str, Schema]:
    store_codes = ("STORE_UNAVAILABLE", "STORE_BUSY", "AUTH_UNAVAILABLE", "AUTH_THROTTLED", "AUTH_BUSY",
                   "SERVICE_UNAVAILABLE")
    return {
        "400": _error("The body could not be read: not UTF-8, not JSON (NaN and Infinity are not JSON), or nested "
                      "more than 32 levels.", ("MALFORMED_JSON", "BAD_REQUEST"), retryable=False),
        "401": _error("Authentication failed (auth on: a Bearer token is required on every /api route).",
                      ("MISSING_TOKEN", "MALFORMED_TOKEN", "INVALID_TOKEN", "EXPIRED_TOKEN"), retryable=False),
        "403": _error("The token is valid but user_id names someone else, or the database refused the caller.",
                      ("USER_ID_MISMATCH", "STORE_FORBIDDEN", "STORE_PERMISSION_DENIED"), retryable=False),
        "404": _error("Not found, or someone else's: the two are indistinguishable. Also any unknown path.",
                      ("NOT_FOUND", "CONVERSATION_NOT_FOUND", "RUN_NOT_FOUND", "ACTION_NOT_FOUND", "RECORD_NOT_FOUND"),
                      retryable=False),
        "405": _error("The path exists but not with this method; Allow lists its methods.", ("METHOD_NOT_ALLOWED",),
                      retryable=False, headers=_header_refs(required=("Allow",))),
        "408": _error("The body did not arrive within BODY_READ_TIMEOUT.", ("REQUEST_TIMEOUT",), retryable=True),
        "409": _error("Conflicts with the current state. RUN_IN_PROGRESS carries runId; RECORD_CHANGED means the "
                      "record no longer holds the values the action showed as before, so nothing was changed.",
                      ("RUN_IN_PROGRESS", "IDEMPOTENCY_CONFLICT", "ACTION_ALREADY_USED", "RECORD_CHANGED"),
                      retryable=False),
        "410": _error("The pending action expired before it was confirmed; nothing was changed.",
                      ("ACTION_EXPIRED",), retryable=False),
        "413": _error("The body is larger than MAX_REQUEST_BYTES.", ("PAYLOAD_TOO_LARGE",), retryable=False),
        "415": _error("The body is not application/json.", ("UNSUPPORTED_MEDIA_TYPE",), retryable=False),
        "422": _error("A field, path id or query parameter is missing, malformed or out of range (message names it).",
                      ("VALIDATION_ERROR",), retryable=False),
        "429": {
            **_error(
                "A rate limit was hit (error.limit: chat, api or streams); retryAfter and Retry-After say when to "
                "come back.",
                ("RATE_LIMIT_EXCEEDED",),
                retryable=True,
                headers=_header_refs("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset",
                                     required=("Retry-After",)),
            ),
            "content": {
                "application/json": {
                    "schema": {
                        "allOf": [
                            _schema("ErrorEnvelope"),
                            {"properties": {"error": {"required": ["retryAfter"],
                                                      "properties": {"retryable": {"const": True}}}}},
                        ]
                    }
                }
            },
        },
        "499": _error("The client closed the connection before sending the body it announced; nobody sees this "
                      "answer, it is logged.", ("CLIENT_CLOSED_REQUEST",), retryable=True),
        "500": _error("An unexpected error; never the exception's text.", ("INTERNAL_ERROR",)),
        "502": _error("A dependency (database, Supabase Auth) answered with something unusable.",
                      ("STORE_ERROR", "STORE_BAD_RESPONSE", "STORE_SCHEMA", "STORE_MISCONFIGURED",
                       "AUTH_UPSTREAM_ERROR", "UPSTREAM_ERROR"), retryable=False),
        "503": _error("A dependency is unavailable or throttling; try again (Retry-After when known). Beyond "
                      "MAX_CONNECTIONS uvicorn itself answers a plain-text 503.", store_codes,
                      retryable=True, headers=_header_refs("Retry-After")),
        "504": _error("A dependency did not answer in time.", ("STORE_TIMEOUT", "AUTH_TIMEOUT", "TIMEOUT"),
                      retryable=True),
    }


def _for_every_error(responses: dict[str, Schema]) -> dict[str, Schema]:
    """Error responses get the X-Request-ID header too (except 500, which Starlette answers outside the middleware)."""
    for status, response in responses.items():
        if status != "500":
            response["headers"] = {**_header_refs(), **response.get("headers", {})}
    return responses


# -- operations ---------------------------------------------------------------------------------------------------


def _json_ok(description: str, schema_name: str, status: str = "200") -> dict[str, Schema]:
    return {
        status: {
            "description": description,
            "headers": _header_refs(),
            "content": {"application/json": {"schema": _schema(schema_name)}},
        }
    }


def _sse_ok(description: str) -> dict[str, Schema]:
    return {
        "200": {
            "description": f"{description} Content-Type text/event-stream; charset=utf-8. Each event "
            "(StreamEvent) is an `id: <seq>` line, one `data: <StreamChunk JSON>` line and a blank line; `: ping` "
            "comments keep idle connections open. The shutdown notice has no id line.",
            "headers": {
                **_header_refs(),
                "X-Run-ID": {**_headers()["X-Run-ID"], "required": True},
                "Cache-Control": {"description": "no-cache, no-store", "schema": {"type": "string"}},
                "X-Accel-Buffering": {"description": "no: nginx must not buffer the stream.",
                                      "schema": {"const": "no"}},
            },
            "content": {
                "text/event-stream": {
                    "schema": _schema("StreamEvent"),
                    "example": 'id: 1\ndata: {"type":"token","content":"Hello","tool_name":null,"tool_call":null,'
                    '"error":null,"agent_type":"supervisor","run_id":"0f8e7a52-3c47-4f6e-9a36-2f4c1f1d2b60"}\n\n',
                }
            },
        }
    }


def _errors(*statuses: str) -> dict[str, Schema]:
    return {status: _ref("responses", status) for status in statuses}


def _body(schema_name: str) -> Schema:
    return {"required": True, "content": {"application/json": {"schema": _schema(schema_name)}}}


def _params(*names: str) -> list[Schema]:
    return [_ref("parameters", name) for name in names]


OPTIONAL_AUTH: list[dict[str, list[str]]] = [{"bearerAuth": []}, {}]


def _api(operation: Schema, *statuses: str, body: bool = False) -> Schema:
    """An /api operation: optional bearer auth (required whenever auth is configured), and the errors every /api
    route can answer, plus the body errors for a route that reads a JSON body, plus ``statuses``."""
    errors = set(API_ERRORS) | set(statuses) | (set(BODY_ERRORS) if body else set())
    operation["security"] = OPTIONAL_AUTH
    operation["responses"].update(_errors(*sorted(errors)))
    return operation


def _paths() -> dict[str, Schema]:
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/": {
            "get": {
                "operationId": "getRoot", "tags": ["service"], "summary": "Service name and version",
                "security": [], "responses": _json_ok("The service answers.", "Root"),
            }
        },
        "/health": {
            "get": {
                "operationId": "getHealth", "tags": ["service"], "summary": "Store and model status",
                "description": "Probes the store with a read and a small write. degraded (200): the model cannot "
                "answer. unhealthy (503): the store cannot read or write.",
                "security": [],
                "responses": {
                    **_json_ok("healthy or degraded.", "Health"),
                    "503": {**_json_ok("unhealthy: the store cannot read or write.", "Health")["200"]},
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics", "tags": ["service"], "summary": "Prometheus metrics",
                "description": "Off (404) unless METRICS_TOKEN is set; then only with Authorization: Bearer "
                "<METRICS_TOKEN>. Scrape each instance on its private address.",
                "security": [{"metricsToken": []}],
                "responses": {
                    "200": {
                        "description": "Prometheus text format 0.0.4.",
                        "headers": _header_refs(),
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors("401", "404"),
                },
            }
        },
        "/playground": {
            "get": {
                "operationId": "getPlayground", "tags": ["pages"], "summary": "A small chat page",
                "description": "Development only, or with PLAYGROUND=1 (404 otherwise).",
                "security": [],
                "responses": {
                    "200": {"description": "The page.", "headers": _header_refs(), "content": html},
                    **_errors("404"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "getOpenApi", "tags": ["pages"], "summary": "This document",
                "security": [], "responses": _json_ok("OpenAPI 3.1.", "OpenAPIDocument"),
            }
        },
        "/docs": {
            "get": {
                "operationId": "getDocs", "tags": ["pages"], "summary": "This document, readable in a browser",
                "description": "Self-contained: no CDN, no external script. Served in every environment.",
                "security": [],
                "responses": {"200": {"description": "The page.", "headers": _header_refs(), "content": html}},
            }
        },
        "/api/chat/stream": {
            "post": _api(
                {
                    "operationId": "streamChat", "tags": ["chat"], "summary": "Send a message; stream the answer",
                    "description": "Starts a run and follows it from its first event. A repeated client_message_id "
                    "attaches to the run it started (replayed from event 1, not counted against limits). A client "
                    "that disconnects only stops watching: the answer is generated and saved anyway.",
                    "requestBody": _body("ChatRequest"),
                    "responses": _sse_ok("The run's events, live, to its terminal chunk; X-Run-ID names the run."),
                },
                "404", "409", body=True,
            )
        },
        "/api/chat/runs/{run_id}/events": {
            "get": _api(
                {
                    "operationId": "followRun", "tags": ["chat"], "summary": "Resume a run's stream",
                    "description": "Replays the run's events after Last-Event-ID (or ?after), then follows it live to "
                    "its terminal chunk. A finished run replays and ends.",
                    "parameters": _params("RunId", "UserId", "After", "LastEventId"),
                    "responses": _sse_ok("The run's events after the cursor."),
                },
                "404",
            )
        },
        "/api/chat/runs/{run_id}/stop": {
            "post": _api(
                {
                    "operationId": "stopRun", "tags": ["chat"], "summary": "Stop a run",
                    "description": "Stops the run wherever it generates and saves its answer cut to seen_chars "
                    "(status stopped). Idempotent: a second stop, or one after the run ended, changes nothing.",
                    "parameters": _params("RunId"),
                    "requestBody": _body("StopRequest"),
                    "responses": {
                        **_json_ok("The run has ended: the saved assistant message.", "Message"),
                        **_json_ok("The stop is asked but the run has not ended yet (its worker is slow, or died and "
                                   "the run ends stopped once its heartbeat lapses): the message as saved so far, "
                                   "metadata.status streaming.", "Message", "202"),
                    },
                },
                "404", body=True,
            )
        },
        "/api/conversations": {
            "get": _api(
                {
                    "operationId": "listConversations", "tags": ["conversations"], "summary": "List conversations",
                    "description": "Paged by offset, or by cursor (before/after, from an earlier page), not both; "
                    "q searches titles.",
                    "parameters": _params("UserId", "Limit", "Offset", "Before", "AfterCursor", "Search"),
                    "responses": _json_ok("One page, most recent activity first.", "ConversationList"),
                },
            ),
            "post": _api(
                {
                    "operationId": "createConversation", "tags": ["conversations"],
                    "summary": "Create a conversation",
                    "requestBody": _body("CreateConversationRequest"),
                    "responses": _json_ok("Created.", "Conversation", status="201"),
                },
                body=True,
            ),
        },
        "/api/conversations/{conversation_id}": {
            "get": _api(
                {
                    "operationId": "getConversation", "tags": ["conversations"],
                    "summary": "A conversation and a page of its messages",
                    "description": "A running answer shows metadata.status streaming, its run_id, the text so far "
                    "and metadata.seq: attach with GET /api/chat/runs/{run_id}/events?after=<seq>.",
                    "parameters": _params(
                        "ConversationId", "UserId", "MessageLimit", "MessageOffset", "MessageOrder", "MessageBefore",
                        "MessageAfter",
                    ),
                    "responses": _json_ok("The conversation with messages, oldest first.",
                                          "ConversationWithMessages"),
                },
                "404",
            ),
            "patch": _api(
                {
                    "operationId": "renameConversation", "tags": ["conversations"],
                    "summary": "Rename a conversation",
                    "parameters": _params("ConversationId"),
                    "requestBody": _body("RenameConversationRequest"),
                    "responses": _json_ok("Renamed.", "Conversation"),
                },
                "404", body=True,
            ),
            "delete": _api(
                {
                    "operationId": "deleteConversation", "tags": ["conversations"],
                    "summary": "Delete a conversation and its messages",
                    "description": "A run still generating in it stops.",
                    "parameters": _params("ConversationId", "UserId"),
                    "responses": _json_ok("Deleted.", "Deleted"),
                },
                "404",
            ),
        },
        "/api/actions/{action_id}/confirm": {
            "post": _api(
                {
                    "operationId": "confirmAction", "tags": ["actions"], "summary": "Confirm a prepared change",
                    "description": "Carries out a change the assistant prepared (a tool_call chunk with status "
                    "confirmation_required names its action_id), once, before expires_at, for the user it was "
                    "prepared for.",
                    "parameters": _params("ActionId"),
                    "requestBody": _body("ConfirmActionRequest"),
                    "responses": _json_ok("Done.", "ActionConfirmed"),
                },
                "404", "409", "410", body=True,
            )
        },
    }


DESCRIPTION = """\
The Canvalo assistant's chat backend: conversations, chat turns streamed over Server-Sent Events, and their runs.

**Authentication.** With auth configured (always in production) every /api route needs `Authorization: Bearer
<Supabase access token>` and the `user_id` sent must be the token's `sub`. In development without
SUPABASE_JWT_SECRET or SUPABASE_URL no token is needed and `user_id` is trusted as sent.

**Errors.** Every non-2xx response is `{"error": {code, message, userMessage, suggestedActions, retryable,
retryAfter?, ...}}` (ErrorEnvelope). Any path answers a method it does not have with 405 (Allow header) and an
unexpected failure with 500, in the same envelope. A 4xx is never retryable except 408, 429 and 499.

**Streams.** POST /api/chat/stream and GET /api/chat/runs/{run_id}/events answer text/event-stream; each event's
data is a StreamChunk: the stream's schema is StreamEvent, one event, whose data is StreamChunk JSON.
"""


@lru_cache(maxsize=4)
def document(version: str) -> dict[str, Any]:
    """The whole document. Cached: it depends only on the code (and ``version``); callers must not mutate it."""
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {"title": "Canvalo chat API", "version": version, "description": DESCRIPTION},
        "servers": [{"url": "/", "description": "The host that served this document."}],
        "tags": [
            {"name": "chat", "description": "Chat turns, their streams and runs."},
            {"name": "conversations"},
            {"name": "actions", "description": "Changes the assistant prepared, confirmed by the user."},
            {"name": "service"},
            {"name": "pages"},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "parameters": _parameters(),
            "headers": _headers(),
            "responses": _for_every_error(_responses()),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A Supabase access token. Optional only in development without auth settings.",
                },
                "metricsToken": {"type": "http", "scheme": "bearer", "description": "METRICS_TOKEN, for /metrics."},
            },
        },
    }
