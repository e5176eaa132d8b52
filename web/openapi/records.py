"""The schemas of what the service answers with: its status, conversations, messages and confirmed actions."""

from __future__ import annotations

from web.fields import UUID_PATTERN
from web.openapi.shapes import BEFORE, CHANGES, CURSOR, TIMESTAMP, UUID, Schema, closed, nullable, schema


def schemas() -> dict[str, Schema]:
    """Uuid and Timestamp, and what the routes answer: the service's status, conversations, messages, actions."""
    conversation: dict[str, Schema] = {
        "id": UUID,
        "user_id": UUID,
        "title": nullable({"type": "string"}),
        "created_at": TIMESTAMP,
        "updated_at": TIMESTAMP,
        "last_message_at": nullable(TIMESTAMP),
        "message_count": {"type": "integer", "minimum": 0, "description": "Every message, on every branch."},
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
        "Root": closed({"status": {"const": "ok"}, "service": {"type": "string"}, "version": {"type": "string"}}),
        "Health": closed(
            {
                "status": {"enum": ["healthy", "degraded", "unhealthy"]},
                "service": {"type": "string"},
                "version": {"type": "string"},
                "environment": {"enum": ["development", "production"]},
                "store": closed({
                    "kind": {"enum": ["sqlite", "supabase"]},
                    "reachable": {"type": "boolean"},
                    "readable": {"type": "boolean"},
                    "writable": {
                        "type": ["boolean", "null"],
                        "description": "null where the store cannot check (Supabase acts only as signed-in users).",
                    },
                }),
                "model": closed({
                    "provider": {"type": "string", "examples": ["local", "bedrock"]},
                    "model_id": nullable({"type": "string"}),
                    "configured": {"type": "boolean"},
                    "is_llm": {"type": "boolean"},
                    "note": {"type": "string"},
                }),
                "auth": closed(
                    {"mode": {"enum": ["none", "jwt", "jwks", "supabase-auth", "jwt+jwks", "jwt+supabase-auth"]}}
                ),
                "runs": closed({
                    "generating": {"type": "integer", "minimum": 0},
                    "unsaved": {
                        "type": "integer", "minimum": 0,
                        "description": "Answers that ended on this worker but wait for the store to save them "
                        "(kept in memory, retried every 250 ms).",
                    },
                }),
                "supabase_configured": {"type": "boolean"},
                "bedrock_model": nullable({"type": "string"}),
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
            "message_has_more": {"type": "boolean", "description": "More messages past this page, read on."},
            "message_before_cursor": nullable(
                {**CURSOR, "description": "The page's oldest message: ?message_before= reads older ones."}
            ),
            "message_after_cursor": nullable(
                {**CURSOR, "description": "The page's newest message: ?message_after= reads newer ones."}
            ),
            "leaf_id": nullable({**UUID, "description": "The last message of the branch shown (the active leaf, or the "
                                 "newest leaf below ?leaf)."}),
        }),
        "ConversationList": closed({
            "conversations": {
                "type": "array",
                "items": schema("Conversation"),
                "description": "Most recent activity first.",
            },
            "total": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer", "minimum": 1},
            "offset": {"type": "integer", "minimum": 0},
            "has_more": {"type": "boolean", "description": "More conversations past this page, read on."},
            "before_cursor": nullable(
                {**CURSOR, "description": "The page's last (oldest) conversation: ?before= reads on past it."}
            ),
            "after_cursor": nullable(
                {**CURSOR, "description": "The page's first (newest) conversation: ?after= reads back past it."}
            ),
        }),
        "Message": closed({
            "id": UUID,
            "role": {"enum": ["user", "assistant"]},
            "content": {"type": "string"},
            "agent_type": nullable({"type": "string"}),
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
                "seq": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "While streaming: the last event the content includes; resume with ?after=seq.",
                },
                "error_code": {"type": "string"},
                "stop_reason": nullable({"type": "string"}),
                "usage": nullable(schema("Usage")),
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
        "Deleted": closed({"status": {"const": "deleted"}, "conversation_id": UUID}),
        "SampleDataLoaded": closed({
            "status": {"const": "loaded"},
            "user_id": UUID,
            "written": {"type": "integer", "minimum": 0, "description": "Sample records the user did not have yet."},
            "existing": {"type": "integer", "minimum": 0, "description": "Sample records already there, kept as is."},
        }),
        "ActionConfirmed": closed({
            "status": {"const": "done"},
            "action_id": UUID,
            "action": {"enum": ["update", "delete"]},
            "table": {"type": "string"},
            "result": {
                "oneOf": [
                    closed({"updated": nullable({"type": "object"})}),
                    closed({"deleted": {"type": "string"}}),
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
            "table": {"type": "string"},
            "record_id": {"type": "string"},
            "summary": {"type": "string", "description": "As the tool_call chunk showed it, for the Confirm button."},
            "before": {**nullable(BEFORE), "description": BEFORE["description"] + " null: kept by an earlier version, "
                       "expired."},
            "changes": CHANGES,
            "expires_at": TIMESTAMP,
            "used_at": nullable(TIMESTAMP),
        }),
        "Usage": closed({"input_tokens": {"type": "integer", "minimum": 0},
                         "output_tokens": {"type": "integer", "minimum": 0},
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


def usage_schemas() -> dict[str, Schema]:
    """GET /api/usage: the caller's usage in a UTC period, against their budgets."""
    count = {"type": "integer", "minimum": 0}
    usd = {"type": "number", "minimum": 0}
    tokens = {"tokens": count, "cost": usd}
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
            "limit": closed({"tokens": nullable(count), "cost": nullable(usd)},
                            description="The budgets for this period (BUDGET_*); null when off."),
            "remaining": closed({"tokens": nullable(count), "cost": nullable(usd)},
                                description="limit - used - reserved, at least 0; null when that budget is off."),
            "by_model": {"type": "array", "items": closed({
                "model_id": {"type": "string"}, "calls": count,
                "estimated_calls": {**count, "description": "Calls cut short, whose figures are estimated."},
                "input_tokens": count, "output_tokens": count,
                "cache_read_tokens": count, "cache_write_tokens": count, "cost": unpriced})},
            "by_conversation": {"type": "array", "description": "Most tokens first. A deleted conversation's usage "
                                "stays (its id no longer opens anything).", "items": closed({
                                    "conversation_id": UUID, "calls": count, "tokens": count, "cost": unpriced})},
        }),
    }
