"""Bedrock ConverseStream's wire format: the signed request a turn sends, and the event stream it reads back.

Pure functions and one decoder, no I/O: ``bedrock.py`` sends the request and feeds the decoder as bytes arrive.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from botocore.eventstream import EventStreamBuffer, ParserError

from errors import AppError, ValidationFailed
from services.model import ModelEvent, ModelRequest, Stop, TextDelta, ToolUse, Usage
from services.model.bedrock_errors import bedrock_error, failure
from services.store.text import encodable, is_high_surrogate, storable
from settings import Settings

SIGNING_NAME = "bedrock"  # the service model's signingName; the endpoint prefix is bedrock-runtime
EVENT_STREAM_TYPE = "application/vnd.amazon.eventstream"


def endpoint_url(settings: Settings) -> str:
    if settings.bedrock_endpoint_url:
        return settings.bedrock_endpoint_url.rstrip("/")
    suffix = "amazonaws.com.cn" if settings.aws_region.startswith("cn-") else "amazonaws.com"
    return f"https://bedrock-runtime.{settings.aws_region}.{suffix}"


def model_path(model_id: str) -> str:
    """The request path, with the model id as one percent-encoded segment, as botocore's serializer writes it.

    ``:`` becomes ``%3A`` and an ARN's ``/`` becomes ``%2F``; a raw ``/`` would split the path and miss the route.
    """
    return f"/model/{quote(model_id, safe='')}/converse-stream"


def converse_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turns Bedrock accepts: blank text blocks dropped, same-role neighbours merged, first and last turn the user's.

    The prompt builder already does this for stored text; this guards every caller (tool turns included) so a
    ValidationException can never come from our own history.
    """
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = [block for block in message.get("content", ()) if not _blank(block)]
        if role not in ("user", "assistant") or not content:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(content)
        else:
            turns.append({"role": role, "content": content})
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    while turns and turns[-1]["role"] != "user":
        turns.pop()
    return turns


def _blank(block: dict[str, Any]) -> bool:
    return "text" in block and not str(block["text"]).strip()


def request_body(request: ModelRequest, max_tokens: int, temperature: float) -> bytes:
    messages = converse_messages(request.messages)
    if not messages:
        raise ValidationFailed("There is no user message to send to the model.", code="EMPTY_PROMPT")
    body: dict[str, Any] = {
        "messages": messages,
        # Always send maxTokens: Bedrock reserves quota for it up front, and the model's maximum would reserve more.
        "inferenceConfig": {"maxTokens": max_tokens, "temperature": temperature},
    }
    if request.system.strip():
        body["system"] = [{"text": request.system}]
    if request.tools:
        body["toolConfig"] = {"tools": request.tools}
    # RFC 8259 has no NaN or Infinity and Bedrock parses strictly: a number that is not finite is a bug, never sent.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def signed_headers(url: str, body: bytes, credentials: ReadOnlyCredentials, region: str) -> dict[str, str]:
    """SigV4 headers (Authorization, X-Amz-Date, X-Amz-Security-Token) for one POST; pure CPU, no I/O."""
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(credentials, SIGNING_NAME, region).add_auth(request)
    headers = dict(request.headers.items())
    # Unsigned, as botocore sends it: the event stream is binary framing that compression would only slow down.
    headers["Accept-Encoding"] = "identity"
    return headers


