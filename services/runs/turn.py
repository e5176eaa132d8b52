"""One chat turn's generation: the assistant's events as chunks, and what the answer became.

A ``Turn`` knows nothing of connections or storage: ``services/runs/manager.py`` drives it in a task of its own, records
every chunk in the run's event log and saves the answer however the turn ends. The chunk shapes are in
``services/store/run_log.py``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from services.agents.assistant import AgentDone, AgentModel, AgentText, AgentToolCall, Assistant
from services.agents.usage import TurnUsage
from services.store import Caller
from services.store.run_log import SUPERVISOR, chunk
from settings import ModelPrice


class Turn:
    def __init__(
        self, assistant: Assistant, caller: Caller, turns: list[dict[str, Any]],
        prices: Mapping[str, ModelPrice] | None = None,
    ) -> None:
        self._assistant = assistant
        self._caller = caller
        self._turns = turns
        self._started = time.monotonic()
        self.agent_type = SUPERVISOR  # the agent whose text came last: the answer's agent_type
        self.done: AgentDone | None = None
        self.models: list[str] = []  # the models that answered the turn's calls, in order of first use
        self.model_id: str | None = None  # the one that answered the latest call
        self.calls = TurnUsage(prices)  # every model call's usage and cost, however the turn ends

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """``token`` and ``tool_call`` chunks as the assistant produces them; errors propagate as ``AppError``."""
        async for event in self._assistant.respond(self._caller, self._turns, self.calls):
            if isinstance(event, AgentText):
                self.agent_type = event.agent_type
                yield chunk("token", event.agent_type, content=event.text)
            elif isinstance(event, AgentToolCall):
                yield chunk("tool_call", event.agent_type, tool_name=event.tool_name, tool_call=event.payload)
            elif isinstance(event, AgentModel):
                self.model_id = event.model_id
                if event.model_id not in self.models:
                    self.models.append(event.model_id)
            elif isinstance(event, AgentDone):
                self.agent_type = event.agent_type
                self.done = event

    @property
    def usage(self) -> dict[str, Any] | None:
        """The turn's usage, read once its generation has stopped however it ended: a call cut short is counted
        estimated (``services/agents/usage.py``)."""
        self.calls.close()
        return self.calls.totals()

    @property
    def stop_reason(self) -> str | None:
        return self.done.stop_reason if self.done is not None else None

    def metadata(self, status: str, error_code: str | None) -> dict[str, Any]:
        """The assistant message's metadata once the turn has ended with ``status``."""
        meta: dict[str, Any] = {"status": status, "duration_ms": round((time.monotonic() - self._started) * 1000)}
        if error_code:
            meta["error_code"] = error_code
        if self.model_id is not None:
            meta["model_id"] = self.model_id
        if len(self.models) > 1:  # fallbacks answered some of the turn's calls, the configured model others
            meta["model_ids"] = list(self.models)
        usage = self.usage
        if usage is not None:
            meta["usage"] = usage
        if self.done is not None:
            meta["stop_reason"] = self.done.stop_reason
            if self.done.tool_calls:
                meta["tool_calls"] = self.done.tool_calls
        return meta
