"""The built-in local responder: a deterministic stand-in for a language model. It is NOT an LLM.

It lets the whole service run, and be tested, with no cloud account: it answers through the same ``ChatModel``
interface, the same agent loop and the same stream as Bedrock does, following fixed rules:

- offered the supervisor's hand-off tool, it routes by keywords: one matching domain is handed over, several get a
  clarifying question, none get a greeting/help answer;
- offered a specialist's tools, it calls the first (the list tool), passing any vocabulary word from the message
  (``overdue``, ``paid``, ...) as a filter;
- given a tool result, it writes its answer from the rows it received (or, for a change waiting for the user's
  confirmation, says so: it never deletes or changes anything itself).

Replies go out word by word, ``token_delay`` seconds apart, so streaming is visible.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio

from services.model import ModelEvent, ModelRequest, Stop, TextDelta, ToolUse, Usage, estimate_tokens

DISCLAIMER = "(Canvalo's built-in local responder, not an AI model.)"
HANDOFF_TOOL = "transfer_to_specialist"


class LocalModel:
    provider = "local"
    model_id = "canvalo-local-responder"
    is_llm = False

    def __init__(self, token_delay: float = 0.0, keywords: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self._token_delay = token_delay
        self._keywords = dict(keywords or {})

    configured = True

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        last = request.messages[-1] if request.messages else {"content": []}
        result = _tool_result(last)
        tool_names = [t["toolSpec"]["name"] for t in request.tools]
        if result is not None:
            reply = describe_result(result)
        elif HANDOFF_TOOL in tool_names:
            agents = self.route(_text_of(last))
            if len(agents) == 1:
                async for event in _call(HANDOFF_TOOL, {"agent": agents[0]}, request):
                    yield event
                return
            reply = clarify(agents) if agents else reply_to(_text_of(last))
        elif request.tools:
            spec = request.tools[0]["toolSpec"]
            async for event in _call(spec["name"], _filters(spec, _text_of(last)), request):
                yield event
            return
        else:
            reply = reply_to(_text_of(last))
        async for event in self._say(reply, request):
            yield event

    def route(self, text: str) -> list[str]:
        """The agents whose keywords appear in ``text``, in declaration order."""
        words = set(re.findall(r"[a-z][a-z_-]*", text.lower()))
        return [agent for agent, keywords in self._keywords.items() if words & set(keywords)]

    async def _say(self, reply: str, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        for index, word in enumerate(re.findall(r"\S+\s*", reply)):
            if index and self._token_delay:
                await anyio.sleep(self._token_delay)
            yield TextDelta(word)
        yield Stop("end_turn")
        yield Usage(_prompt_tokens(request), estimate_tokens(reply))


async def _call(name: str, arguments: dict[str, Any], request: ModelRequest) -> AsyncIterator[ModelEvent]:
    yield ToolUse(tool_use_id=f"local-{len(request.messages)}", name=name, input=arguments)
    yield Stop("tool_use")
    yield Usage(_prompt_tokens(request), estimate_tokens(json.dumps(arguments)))


def reply_to(text: str) -> str:
    """The rule-based answer to a message no specialist owns."""
    lowered = text.lower()
    areas = "invoices, appointments, projects, proposals, contacts, reviews, campaigns, tasks and goals"
    if re.search(r"\b(hi|hello|hey|good (morning|afternoon|evening))\b", lowered):
        opening = f"Hello! I can help with your {areas}."
    elif "help" in lowered:
        opening = f"I can look up and update your business records: {areas}."
    else:
        opening = f"I can only help with your {areas}. Try asking, for example, \"What invoices do I have?\""
    return f"{opening} {DISCLAIMER}"


def clarify(agents: list[str]) -> str:
    """The question asked when several domains match; ``agents`` has at least two."""
    options = ", ".join(agents[:-1]) + f" or {agents[-1]}"
    return f"Do you mean your {options}? {DISCLAIMER}"


def describe_result(result: dict[str, Any]) -> str:
    """Write an answer from a tool result, the way a model would summarise the rows it was given."""
    if result.get("status") == "error":
        return f"I couldn't get that information: {result.get('error', 'the lookup failed')} {DISCLAIMER}"
    if result.get("status") == "confirmation_required":
        return f"This needs your confirmation: {result.get('summary', '')} Press Confirm to go ahead. {DISCLAIMER}"
    rows = result.get("rows")
    table = str(result.get("table", "records"))
    if not isinstance(rows, list):
        return f"Done. {DISCLAIMER}"
    if not rows:
        return f"You don't have any {table} that match. {DISCLAIMER}"
    lines = [f"You have {len(rows)} {table if len(rows) != 1 else table.rstrip('s')}:"]
    lines += [f"- {_summarise_row(row)}" for row in rows]
    return "\n".join(lines) + f"\n{DISCLAIMER}"


def _summarise_row(row: dict[str, Any]) -> str:
    skip = {"id", "user_id", "created_at", "updated_at", "line_items", "notes", "terms", "description"}
    parts = [f"{key.replace('_', ' ')}: {value}" for key, value in row.items() if key not in skip and value not in (None, "", [], 0)]
    return ", ".join(parts[:6])


def _filters(spec: dict[str, Any], text: str) -> dict[str, Any]:
    """Vocabulary words in the message become filters: "my overdue invoices" lists status=overdue."""
    lowered = text.lower()
    filters = {}
    for name, prop in spec["inputSchema"]["json"].get("properties", {}).items():
        matches = [v for v in prop.get("enum", []) if re.search(rf"\b{re.escape(v.replace('_', ' '))}\b", lowered)]
        if len(matches) == 1:
            filters[name] = matches[0]
    return filters


def _text_of(message: dict[str, Any]) -> str:
    return " ".join(block["text"] for block in message.get("content", []) if "text" in block)


def _tool_result(message: dict[str, Any]) -> dict[str, Any] | None:
    for block in message.get("content", []):
        if "toolResult" in block:
            result = block["toolResult"]
            payload: dict[str, Any] = {"status": result.get("status", "success")}
            for item in result.get("content", []):
                payload.update(item.get("json", {}))
            return payload
    return None


def _prompt_tokens(request: ModelRequest) -> int:
    return estimate_tokens(request.system + json.dumps(request.messages, default=str))