class ConverseStreamDecoder:
    """Bytes in, ``ModelEvent``s out: the ConverseStream event protocol over botocore's ``EventStreamBuffer``.

    ``feed`` returns the events one network read completed, with all their text joined into one ``TextDelta`` (the
    relay's cost is per event, not per frame), in order. An exception frame or a corrupt frame sets ``failure``
    instead of raising, so the text decoded before it still reaches the user. Unknown events and fields (real
    Bedrock pads payloads with a ``p`` field) are ignored. Payloads are read with ``json.loads``: botocore's
    ``EventStreamJSONParser`` would only rebuild the same dicts from the service model, much more slowly.

    Every string the model sends leaves here as text both stores keep and every encoder writes (``services/store/text.py``):
    the answer, the stop reason and a tool's id and name with lone surrogates and NUL as U+FFFD, a tool's input with
    lone surrogates as U+FFFD (a NUL there is the tool's to refuse to the model, ``services/agents/tools.py``). A
    text delta ending with the first half of a surrogate pair keeps it until the next delta, which may hold the other.
    """

    __slots__ = ("_buffer", "_held", "_tools", "failure", "frames", "stop_reason")

    def __init__(self) -> None:
        self._buffer = EventStreamBuffer()
        self._held = ""  # a high surrogate that ended the text so far, waiting for its low half
        self._tools: dict[int, tuple[str, str, list[str]]] = {}  # open toolUse blocks: index -> (id, name, input)
        self.failure: AppError | None = None
        self.frames = 0
        self.stop_reason: str | None = None

    def feed(self, data: bytes) -> list[ModelEvent]:
        events: list[ModelEvent] = []
        text: list[str] = []
        self._buffer.add_data(data)
        try:
            for message in self._buffer:
                self.frames += 1
                headers = message.headers
                if headers.get(":message-type") != "event":
                    self.failure = _frame_error(headers, message.payload)
                    break
                name = headers.get(":event-type")
                if name == "contentBlockDelta":  # the hot path: one per token
                    payload = json.loads(message.payload)
                    delta = payload["delta"]
                    if "text" in delta:
                        piece = delta["text"]
                        if type(piece) is not str:  # checked here so joining below can never fail
                            raise TypeError("text delta is not a string")
                        text.append(piece)
                    elif "toolUse" in delta:
                        self._tool_input(payload["contentBlockIndex"], delta["toolUse"])
                    continue
                handler = _HANDLERS.get(name)
                if handler is not None:
                    event = handler(self, json.loads(message.payload or b"{}"))
                    if event is not None:
                        self._flush(text, events, hold=False)  # no more of this text: a half held is alone
                        events.append(event)
        except (ParserError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # A corrupt frame (bad CRC, bad JSON, a payload of the wrong shape): nothing after it can be trusted.
            self.failure = failure("MODEL_STREAM_ERROR", f"Bedrock sent an unreadable event ({type(exc).__name__}).")
            self.failure.__cause__ = exc
        # The text before a failure is valid and reaches the user; without one, the next read may go on with it.
        self._flush(text, events, hold=self.failure is None)
        return events

    def _flush(self, text: list[str], events: list[ModelEvent], *, hold: bool) -> None:
        """The text decoded since the last event, storable, as one ``TextDelta``; with ``hold``, a high surrogate
        ending it waits for the next delta instead (a UTF-16 based encoder may split a pair between two deltas)."""
        if not text and not self._held:
            return
        joined = self._held + "".join(text)
        text.clear()
        self._held = ""
        if hold and joined and is_high_surrogate(joined[-1]):
            joined, self._held = joined[:-1], joined[-1]
        if joined := storable(joined):
            events.append(TextDelta(joined))

    def _tool_input(self, index: int, delta: dict[str, Any]) -> None:
        block = self._tools.get(index)
        if block is not None:  # a fragment for a block we never saw start carries nothing we could use
            block[2].append(delta["input"])

    def _block_start(self, payload: dict[str, Any]) -> None:
        tool = payload.get("start", {}).get("toolUse")
        if tool is not None:
            self._tools[payload["contentBlockIndex"]] = (storable(tool["toolUseId"]), storable(tool["name"]), [])

    def _block_stop(self, payload: dict[str, Any]) -> ModelEvent | None:
        block = self._tools.pop(payload.get("contentBlockIndex", -1), None)
        if block is None:
            return None
        tool_use_id, name, fragments = block
        raw = "".join(fragments)
        tool_input = _TOOL_INPUT.decode(raw) if raw.strip() else {}
        if not isinstance(tool_input, dict):
            raise TypeError("tool input is not a JSON object")
        return ToolUse(tool_use_id=tool_use_id, name=name, input=_encodable(tool_input))

    def _message_stop(self, payload: dict[str, Any]) -> ModelEvent:
        # Every stopReason passes through (end_turn, tool_use, max_tokens, stop_sequence, guardrail_intervened,
        # content_filtered, malformed_model_output, malformed_tool_use, model_context_window_exceeded, and any
        # added later): the answer so far is valid and the chat layer records why it ended.
        self.stop_reason = storable(str(payload["stopReason"]))
        return Stop(self.stop_reason)

    def _metadata(self, payload: dict[str, Any]) -> ModelEvent | None:
        usage = payload.get("usage")
        if not usage:
            return None
        return Usage(int(usage.get("inputTokens", 0)), int(usage.get("outputTokens", 0)),
                     int(usage.get("cacheReadInputTokens", 0)), int(usage.get("cacheWriteInputTokens", 0)))


# Events other than contentBlockDelta; messageStart carries only the role, and unknown events are skipped.
_HANDLERS: dict[str, Callable[[ConverseStreamDecoder, dict[str, Any]], ModelEvent | None]] = {
    "contentBlockStart": ConverseStreamDecoder._block_start,
    "contentBlockStop": ConverseStreamDecoder._block_stop,
    "messageStop": ConverseStreamDecoder._message_stop,
    "metadata": ConverseStreamDecoder._metadata,
}


def _number_or_text(text: str) -> float | str:
    """A number a tool input spells: a float, or the model's own text when a double cannot hold it (``1e400`` would be
    infinite). Kept as text, it goes back to Bedrock as valid JSON, and a tool refuses it as no number."""
    value = float(text)
    return value if math.isfinite(value) else text


# A tool input as the model wrote it, except that what JSON has no number for (NaN, Infinity, which json.loads takes,
# and numbers past a double's range) stays the model's text: the next request echoes the input, and must be JSON.
_TOOL_INPUT = json.JSONDecoder(parse_float=_number_or_text, parse_constant=str)


def _encodable(value: Any) -> Any:
    """A tool input (decoded JSON) with every string in it, names included, ``encodable``: it goes back to Bedrock in
    the next request's history, whose body is UTF-8."""
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, dict):
        return {encodable(name): _encodable(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_encodable(item) for item in value]
    return value


def _frame_error(headers: dict[str, Any], payload: bytes) -> AppError:
    """An ``exception`` frame (modeled: ``:exception-type``) or an ``error`` frame (unmodeled: ``:error-code``)."""
    if headers.get(":message-type") == "exception":
        try:
            message = str(json.loads(payload or b"{}").get("message", ""))
        except (ValueError, AttributeError):
            message = ""
        return bedrock_error(str(headers.get(":exception-type", "")), None, message)
    return bedrock_error(str(headers.get(":error-code", "")), None, str(headers.get(":error-message", "")))
