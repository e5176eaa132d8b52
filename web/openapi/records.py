"""The schemas of what the service answers with: its status, conversations, messages and confirmed actions."""

from __future__ import annotations

from services.store import USAGE_CONVERSATIONS
from web.fields import UUID_PATTERN
from web.openapi.shapes import (BEFORE, BOOLEAN, CHANGES, COUNT, CURSOR, STRING, TIMESTAMP, UUID, Schema, closed,
                                nullable, schema)


def schemas() -> dict[str, Schema]:
    """Uuid and Timestamp, and what the routes answer: the service's status, conversations, messages, actions."""
    conversation: dict[str, Schema] = {
        "id": UUID,
        "user_id": UUID,
        "title": nullable(STRING),
        "created_at": TIMESTAMP,
        "updated_at": TIMESTAMP,
        "last_message_at": nullable(TIMESTAMP),
        "message_count": {**COUNT, "description": "Every message, on every branch."},
        "metadata": {"type": "object"},
        "active_leaf_id": nullable({**UUID, "description": "The last message of the branch the user is on (moved "
                                    "by every send and by PUT .../active-leaf); null before the first message."}),
    }
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
        "Root": closed({"status": {"const": "ok"}, "service": STRING, "version": STRING}),
        "Health": closed(
            {
                "status": {"enum": ["healthy", "degraded", "unhealthy"]},
                "service": STRING,
                "version": STRING,
                "environment": {"enum": ["development", "production"]},
                "store": closed({
                    "kind": {"enum": ["sqlite", "supabase"]},
                    "reachable": BOOLEAN,
                    "readable": BOOLEAN,
                    "writable": {
                        "type": ["boolean", "null"],
                        "description": "null where the store cannot check (Supabase acts only as signed-in users).",
                    },
                }),
                "model": closed({
                    "provider": {**STRING, "examples": ["local", "bedrock"]},
                    "model_id": nullable(STRING),
                    "configured": BOOLEAN,
                    "is_llm": BOOLEAN,
                    "note": STRING,
                }),
                "auth": closed(
                    {"mode": {"enum": ["none", "jwt", "jwks", "supabase-auth", "jwt+jwks", "jwt+supabase-auth"]}}
                ),
                "runs": closed({
                    "generating": COUNT,
                    "unsaved": {**COUNT, "description": "Answers that ended on this worker but wait for the store to "
                                "save them (kept in memory, retried every 250 ms)."},
                }),
                "supabase_configured": BOOLEAN,
                "bedrock_model": nullable(STRING),
            },
            description="What is running and whether it works. Nothing secret.",
        ),
        "Conversation": closed(conversation),
        "ConversationWithMessages": closed({
            **conversation,
            "messages": {
                "type": "array",
                "items": schema("Message"),
                "description": "Oldest first (newest first with message_order=desc).",
            },
            "message_has_more": {**BOOLEAN, "description": "More messages past this page, read on."},
            "message_before_cursor": _cursor("The page's oldest message: ?message_before= reads older ones."),
            "message_after_cursor": _cursor("The page's newest message: ?message_after= reads newer ones."),
            "leaf_id": nullable({**UUID, "description": "The last message of the branch shown (the active leaf, or the "
                                 "newest leaf below ?leaf)."}),
        }),
        "ConversationList": closed({
            "conversations": {
                "type": "array",
                "items": schema("Conversation"),
                "description": "Most recent activity first.",
            },
            "total": COUNT,
            "limit": {"type": "integer", "minimum": 1},
            "offset": COUNT,
            "has_more": {**BOOLEAN, "description": "More conversations past this page, read on."},
            "before_cursor": _cursor("The page's last (oldest) conversation: ?before= reads on past it."),
            "after_cursor": _cursor("The page's first (newest) conversation: ?after= reads back past it."),
        }),
        "Message": closed({
            "id": UUID,
            "role": {"enum": ["user", "assistant"]},
            "content": STRING,
            "agent_type": nullable(STRING),
            "timestamp": TIMESTAMP,
            "metadata": schema("MessageMetadata"),
            "parent_id": nullable({**UUID, "description": "The message it follows; null for a first message."}),
            "sibling_ids": {
                "type": "array", "items": UUID, "minItems": 1,
                "description": "Its parent's children, itself included, oldest first (\"< 2/3 >\"); in a "
                "conversation's messages only.",
            },
        }, required=["id", "role", "content", "agent_type", "timestamp", "metadata", "parent_id"]),
        "MessageMetadata": {
            "type": "object",
            "description": "Open: an assistant message records how its answer went; a user message's is usually {}.",
            "properties": {
                "status": {
                    "enum": ["streaming", "complete", "error", "interrupted", "stopped"],
                    "description": "streaming: a run is still writing it (see run_id and seq).",
                },
                "run_id": UUID,
                "seq": {**COUNT, "description": "While streaming: the last event the content includes; resume with "
                        "?after=seq."},
                "error_code": STRING,
                "stop_reason": nullable(STRING),
                "usage": nullable(schema("Usage")),
                "duration_ms": COUNT,
                "tool_calls": {"type": "array", "items": {"type": "object"}},
                "model_id": {**STRING, "description": "The model that answered (its latest call): BEDROCK_MODEL_ID, or "
                             "a fallback when that one was throttled or failing. Absent when no model answered."},
                "model_ids": {"type": "array", "items": STRING, "description": "Only when the turn's calls were "
                              "answered by more than one model: each, in order."},
            },
        },
        "Deleted": closed({"status": {"const": "deleted"}, "conversation_id": UUID}),
        "SampleDataLoaded": closed({
            "status": {"const": "loaded"},
            "user_id": UUID,
            "written": {**COUNT, "description": "Sample records the user did not have yet."},
            "existing": {**COUNT, "description": "Sample records already there, kept as is."},
        }),
        "ActionConfirmed": closed({
            "status": {"const": "done"},
            "action_id": UUID,
            "action": {"enum": ["update", "delete"]},
            "table": STRING,
            "result": {
                "oneOf": [
                    closed({"updated": nullable({"type": "object"})}),
                    closed({"deleted": STRING}),
                ],
                "description": "As the tools' own results: {updated: record} or {deleted: record id}.",
            },
            "before": {**BEFORE, "description": BEFORE["description"] + " Put back, they undo the change."},
            "changes": CHANGES,
        }),
        "PendingAction": closed({
            "status": {"enum": ["pending", "done", "expired"], "description": "pending: Confirm can run it; "
                       "done: it ran (used_at); expired: it can no longer run. Confirming decides."},
            "action_id": UUID,
            "action": {"enum": ["update", "delete"]},
            "table": STRING,
            "record_id": STRING,
            "summary": {**STRING, "description": "As the tool_call chunk showed it, for the Confirm button."},
            "before": {**nullable(BEFORE), "description": BEFORE["description"] + " null: kept by an earlier version, "
                       "expired."},
            "changes": CHANGES,
            "expires_at": TIMESTAMP,
            "used_at": nullable(TIMESTAMP),
        }),
        "Usage": closed({"input_tokens": COUNT,
                         "output_tokens": COUNT,
                         "cache_read_tokens": {"type": "integer", "minimum": 1,
                                               "description": "Input tokens read from the prompt cache, when any."},
                         "cache_write_tokens": {"type": "integer", "minimum": 1,
                                                "description": "Input tokens written to the prompt cache, when any."},
                         "cost": nullable({"type": "number", "minimum": 0, "description": "USD, at MODEL_PRICES; "
                                           "null when a call's model has no price (its tokens still count)."}),
                         "estimated": {"const": True, "description": "Some call was cut short (a stop, a timeout, a "
                                       "failure) before the model counted it: its tokens are estimated, about four "
                                       "characters each."}},
                        required=["input_tokens", "output_tokens"],
                        description="Every model call of the turn, a stopped or failed one's too."),
        **usage_schemas(),
    }


