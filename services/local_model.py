"""The built-in local responder: a deterministic stand-in for a language model. It is NOT an LLM.

It lets the whole service run, and be tested, with no cloud account: it answers through the same ``ChatModel``
interface, the same agent loop and the same stream as Bedrock does. It reads the last user turn and writes a
fixed, rule-based reply word by word, pausing ``token_delay`` seconds between words so streaming is visible.
When it is offered tools it behaves like a model doing tool use: it calls the first one, then writes its answer
from the tool's real result.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio

from services.model import ModelEvent, ModelRequest, Stop, TextDelta, ToolUse, Usage, estimate_tokens

DISCLAIMER = "(Canvalo's built-in local responder, not an AI model.)"


class LocalModel:
    provider = "local"
    model_id = "canvalo-local-responder"
    is_llm = False

    def __init__(self, token_delay: float = 0.0) -> None:
        self._token_delay = token_delay

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        last = request.messages[-1] if request.messages else {"content": []}
        tool_result = _tool_result(last)
        if request.tools and tool_result is None:
            spec = request.tools[0]["toolSpec"]
            yield ToolUse(tool_use_id=f"local-{len(request.messages)}", name=spec["name"], input={})
            yield Stop("tool_use")
            yield Usage(_prompt_tokens(request), 10)
            return
        reply = describe_result(tool_result) if tool_result is not None else reply_to(_text_of(last))
        words = re.findall(r"\S+\s*", reply)
        for index, word in enumerate(words):
            if index and self._token_delay:
                await anyio.sleep(self._token_delay)
            yield TextDelta(word)
        yield Stop("end_turn")
        yield Usage(_prompt_tokens(request), estimate_tokens(reply))


def reply_to(text: str) -> str:
    """The rule-based answer to a plain message."""
    lowered = text.lower()
    if re.search(r"\b(hi|hello|hey|good (morning|afternoon|evening))\b", lowered):
        opening = "Hello! I can help with your invoices, appointments, projects, proposals, contacts, reviews, campaigns, tasks and goals."
    elif "help" in lowered:
        opening = "I can look up and update your business records: invoices, appointments, projects, proposals, contacts, reviews, campaigns, tasks and goals."
    else:
        opening = f"I received your message ({len(text.split())} words)."
    return f"{opening} {DISCLAIMER}"


def describe_result(result: dict[str, Any]) -> str:
    """Write an answer from a tool result, the way a model would summarise rows it was given."""
    if result.get("status") == "error":
        return f"I couldn't get that information: {result.get('message', 'the lookup failed')}. {DISCLAIMER}"
    rows = result.get("rows")
    if not isinstance(rows, list):
        return f"Done. {DISCLAIMER}"
    if not rows:
        return f"You don't have any {result.get('table', 'records')} yet. {DISCLAIMER}"
    lines = [f"You have {len(rows)} {result.get('table', 'records')}:"]
    lines += [f"- {_summarise_row(row)}" for row in rows[:20]]
    return "\n".join(lines) + f"\n{DISCLAIMER}"


def _summarise_row(row: dict[str, Any]) -> str:
    skip = {"id", "user_id", "created_at", "updated_at", "line_items", "metadata"}
    parts = [f"{key}: {value}" for key, value in row.items() if key not in skip and value not in (None, "", [])]
    return ", ".join(parts[:6])


def _text_of(message: dict[str, Any]) -> str:
    return " ".join(block["text"] for block in message.get("content", []) if "text" in block)


def _tool_result(message: dict[str, Any]) -> dict[str, Any] | None:
    for block in message.get("content", []):
        if "toolResult" in block:
            result = block["toolResult"]
            payload: dict[str, Any] = {"status": result.get("status", "success")}
            for item in result.get("content", []):
                if "json" in item:
                    payload.update(item["json"])
                elif "text" in item:
                    payload["message"] = item["text"]
            return payload
    return None


def _prompt_tokens(request: ModelRequest) -> int:
    return estimate_tokens(request.system + json.dumps(request.messages))
