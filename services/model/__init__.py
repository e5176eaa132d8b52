"""The interface between the agents and a language model, shaped after Bedrock's Converse API.

A ``ModelRequest`` holds a system prompt, Converse-format ``messages`` (alternating user/assistant turns whose
content blocks are ``{"text"}``, ``{"toolUse"}`` or ``{"toolResult"}``) and Converse ``toolSpec`` entries. A model
streams ``ModelEvent`` values: text as it arrives, complete tool calls, usage, and exactly one ``Stop``. Both
providers speak this interface: ``LocalModel`` (built in, deterministic, not an LLM) and ``BedrockModel``. A provider
that may answer with another model than its ``model_id`` (Bedrock's fallbacks) starts the stream with ``ModelUsed``;
otherwise the answer is ``model_id``'s.

The package: this interface (imported by the agents, the runs and ``app.py``), ``local.py``, ``bedrock.py`` with
its error table (``bedrock_errors.py``), wire format (``converse.py``) and HTTP/1.1 client (``stream_client.py``,
whose ``set_nodelay`` ``web/tcp.py`` shares), and ``build.py``, which picks the provider from the settings (for
``app.py``). It imports nothing of the store, the agents or above.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolUse:
    tool_use_id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Usage:
    """One call's tokens as the model counted them; the cache's only when prompt caching was used (Bedrock's
    ``cacheReadInputTokens`` and ``cacheWriteInputTokens``)."""

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Stop:
    """Converse stop reasons: end_turn, tool_use, max_tokens, stop_sequence, guardrail_intervened, content_filtered."""

    reason: str


@dataclass(frozen=True, slots=True)
class ModelUsed:
    """The model that answers this call, before any of its output: ``model_id`` or one of the fallbacks."""

    model_id: str


ModelEvent = TextDelta | ToolUse | Usage | Stop | ModelUsed


@dataclass(frozen=True, slots=True)
class ModelRequest:
    system: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)


class ChatModel(Protocol):
    provider: str
    model_id: str
    is_llm: bool

    @property
    def configured(self) -> bool:
        """Whether the provider can be called (for Bedrock: credentials resolved); reported by /health."""

    async def open(self) -> None:
        """Called once at startup, before the first request."""

    def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        """Stream one model call. Raises ``errors.AppError`` subclasses only."""

    async def aclose(self) -> None:
        ...


def estimate_tokens(text: str) -> int:
    """A cheap, provider-neutral estimate (about four characters a token): for budgets, and for a call cut short before
    the model reported its usage (counted ``estimated``)."""
    return len(text) // 4 + 1


def prompt_tokens(request: ModelRequest) -> int:
    """``estimate_tokens`` of what a request sends: its system prompt and messages."""
    return estimate_tokens(request.system + json.dumps(request.messages, default=str))