def _cursor(description: str) -> Schema:
    """Where a page ends, to read on from (null on an empty page)."""
    return nullable({**CURSOR, "description": description})


def usage_schemas() -> dict[str, Schema]:
    """GET /api/usage: the caller's usage in a UTC period, against their budgets."""
    usd = {"type": "number", "minimum": 0}
    tokens = {"tokens": COUNT, "cost": usd}
    unpriced = nullable({**usd, "description": "USD; null when the model has no price (MODEL_PRICES)."})
    return {
        "UsageReport": closed({
            "period": {"enum": ["day", "month"]},
            "since": {**TIMESTAMP, "description": "The period's start (UTC midnight, or the first of the month)."},
            "resets_at": {**TIMESTAMP, "description": "The next period's start: budgets are whole again."},
            "used": closed(tokens, description="The ledger: every model call this period, estimated ones too. "
                           "Calls of unpriced models count no cost."),
            "reserved": closed(tokens, description="What the caller's turns still generating hold reserved beyond "
                               "what they have used; released when they end."),
            "limit": closed({"tokens": nullable(COUNT), "cost": nullable(usd)},
                            description="The budgets for this period (BUDGET_*); null when off."),
            "remaining": closed({"tokens": nullable(COUNT), "cost": nullable(usd)},
                                description="limit - used - reserved, at least 0; null when that budget is off."),
            "by_model": {"type": "array", "items": closed({
                "model_id": STRING, "calls": COUNT,
                "estimated_calls": {**COUNT, "description": "Calls cut short, whose figures are estimated."},
                "input_tokens": COUNT, "output_tokens": COUNT,
                "cache_read_tokens": COUNT, "cache_write_tokens": COUNT, "cost": unpriced})},
            "by_conversation": {"type": "array", "maxItems": USAGE_CONVERSATIONS,
                                "description": f"The {USAGE_CONVERSATIONS} conversations that used the most tokens, "
                                "most first. A deleted conversation's usage stays (its id no longer opens anything).",
                                "items": closed({
                                    "conversation_id": UUID, "calls": COUNT, "tokens": COUNT, "cost": unpriced})},
            "by_conversation_total": {**COUNT, "description": "How many conversations used the model this period "
                                      "(by_conversation lists the most used of them)."},
        }),
    }
