"""A ``ChatModel`` that plays a script: text pieces with pauses, then a stop or an error. For failure-path tests.

It implements the same interface as the real providers and is handed to ``create_app(settings, model=...)``;
nothing in the service is patched. It records whether its stream was cancelled, so tests can prove that a client
disconnect reaches the model.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from errors import AppError
from services.model import ModelEvent, ModelRequest, Stop, TextDelta, Usage


@dataclass
class ScriptedModel:
    pieces: list[str]
    pause: float = 0.0
    fail_with: AppError | None = None
    first_pause: float = 0.0
    provider: str = "scripted"
    model_id: str = "scripted-test-model"
    is_llm: bool = False
    requests: list[ModelRequest] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    configured: bool = True

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

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
class ScriptedCalls:
    """A model whose Nth call plays ``calls[N]`` (the last script repeats); records every request it was sent."""

    calls: list[list[ModelEvent]]
    provider: str = "scripted"
    model_id: str = "scripted-calls"
    is_llm: bool = False
    requests: list[ModelRequest] = field(default_factory=list)

    configured: bool = True

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        self.requests.append(request)
        for event in self.calls[min(len(self.requests), len(self.calls)) - 1]:
            yield event
