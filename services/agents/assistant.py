"""The assistant: a supervisor that answers or hands over, and specialists that answer with tools.

One turn costs one supervisor call plus one specialist loop, never two full loops. The supervisor sees the
conversation and a single ``transfer_to_specialist`` tool. If it writes text (a greeting, help, something out of
scope, a clarifying question), that text streams as ``supervisor``. If it hands over, the specialist runs its own
tool loop on the same conversation and its text streams straight to the client labelled with its own
``agent_type``; nobody rewrites it afterwards (the earlier design ran a second LLM loop inside a tool and then had
the supervisor regenerate its output, paying for the answer twice).

The loop is bounded: at most ``MAX_ITERATIONS`` model calls per specialist, ``TOOL_SECONDS`` of tool time per turn,
and tool results cut to what a prompt may carry (``results.py``). Tools run as the request's ``Caller`` through the
store; an update or a delete only prepares a pending action (``services/agents/actions.py``), whose ``tool_call``
chunk carries what the frontend's Confirm button needs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from errors import UpstreamError
from services.agents import actions
from services.agents.results import SPENT, ToolOutput
from services.agents.tools import Tool, ToolResult, object_schema, run_tool, tool_spec, tools_for
from services.agents.usage import TurnUsage
from services.domains import BY_AGENT, DOMAINS, Domain
from services.model import ChatModel, ModelEvent, ModelRequest, ModelUsed, Stop, TextDelta, ToolUse, Usage
from services.store import Caller, Store
from services.store.run_log import SUPERVISOR

HANDOFF_TOOL = "transfer_to_specialist"
MAX_ITERATIONS = 6  # model calls per specialist in one turn
TOOL_SECONDS = 20.0  # tool time per turn

# What the user is told when a model stops for a reason other than finishing its answer.
STOP_NOTES = {
    "max_tokens": "\n\n(The answer was cut short because it reached the length limit. Ask me to continue.)",
    "content_filtered": "\n\n(The answer was stopped by a content filter.)",
    "guardrail_intervened": "\n\n(The answer was stopped by a content filter.)",
}
UNROUTED_NOTE = "Sorry, I couldn't tell which part of your business that is about. Could you rephrase it?"
LOOP_LIMIT_NOTE = ("\n\n(I had to stop before finishing: the request needed too many steps. "
                   "Please try a narrower request.)")


def supervisor_prompt(domains: tuple[Domain, ...]) -> str:
    specialists = "\n".join(f"- {d.agent_type}: {d.description}" for d in domains)
    return (
        "You are the supervisor of Canvalo's assistant for painting contractors. Specialists:\n"
        f"{specialists}\n"
        f"When the user's request belongs to one specialist, call {HANDOFF_TOOL} with that specialist and write "
        "nothing else: the specialist answers the user directly. When the user greets you, asks what you can do, or "
        "asks about something none of the specialists covers, answer briefly yourself. When the request is "
        "ambiguous or could belong to several specialists, ask one short clarifying question instead."
    )


def handoff_spec(domains: tuple[Domain, ...]) -> dict[str, Any]:
    agent = {"type": "string", "enum": [d.agent_type for d in domains]}
    reason = {"type": "string", "description": "One short sentence on why"}
    description = "Hand the conversation to the specialist that owns the user's request."
    return tool_spec(HANDOFF_TOOL, description, object_schema({"agent": agent, "reason": reason}, ["agent"]))


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


@dataclass(frozen=True, slots=True)
class AgentModel:
    """One of the turn's model calls was answered by ``model_id`` (a fallback's, perhaps), before its output."""

    agent_type: str
    model_id: str


@dataclass(slots=True)
class AgentDone:
    agent_type: str
    stop_reason: str
    calls: TurnUsage  # every model call's usage, counted as each ends
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


AgentEvent = AgentText | AgentToolCall | AgentModel | AgentDone


class Assistant:
    def __init__(self, model: ChatModel, store: Store, action_ttl: float = actions.DEFAULT_TTL_SECONDS) -> None:
        self._model = model
        self._store = store
        self._tools = {d.agent_type: tools_for(d) for d in DOMAINS}
        self._supervisor = ModelRequest(supervisor_prompt(DOMAINS), [], [handoff_spec(DOMAINS)])
        self._action_ttl = action_ttl

    async def respond(
        self, caller: Caller, turns: list[dict[str, Any]], usage: TurnUsage
    ) -> AsyncIterator[AgentEvent]:
        """The turn's events, ending with ``AgentDone``. ``usage`` counts its model calls as they end, so a caller
        that stops listening early still has the usage of what ran."""
        done = AgentDone(agent_type=SUPERVISOR, stop_reason="", calls=usage)
        handoff: Domain | None = None
        request = ModelRequest(self._supervisor.system, turns, self._supervisor.tools)
        async for event in self._call(request, done):
            if isinstance(event, ToolUse):
                if event.name == HANDOFF_TOOL:
                    handoff = BY_AGENT.get(str(event.input.get("agent")))
            else:
                yield event
        if handoff is None:
            note = STOP_NOTES.get(done.stop_reason) or (UNROUTED_NOTE if done.stop_reason == "tool_use" else "")
            if note:
                yield AgentText(SUPERVISOR, note)
            yield done
            return
        yield AgentToolCall(SUPERVISOR, HANDOFF_TOOL, {"status": "success", "agent": handoff.agent_type})
        done.agent_type = handoff.agent_type
        async for agent_event in self._specialist(caller, handoff, turns, done):
            yield agent_event
        yield done

    async def _specialist(
        self, caller: Caller, domain: Domain, turns: list[dict[str, Any]], done: AgentDone
    ) -> AsyncIterator[AgentEvent]:
        tools = {tool.name: tool for tool in self._tools[domain.agent_type]}
        specs = [tool.spec() for tool in tools.values()]
        messages = list(turns)
        tools_until = time.monotonic() + TOOL_SECONDS  # the turn's tool time ends then
        output = ToolOutput()  # and what its tool results may add to its prompt
        for _ in range(MAX_ITERATIONS):
            text: list[str] = []
            calls: list[ToolUse] = []
            async for event in self._call(ModelRequest(domain.instructions, messages, specs), done):
                if isinstance(event, ToolUse):
                    calls.append(event)
                    continue
                if isinstance(event, AgentText):
                    text.append(event.text)
                yield event
            if done.stop_reason != "tool_use" or not calls:
                if done.stop_reason in STOP_NOTES:
                    yield AgentText(domain.agent_type, STOP_NOTES[done.stop_reason])
                return
            messages.append(_assistant_turn(text, calls))
            results = []
            for call in calls:
                tool = tools.get(call.name)
                async for item in self._run_tool(caller, domain, tool, call, tools_until, output, done):
                    if isinstance(item, AgentToolCall):
                        yield item
                    else:
                        results.append(item)
            messages.append({"role": "user", "content": results})
        done.stop_reason = "max_iterations"
        yield AgentText(domain.agent_type, LOOP_LIMIT_NOTE)

    async def _run_tool(
        self, caller: Caller, domain: Domain, tool: Tool | None, call: ToolUse, tools_until: float,
        output: ToolOutput, done: AgentDone,
    ) -> AsyncIterator[AgentToolCall | dict[str, Any]]:
        """One tool call: its started and finished chunks, then its result for the model, cut to what the turn's
        ``output`` may still hold."""
        started = {"status": "started", "tool_use_id": call.tool_use_id, "agent": domain.agent_type}
        if tool is not None and tool.shows_arguments:
            started["arguments"] = call.input
        yield AgentToolCall(domain.agent_type, call.name, started)
        began = time.monotonic()
        result = await self._execute(caller, tool, call, tools_until, output)
        duration_ms = round((time.monotonic() - began) * 1000)
        summary = {"name": call.name, "agent": domain.agent_type, "status": result.status, "duration_ms": duration_ms}
        if "action_id" in result.shown:  # kept with the answer, so a reloaded conversation can still offer Confirm
            summary["action_id"] = result.shown["action_id"]
        done.tool_calls.append(summary)
        finished = {**started, "status": result.status, "duration_ms": duration_ms, **result.shown}
        finished.pop("arguments", None)
        yield AgentToolCall(domain.agent_type, call.name, finished)
        # Converse knows only success and error; a pending action's own status is in the content the model reads.
        status = "error" if result.status == "error" else "success"
        content = output.fit(result.content)
        yield {"toolResult": {"toolUseId": call.tool_use_id, "content": [{"json": content}], "status": status}}

    async def _execute(
        self, caller: Caller, tool: Tool | None, call: ToolUse, tools_until: float, output: ToolOutput
    ) -> ToolResult:
        if tool is None:
            return ToolResult("error", {"error": f"There is no tool named {call.name}."})
        if output.spent:
            return ToolResult("error", {"error": SPENT})
        remaining = tools_until - time.monotonic()
        if remaining <= 0:
            return ToolResult("error", {"error": "The time allowed for tools in this turn is used up."})
        with anyio.move_on_after(remaining):
            return await run_tool(self._store, caller, tool, call.input, self._action_ttl)
        return ToolResult("error", {"error": "The tool took too long and was stopped."})

    async def _call(self, request: ModelRequest, done: AgentDone) -> AsyncIterator[AgentText | AgentModel | ToolUse]:
        """One model call of ``done.agent_type``: first the model that answered, then its text and tool calls as they
        come; usage and the stop reason are recorded in ``done``."""
        done.stop_reason = ""
        done.calls.started(done.agent_type, request)
        answered: str | None = None
        event: ModelEvent
        async for event in self._model.stream(request):
            if answered is None:
                # Bedrock names the model that answered (a fallback, perhaps); a provider that does not has answered
                # as its configured model.
                answered = event.model_id if isinstance(event, ModelUsed) else self._model.model_id
                done.calls.answered(answered)
                yield AgentModel(done.agent_type, answered)
            if isinstance(event, TextDelta):
                done.calls.produced(event.text)
                yield AgentText(done.agent_type, event.text)
            elif isinstance(event, ToolUse):
                done.calls.produced(event.input)
                yield event
            elif isinstance(event, Usage):
                done.calls.finished(event)
            elif isinstance(event, Stop):
                done.stop_reason = event.reason
        if not done.stop_reason:
            raise UpstreamError("The model stream ended without a stop event.", code="MODEL_STREAM_INCOMPLETE")


def _assistant_turn(text: list[str], calls: list[ToolUse]) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"text": "".join(text)}] if "".join(text).strip() else []
    content += [{"toolUse": {"toolUseId": c.tool_use_id, "name": c.name, "input": c.input}} for c in calls]
    return {"role": "assistant", "content": content}
