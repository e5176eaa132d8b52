"""The schemas of the event stream: one Server-Sent Event (``StreamEvent``) and the chunk its data holds
(``StreamChunk``, a ``oneOf`` on ``type``)."""

from __future__ import annotations

from web.openapi.shapes import (BEFORE, BOOLEAN, CHANGES, COUNT, NULL, STRING, TIMESTAMP, UUID, Schema, closed,
                                nullable, schema)


def _chunk(kind: str, description: str, properties: dict[str, Schema], optional: tuple[str, ...] = ()) -> Schema:
    """One SSE chunk type: the earlier service's six keys (null where unused), ``run_id``, and its own keys."""
    base: dict[str, Schema] = {
        "type": {"const": kind},
        "content": NULL,
        "tool_name": NULL,
        "tool_call": NULL,
        "error": NULL,
        "agent_type": nullable(STRING),
        "run_id": UUID,
    }
    base.update(properties)
    required = [name for name in base if name not in optional]
    return closed(base, required, description=description)


# Each chunk type and its schema.
CHUNKS = {"token": "TokenChunk", "tool_call": "ToolCallChunk", "complete": "CompleteChunk", "error": "ErrorChunk"}


def schemas() -> dict[str, Schema]:
    return {
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
                "data": {**STRING, "contentMediaType": "application/json", "contentSchema": schema("StreamChunk")},
            },
            "additionalProperties": False,
        },
        "StreamChunk": {
            "description": "The JSON of one SSE event's data line. Every stream ends with exactly one complete or "
            "error chunk; concatenate the token contents in order.",
            "oneOf": [schema(name) for name in CHUNKS.values()],
            "discriminator": {"propertyName": "type",
                              "mapping": {kind: schema(name)["$ref"] for kind, name in CHUNKS.items()}},
        },
        "TokenChunk": _chunk("token", "Text written by agent_type.", {"content": STRING, "agent_type": STRING}),
        "ToolCallChunk": _chunk(
            "tool_call",
            "A tool started or finished, or the supervisor handed over (tool_name transfer_to_specialist).",
            {"tool_name": STRING, "tool_call": schema("ToolCall"), "agent_type": STRING},
        ),
        "ToolCall": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"enum": ["started", "success", "error", "confirmation_required"]},
                "agent": STRING,
                "tool_use_id": STRING,
                "duration_ms": COUNT,
                "arguments": {"type": "object", "description": "Only for list, get and delete tools."},
                "action_id": {**UUID, "description": "confirmation_required: POST /api/actions/{action_id}/confirm."},
                "action": {"enum": ["update", "delete"]},
                "record_id": STRING,
                "summary": {**STRING, "description": "What confirming will do, every value whole, as JSON "
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
                "usage": nullable(schema("Usage")),
                "stop_reason": nullable(STRING),
                "status": {"enum": ["complete", "stopped"]},
            },
        ),
        "ErrorChunk": _chunk(
            "error",
            "The turn failed; error is a plain-language message. The shutdown notice (code SERVER_SHUTTING_DOWN, "
            "no id: line) carries no run_id.",
            {"error": STRING, "code": STRING, "retryable": BOOLEAN},
            optional=("run_id",),
        ),
    }
