"""The assistant: turns a conversation into a stream of agent events.

For now one agent, the supervisor, answers every message. ``AgentEvent`` values carry the ``agent_type`` of
the agent that produced them, so the chat stream labels text with whoever wrote it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from errors import UpstreamError
from services.model import ChatModel, ModelRequest, Stop, TextDelta, Usage
from services.store import Caller

SUPERVISOR = "supervisor"

SUPERVISOR_PROMPT = (
    "You are Canvalo's assistant for painting contractors. Answer briefly and plainly. "
    "Never invent business data you have not been given."
)


@dataclass(frozen=True, slots=True)
class AgentText:
    agent_type: str
    text: str


@dataclass(frozen=True, slots=True)
class AgentToolCall:
    """A tool started or finished; ``payload`` becomes the ``tool_call`` field of the SSE chunk."""

    agent_type: str
    tool_name: str
    payload: dict[str, Any]


@dataclass(slots=True)
class AgentDone:
    agent_type: str
    stop_reason: str
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


AgentEvent = AgentText | AgentToolCall | AgentDone


class Assistant:
    def __init__(self, model: ChatModel) -> None:
        self._model = model

    async def respond(self, caller: Caller, turns: list[dict[str, Any]]) -> AsyncIterator[AgentEvent]:
        done = AgentDone(agent_type=SUPERVISOR, stop_reason="")
        request = ModelRequest(system=SUPERVISOR_PROMPT, messages=turns)
        async for event in self._model.stream(request):
            if isinstance(event, TextDelta):
                yield AgentText(SUPERVISOR, event.text)
            elif isinstance(event, Usage):
                done.usage["input_tokens"] += event.input_tokens
                done.usage["output_tokens"] += event.output_tokens
            elif isinstance(event, Stop):
                done.stop_reason = event.reason
        if not done.stop_reason:
            raise UpstreamError("The model stream ended without a stop event.", code="MODEL_STREAM_INCOMPLETE")
        yield done
