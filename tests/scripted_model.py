"""A ``ChatModel`` that plays a script: text pieces with pauses, then a stop or an error. For failure-path tests.

It implements the same interface as the real providers and is handed to ``create_app(settings, model=...)``;
nothing in the service is patched. It records whether its stream was cancelled, so tests can prove that a client
disconnect reaches the model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from errors import AppError
from services.model import ModelEvent, ModelRequest, Stop, TextDelta, Usage


class _Scripted:
    """What both scripted models share of the ``ChatModel`` interface: no provider to open, check or close."""

    provider = "scripted"
    is_llm = False
    configured = True

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


@dataclass
class ScriptedModel(_Scripted):
    pieces: list[str]
    pause: float = 0.0
    fail_with: AppError | None = None
    first_pause: float = 0.0
    requests: list[ModelRequest] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    model_id = "scripted-test-model"

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        self.requests.append(request)
        try:
            if self.first_pause:
                await anyio.sleep(self.first_pause)
            for index, piece in enumerate(self.pieces):
                if index and self.pause:
                    await anyio.sleep(self.pause)
                yield TextDelta(piece)
            if self.fail_with is not None:
                raise self.fail_with
            yield Stop("end_turn")
            yield Usage(7, len(self.pieces))
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise
        except GeneratorExit:
            self.cancelled.set()
            raise
        finally:
            self.finished.set()


@dataclass
class ScriptedCalls(_Scripted):
    """A model whose Nth call plays ``calls[N]`` (the last script repeats); records every request it was sent."""

    calls: list[list[ModelEvent]]
    requests: list[ModelRequest] = field(default_factory=list)
    model_id = "scripted-calls"

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        self.requests.append(request)
        for event in self.calls[min(len(self.requests), len(self.calls)) - 1]:
            yield event


@dataclass
class ScriptedByMessage(_Scripted):
    """Several users' turns on one worker, each with its own answer: a request plays the script whose key its last
    message holds, ``default`` if none."""

    scripts: dict[str, ScriptedModel]
    default: ScriptedModel
    model_id = "scripted-by-message"

    def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        last = json.dumps(request.messages[-1]) if request.messages else ""
        return next((m for key, m in self.scripts.items() if key in last), self.default).stream(request)
