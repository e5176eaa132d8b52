"""What a turn's model calls used, call by call, however the turn ends (docs/operations.md, "Usage and budgets").

Each call the assistant makes becomes one ``CallUsage`` once the model reports its usage, which Bedrock does at the
end of the call's stream. A call cut short after the model began answering (a stop, a timeout, a failure, a
shutdown) is counted all the same, estimated from its request and what it streamed and marked ``estimated``, so a
stopped or failed answer is never free; a call refused before any answer counts nothing, as the model bills nothing
for it. Each call is priced as it is counted (``ModelPrice``); the calls are the rows of the usage ledger, which the
run's flushes write (``services/runs/live.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from services.model import ModelRequest, Usage, estimate_tokens, prompt_tokens
from services.store import CallUsage
from settings import ModelPrice

KINDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


class TurnUsage:
    """The calls of one turn, as they start, answer, produce and finish; ``close`` estimates the one still open."""

    def __init__(self, prices: Mapping[str, ModelPrice] | None = None) -> None:
        self.calls: list[CallUsage] = []
        self._prices = prices or {}
        self._open: tuple[str, ModelRequest] | None = None
        self._model: str | None = None
        self._output: list[str] = []

    def started(self, agent_type: str, request: ModelRequest) -> None:
        self.close()
        self._open, self._model, self._output = (agent_type, request), None, []

    def answered(self, model_id: str) -> None:
        self._model = model_id

    def produced(self, output: str | dict[str, object]) -> None:
        self._output.append(output if isinstance(output, str) else json.dumps(output))

    def finished(self, usage: Usage) -> None:
        """The model's own figures; it has answered (``answered`` comes with a call's first event)."""
        if self._open is not None and self._model is not None:
            self._count(CallUsage(self._open[0], self._model, usage.input_tokens, usage.output_tokens,
                                  usage.cache_read_tokens, usage.cache_write_tokens))
        self._open = None

    def close(self) -> None:
        """The call still open, if any, is over without the model's figures: estimate them if it had begun to
        answer."""
        if self._open is not None and self._model is not None:
            agent_type, request = self._open
            output = "".join(self._output)
            self._count(CallUsage(agent_type, self._model, prompt_tokens(request),
                                  estimate_tokens(output) if output else 0, estimated=True))
        self._open = None

    def _count(self, call: CallUsage) -> None:
        price = self._prices.get(call.model_id)
        if price is not None:  # else its cost stays None
            call.cost = price.cost(call.input_tokens, call.output_tokens, call.cache_read_tokens,
                                   call.cache_write_tokens)
        call.index = len(self.calls)
        self.calls.append(call)

    def totals(self) -> dict[str, object] | None:
        """The turn's usage as the stream and the stored answer show it (the cache's tokens only when any; ``cost``
        None when a call's model has no price); None before any call was counted."""
        if not self.calls:
            return None
        out: dict[str, object] = {kind: sum(getattr(c, kind) for c in self.calls) for kind in KINDS}
        for kind in KINDS[2:]:
            if not out[kind]:
                del out[kind]
        costs = [c.cost for c in self.calls]
        out["cost"] = None if None in costs else round(sum(c for c in costs if c is not None), 10)
        if any(c.estimated for c in self.calls):
            out["estimated"] = True
        return out
