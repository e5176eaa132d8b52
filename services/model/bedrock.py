"""Amazon Bedrock ConverseStream over one shared async HTTP client: the ``ChatModel`` behind ``LLM_PROVIDER=bedrock``.

Why raw HTTP instead of boto3: boto3 is synchronous, so every open stream would hold a thread (Strands does this
with ``asyncio.to_thread``). Here a stream is one HTTP/1.1 request (``services/model/stream_client.py``) signed with
botocore's ``SigV4Auth`` and one ``EventStreamBuffer`` that decodes frames as bytes arrive, so thousands of streams
need no threads at all. Only resolving or refreshing credentials, which may do network I/O (IMDS, STS, SSO), runs
in a worker thread.

A call has two phases. Until the first model event that would reach the user (text, a tool call, a stop), the call
is invisible, so the whole attempt (send, HTTP status, in-stream exception frames, time to first event) is retried
under ``services/retry.py``. After that nothing is retried, so a retry can never duplicate text; later failures end
the stream with a typed error and the chat layer saves the partial answer.

Fallbacks (``BEDROCK_FALLBACK_MODEL_IDS``) live in the first phase too. One attempt walks the list: the configured
model, and when it fails in a way another model may not (``Failure.falls_back``: throttled, unavailable, 5xx, not
ready, a stream error before any output), the next one at once, with no pause; an error that is the request's own
(validation, access, input too long) or that another model would meet the same way (timeouts, the network) ends the
attempt as before. Only when the last model fails too does the retry policy pause and start again from the
configured model. Why not the existing retries per model: a throttled model's backoff is exactly the wait a fallback
exists to avoid, and retries per model would multiply the attempts and the time a turn can wait before its first
token; this way the time to first token under throttling is one more round trip per model, and ``RETRY_MAX_TOTAL``
still bounds the pauses of the whole turn. The model that answered is the stream's first event (``ModelUsed``).

Every Bedrock failure becomes one of our ``AppError``s through ``FAILURES`` (the README's "Amazon Bedrock" table):
a ``code``, a plain-language ``user_message``, ``suggested_actions`` and ``retryable``. Bedrock's own error text is
used only to tell "input too long" and "model not enabled" apart; it never reaches a client or a log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import quote

import anyio
import anyio.to_thread
import botocore.session
import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from botocore.eventstream import EventStreamBuffer, ParserError
from botocore.exceptions import BotoCoreError, ClientError

from errors import AppError, UpstreamError, UpstreamTimeout, UpstreamUnavailable, ValidationFailed
from services.deadline import Deadline
from services.metrics import record_model_call
from services.model import ModelEvent, ModelRequest, ModelUsed, Stop, TextDelta, ToolUse, Usage
from services.retry import RetryPolicy, with_retry
from services.model.stream_client import ConnectTimeout, ReadInterrupted, StreamClient, StreamClientError, StreamResponse
from settings import ConfigError, Settings

logger = logging.getLogger(__name__)

# Streams being opened at once (connect and request, up to Bedrock's response headers). More turns than this wait in line without
# a clock running; opening thousands at once (a burst after a deploy, a load test) otherwise puts every connect and
# first-event deadline behind the whole burst's CPU, and those that expire fail though the worker could carry them.
OPENING_AT_ONCE = 512

SIGNING_NAME = "bedrock"  # the service model's signingName; the endpoint prefix is bedrock-runtime
EVENT_STREAM_TYPE = "application/vnd.amazon.eventstream"
MAX_ERROR_BODY = 64 * 1024  # an error body is a short JSON document; never buffer a misrouted HTML page whole
# During the advisory refresh window botocore keeps valid credentials when a refresh fails; without this pause every
# request would wait for another failing IMDS/STS call while the metadata service is down.
REFRESH_RETRY_SECONDS = 10.0


# -- the error table ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """One row of the error table: what the user sees, whether the call may be retried, and whether a fallback model
    may be tried at once (the model is busy or failing; nothing about the request is wrong)."""

    kind: type[AppError]
    code: str
    user_message: str
    suggested_actions: tuple[str, ...]
    retryable: bool
    falls_back: bool = False

    def error(self, message: str) -> AppError:
        return self.kind(
            message,
            code=self.code,
            user_message=self.user_message,
            suggested_actions=self.suggested_actions,
            retryable=self.retryable,
        )


_TRY_AGAIN = ("Try again in a moment", "Contact support if the problem persists")
_SUPPORT = ("Contact support",)
_CONFIG_PROBLEM = "The assistant isn't available right now because of a configuration problem on our side."

FAILURES: dict[str, Failure] = {
    f.code: f
    for f in (
        Failure(
            UpstreamUnavailable,
            "MODEL_THROTTLED",
            "The assistant is handling a lot of requests right now. Please wait a moment and try again.",
            ("Wait a few seconds and try again",),
            True,
            falls_back=True,
        ),
        Failure(
            UpstreamTimeout,
            "MODEL_TIMEOUT",
            "The assistant took too long to answer. Please try again.",
            ("Try again", "Try a shorter or simpler question"),
            True,
        ),
        Failure(
            UpstreamUnavailable,
            "MODEL_UNAVAILABLE",
            "The assistant is temporarily unavailable. Please try again in a moment.",
            _TRY_AGAIN,
            True,
            falls_back=True,
        ),
        Failure(
            UpstreamUnavailable,
            "MODEL_INTERNAL_ERROR",
            "The AI service had a temporary problem. Please try again.",
            _TRY_AGAIN,
            True,
            falls_back=True,
        ),
        Failure(
            UpstreamUnavailable,
            "MODEL_STREAM_ERROR",
            "The answer was interrupted by a problem with the AI service. Please try again.",
            _TRY_AGAIN,
            True,
            falls_back=True,
        ),
        Failure(
            UpstreamUnavailable,
            "MODEL_STREAM_INCOMPLETE",
            "The answer was cut off before it finished. Please try again.",
            _TRY_AGAIN,
            True,
        ),
        Failure(
            UpstreamUnavailable,
            "MODEL_NOT_READY",
            "The AI model is starting up. Please try again in a minute.",
            ("Try again in a minute",),
            True,
            falls_back=True,
        ),
        Failure(
            UpstreamUnavailable,
            "MODEL_NETWORK_ERROR",
            "We couldn't reach the AI service. Please try again in a moment.",
            _TRY_AGAIN,
            True,
        ),
        Failure(
            ValidationFailed,
            "MODEL_INPUT_TOO_LONG",
            "This conversation is too long for the assistant to read at once. Please start a new conversation "
            "or send a shorter message.",
            ("Start a new conversation", "Send a shorter message"),
            False,
        ),
        Failure(
            UpstreamError,
            "MODEL_REQUEST_REJECTED",
            "The assistant couldn't process this message. Please rephrase it and try again.",
            ("Rephrase your message", "Start a new conversation"),
            False,
        ),
        Failure(
            UpstreamError,
            "MODEL_ERROR",
            "The AI model couldn't process this message. Please rephrase it and try again.",
            ("Rephrase your message", "Contact support if the problem persists"),
            False,
        ),
        Failure(UpstreamError, "MODEL_ACCESS_DENIED", _CONFIG_PROBLEM, _SUPPORT, False),
        Failure(UpstreamError, "MODEL_NOT_ENABLED", _CONFIG_PROBLEM, _SUPPORT, False),
        Failure(UpstreamError, "MODEL_NOT_FOUND", _CONFIG_PROBLEM, _SUPPORT, False),
        Failure(UpstreamError, "MODEL_CREDENTIALS_MISSING", _CONFIG_PROBLEM, _SUPPORT, False),
        Failure(UpstreamError, "MODEL_CREDENTIALS_EXPIRED", _CONFIG_PROBLEM, _SUPPORT, False),
        Failure(UpstreamError, "MODEL_CREDENTIALS_INVALID", _CONFIG_PROBLEM, _SUPPORT, False),
    )
}

# Bedrock error types, lower-cased: HTTP errors name them in PascalCase (x-amzn-ErrorType), in-stream exception
# frames in camelCase (:exception-type), so one lower-case key serves both.
BEDROCK_ERRORS: dict[str, str] = {
    "throttlingexception": "MODEL_THROTTLED",
    "toomanyrequestsexception": "MODEL_THROTTLED",
    "servicequotaexceededexception": "MODEL_THROTTLED",
    "modeltimeoutexception": "MODEL_TIMEOUT",
    "serviceunavailableexception": "MODEL_UNAVAILABLE",
    "internalserverexception": "MODEL_INTERNAL_ERROR",
    "internalfailure": "MODEL_INTERNAL_ERROR",
    "modelstreamerrorexception": "MODEL_STREAM_ERROR",
    "modelnotreadyexception": "MODEL_NOT_READY",
    "modelerrorexception": "MODEL_ERROR",
    "validationexception": "MODEL_REQUEST_REJECTED",
    "accessdeniedexception": "MODEL_ACCESS_DENIED",
    "resourcenotfoundexception": "MODEL_NOT_FOUND",
    "expiredtokenexception": "MODEL_CREDENTIALS_EXPIRED",
    "unrecognizedclientexception": "MODEL_CREDENTIALS_INVALID",
    "invalidsignatureexception": "MODEL_CREDENTIALS_INVALID",
    "incompletesignatureexception": "MODEL_CREDENTIALS_INVALID",
    "missingauthenticationtokenexception": "MODEL_CREDENTIALS_INVALID",
}

# Bedrock reports both as a generic type; only the message says which ("Input is too long for requested model",
# "You don't have access to the model with the specified model ID", "Model use case details have not been submitted").
_TOO_LONG = re.compile(r"too long|context window|context length|too many input tokens", re.IGNORECASE)
_NOT_ENABLED = re.compile(r"access to the model|use case|not enabled|not subscribed|subscription", re.IGNORECASE)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def failure(code: str, message: str) -> AppError:
    return FAILURES[code].error(message)


def falls_back(error: AppError) -> bool:
    """Whether the next fallback model may answer instead (and at once) after ``error`` before any output."""
    row = FAILURES.get(error.code)
    return row is not None and row.falls_back


def bedrock_error(error_type: str, status: int | None, upstream_message: str = "") -> AppError:
    """Our error for a Bedrock error type (HTTP or in-stream), falling back on the HTTP status for unknown types."""
    name = _SAFE_NAME.sub("", error_type.split(":", 1)[0].split("#")[-1])[:64]
    code = BEDROCK_ERRORS.get(name.lower()) or _code_for_status(status)
    if code == "MODEL_REQUEST_REJECTED" and _TOO_LONG.search(upstream_message):
        code = "MODEL_INPUT_TOO_LONG"
    elif code in ("MODEL_ACCESS_DENIED", "MODEL_NOT_FOUND") and _NOT_ENABLED.search(upstream_message):
        code = "MODEL_NOT_ENABLED"
    where = f"HTTP {status}" if status is not None else "in the stream"
    return failure(code, f"Bedrock returned {name or 'an unnamed error'} ({where}).")


def _code_for_status(status: int | None) -> str:
    if status is None:
        return "MODEL_STREAM_ERROR"
    if status == 429:
        return "MODEL_THROTTLED"
    if status in (408, 504):
        return "MODEL_TIMEOUT"
    if status == 503:
        return "MODEL_UNAVAILABLE"
    if status >= 500:
        return "MODEL_INTERNAL_ERROR"
    if status in (401, 403):
        return "MODEL_ACCESS_DENIED"
    if status == 404:
        return "MODEL_NOT_FOUND"
    return "MODEL_REQUEST_REJECTED"


def _transport_error(exc: StreamClientError) -> AppError:
    # The client's message says what broke (refused, reset, malformed response) and holds nothing from the request.
    if isinstance(exc, ConnectTimeout):
        return failure("MODEL_TIMEOUT", "Connecting to Bedrock timed out (BEDROCK_CONNECT_TIMEOUT).")
    return failure("MODEL_NETWORK_ERROR", f"Could not talk to Bedrock: {exc}.")


# -- credentials ---------------------------------------------------------------------------------------------------


class CredentialCache:
    """botocore's credential chain, resolved and refreshed in a worker thread so the event loop never blocks.

    The fast path (credentials frozen and not near expiry) is an attribute check; a stream never takes a thread.
    Pass ``credentials`` to skip the chain (tests pass explicit test keys this way).
    """

    def __init__(self, credentials: Credentials | None = None) -> None:
        self._source = credentials
        self._frozen: ReadOnlyCredentials | None = None
        self.available = credentials is not None
        self._next_refresh = 0.0
        self._lock = anyio.Lock()

    async def get(self) -> ReadOnlyCredentials:
        frozen = self._frozen
        if frozen is not None and not self._refresh_due():
            return frozen
        if self._source is not None and not isinstance(self._source, RefreshableCredentials):
            self._frozen = self._source.get_frozen_credentials()  # static keys: no I/O, so no thread
            return self._frozen
        async with self._lock:  # one resolution at a time; the others then find fresh credentials
            if self._frozen is None or self._refresh_due():
                self._next_refresh = time.monotonic() + REFRESH_RETRY_SECONDS
                try:
                    self._frozen = await anyio.to_thread.run_sync(self._resolve)
                except AppError:
                    self.available = False
                    raise
                self.available = True
            return self._frozen

    def _refresh_due(self) -> bool:
        source = self._source
        return (
            isinstance(source, RefreshableCredentials)
            and time.monotonic() >= self._next_refresh
            and source.refresh_needed()
        )

    def _resolve(self) -> ReadOnlyCredentials:
        """Runs in a worker thread: the chain and refreshes may call IMDS, STS or SSO."""
        if self._source is None:
            try:
                self._source = botocore.session.get_session().get_credentials()
            except (BotoCoreError, ClientError) as exc:
                raise failure("MODEL_CREDENTIALS_MISSING", "Loading AWS credentials failed.") from exc
            if self._source is None:
                raise failure("MODEL_CREDENTIALS_MISSING", "No AWS credentials found in botocore's chain.")
        try:
            return self._source.get_frozen_credentials()
        except (BotoCoreError, ClientError) as exc:
            raise failure("MODEL_CREDENTIALS_EXPIRED", "Refreshing AWS credentials failed.") from exc


# -- the request ---------------------------------------------------------------------------------------------------


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
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def signed_headers(url: str, body: bytes, credentials: ReadOnlyCredentials, region: str) -> dict[str, str]:
    """SigV4 headers (Authorization, X-Amz-Date, X-Amz-Security-Token) for one POST; pure CPU, no I/O."""
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(credentials, SIGNING_NAME, region).add_auth(request)
    headers = dict(request.headers.items())
    # Unsigned, as botocore sends it: the event stream is binary framing that compression would only slow down.
    headers["Accept-Encoding"] = "identity"
    return headers


# -- the response --------------------------------------------------------------------------------------------------


class ConverseStreamDecoder:
    """Bytes in, ``ModelEvent``s out: the ConverseStream event protocol over botocore's ``EventStreamBuffer``.

    ``feed`` returns the events one network read completed, with all their text joined into one ``TextDelta`` (the
    relay's cost is per event, not per frame), in order. An exception frame or a corrupt frame sets ``failure``
    instead of raising, so the text decoded before it still reaches the user. Unknown events and fields (real
    Bedrock pads payloads with a ``p`` field) are ignored. Payloads are read with ``json.loads``: botocore's
    ``EventStreamJSONParser`` would only rebuild the same dicts from the service model, much more slowly.
    """

    __slots__ = ("_buffer", "_tools", "failure", "frames", "stop_reason")

    def __init__(self) -> None:
        self._buffer = EventStreamBuffer()
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
                        _flush(text, events)
                        events.append(event)
        except (ParserError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # A corrupt frame (bad CRC, bad JSON, a payload of the wrong shape): nothing after it can be trusted.
            self.failure = failure("MODEL_STREAM_ERROR", f"Bedrock sent an unreadable event ({type(exc).__name__}).")
            self.failure.__cause__ = exc
        _flush(text, events)  # the text before a failure is valid and reaches the user
        return events

    def _tool_input(self, index: int, delta: dict[str, Any]) -> None:
        block = self._tools.get(index)
        if block is not None:  # a fragment for a block we never saw start carries nothing we could use
            block[2].append(delta["input"])

    def _block_start(self, payload: dict[str, Any]) -> None:
        tool = payload.get("start", {}).get("toolUse")
        if tool is not None:
            self._tools[payload["contentBlockIndex"]] = (tool["toolUseId"], tool["name"], [])

    def _block_stop(self, payload: dict[str, Any]) -> ModelEvent | None:
        block = self._tools.pop(payload.get("contentBlockIndex", -1), None)
        if block is None:
            return None
        tool_use_id, name, fragments = block
        raw = "".join(fragments)
        tool_input = json.loads(raw) if raw.strip() else {}
        if not isinstance(tool_input, dict):
            raise TypeError("tool input is not a JSON object")
        return ToolUse(tool_use_id=tool_use_id, name=name, input=tool_input)

    def _message_stop(self, payload: dict[str, Any]) -> ModelEvent:
        # Every stopReason passes through (end_turn, tool_use, max_tokens, stop_sequence, guardrail_intervened,
        # content_filtered, malformed_model_output, malformed_tool_use, model_context_window_exceeded, and any
        # added later): the answer so far is valid and the chat layer records why it ended.
        self.stop_reason = str(payload["stopReason"])
        return Stop(self.stop_reason)

    def _metadata(self, payload: dict[str, Any]) -> ModelEvent | None:
        usage = payload.get("usage")
        if not usage:
            return None
        return Usage(int(usage.get("inputTokens", 0)), int(usage.get("outputTokens", 0)))


# Events other than contentBlockDelta; messageStart carries only the role, and unknown events are skipped.
_HANDLERS: dict[str, Callable[[ConverseStreamDecoder, dict[str, Any]], ModelEvent | None]] = {
    "contentBlockStart": ConverseStreamDecoder._block_start,
    "contentBlockStop": ConverseStreamDecoder._block_stop,
    "messageStop": ConverseStreamDecoder._message_stop,
    "metadata": ConverseStreamDecoder._metadata,
}


def _flush(text: list[str], events: list[ModelEvent]) -> None:
    if text:
        # A NUL is valid JSON text but no PostgreSQL text can hold it: shown as U+FFFD, the same on both stores.
        joined = "".join(text).replace("\x00", "\ufffd")
        text.clear()
        if joined:
            events.append(TextDelta(joined))


def _frame_error(headers: dict[str, Any], payload: bytes) -> AppError:
    """An ``exception`` frame (modeled: ``:exception-type``) or an ``error`` frame (unmodeled: ``:error-code``)."""
    if headers.get(":message-type") == "exception":
        try:
            message = str(json.loads(payload or b"{}").get("message", ""))
        except (ValueError, AttributeError):
            message = ""
        return bedrock_error(str(headers.get(":exception-type", "")), None, message)
    return bedrock_error(str(headers.get(":error-code", "")), None, str(headers.get(":error-message", "")))


class _Reader:
    """One open response: reads under the first-event and idle deadlines and feeds the decoder.

    The deadlines are one ``Deadline`` per stream (services/deadline.py), not a timeout per network read: a frame
    only moves it forward. When it passes, the waiting read is interrupted.
    """

    __slots__ = ("__weakref__", "_deadline", "_idle", "_loop", "_response", "decoder")

    def __init__(self, response: StreamResponse, first_event_deadline: float, idle_timeout: float) -> None:
        self._response = response
        self._idle = idle_timeout
        self._loop = asyncio.get_running_loop()
        self.decoder = ConverseStreamDecoder()
        self._deadline = Deadline(self._expired, first_event_deadline)
        self._deadline.arm()

    def _expired(self) -> None:
        self._response.interrupt(_DeadlinePassed())  # a waiting read ends; the next one checks the clock

    async def read(self) -> list[ModelEvent] | None:
        """The events of the next network read, or None at the end of the body."""
        deadline = self._deadline
        if not deadline.armed:
            # The deadline passed while no read waited. Bytes that arrived meanwhile still count: the stream was
            # not idle, only this side was busy.
            if self._loop.time() >= deadline.at and not self._response.ready:
                raise self._timed_out()
            deadline.arm()
        try:
            data = await self._response.read()
        except _DeadlinePassed:
            raise self._timed_out() from None
        except StreamClientError as exc:
            raise _transport_error(exc) from exc
        if not data:
            return None
        frames = self.decoder.frames
        events = self.decoder.feed(data)
        if self.decoder.frames != frames:
            deadline.move(self._loop.time() + self._idle)
        return events

    async def first_events(self) -> list[ModelEvent]:
        """Read until there is something to show the user; everything before that can still be retried."""
        while True:
            events = await self.read()
            if events is None:
                raise failure("MODEL_STREAM_INCOMPLETE", "Bedrock ended the stream before any output.")
            if events:
                return events
            if self.decoder.failure is not None:
                raise self.decoder.failure

    def finish(self) -> None:
        if self.decoder.stop_reason is None:
            raise failure("MODEL_STREAM_INCOMPLETE", "Bedrock's stream ended without messageStop.")

    def _timed_out(self) -> AppError:
        if self.decoder.frames == 0:
            return failure("MODEL_TIMEOUT", "Bedrock sent no event within BEDROCK_FIRST_EVENT_TIMEOUT.")
        return failure("MODEL_TIMEOUT", "Bedrock's stream stalled for longer than BEDROCK_IDLE_TIMEOUT.")

    def close(self) -> None:
        # Synchronous, so a client disconnect cancelling the stream cannot interrupt it: closing the connection
        # mid-body is what tells Bedrock to stop generating.
        self._deadline.cancel()
        self._response.close()


class _DeadlinePassed(ReadInterrupted):
    """The first-event or idle deadline passed while a read waited (never leaves this module)."""


async def _error_body(response: StreamResponse) -> dict[str, Any]:
    raw = b""
    while chunk := await response.read():
        raw += chunk
        if len(raw) > MAX_ERROR_BODY:
            return {}
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


# -- the model -----------------------------------------------------------------------------------------------------


class BedrockModel:
    """``ChatModel`` for Amazon Bedrock's ConverseStream; one per process, created at startup, closed on shutdown."""

    provider = "bedrock"
    is_llm = True

    def __init__(self, settings: Settings, *, credentials: Credentials | None = None) -> None:
        self.model_id = settings.bedrock_model_id
        self._region = settings.aws_region
        endpoint = endpoint_url(settings)
        if not endpoint.startswith(("https://", "http://")):
            raise ConfigError("BEDROCK_ENDPOINT_URL must start with https:// or http://")
        self._models = (self.model_id, *settings.bedrock_fallback_model_ids)  # in the order they are tried
        self._paths = {model_id: model_path(model_id) for model_id in self._models}
        self._endpoint = endpoint  # + a model's path: the URL SigV4 signs
        self._max_tokens = settings.bedrock_max_tokens
        self._temperature = settings.bedrock_temperature
        self._first_event_timeout = settings.bedrock_first_event_timeout
        self._idle_timeout = settings.bedrock_idle_timeout
        self._retry = RetryPolicy.from_settings(settings)
        self._credentials = CredentialCache(credentials)
        # No cap on connections: every open stream holds one, and a cap would queue streams behind each other.
        # Idle ones expire after 30 s; Bedrock's own idle timeout is longer.
        self._client = StreamClient(
            endpoint,
            connect_timeout=settings.bedrock_connect_timeout,
            keepalive_expiry=30.0,
            ssl_context=httpx.create_ssl_context(),  # the CA bundle the rest of the service trusts (certifi)
        )
        self._opening = asyncio.Semaphore(OPENING_AT_ONCE)

    @property
    def configured(self) -> bool:
        """Whether AWS credentials could be resolved (last checked at startup or on the latest request)."""
        return self._credentials.available

    async def open(self) -> None:
        """Resolve credentials at startup, so a deployment without them says so in its log and in /health."""
        try:
            await self._credentials.get()
        except AppError as exc:
            logger.warning("Bedrock credentials are not available (%s); chat turns will fail until they are", exc.code)

    async def aclose(self) -> None:
        self._client.close()

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        # The body is not kept in this generator's frame: it would stay in memory for the whole answer.
        attempt = partial(self._first_answer, request_body(request, self._max_tokens, self._temperature))
        model_id, reader, events = await with_retry(attempt, self._retry, what="Bedrock ConverseStream")
        del attempt
        try:
            yield ModelUsed(model_id)
            decoder = reader.decoder
            while events is not None:
                for event in events:
                    yield event
                if decoder.failure is not None:
                    raise decoder.failure
                events = await reader.read()
            reader.finish()
        finally:
            reader.close()

    async def _first_answer(self, body: bytes) -> tuple[str, _Reader, list[ModelEvent]]:
        """One attempt: the configured model, then each fallback at once while the one before fails in a way
        another model may not (the module docstring says why at once, and how this combines with retries)."""
        for model_id, fallback in zip(self._models, self._models[1:]):
            try:
                return await self._call(model_id, body)
            except AppError as exc:
                if not falls_back(exc):
                    raise
                logger.warning("Bedrock model %s failed with %s before any output; trying %s", model_id, exc.code,
                               fallback)
        return await self._call(self._models[-1], body)

    async def _call(self, model_id: str, body: bytes) -> tuple[str, _Reader, list[ModelEvent]]:
        try:
            reader, events = await self._open(model_id, body)
        except AppError as exc:
            record_model_call(model_id, exc.code)
            raise
        record_model_call(model_id, "answered")
        return model_id, reader, events

    async def _open(self, model_id: str, body: bytes) -> tuple[_Reader, list[ModelEvent]]:
        """One model's attempt: sign, send, check the status and read up to the first output. Safe to retry."""
        credentials = await self._credentials.get()
        path = self._paths[model_id]
        # Admission: a burst of turns queues here, before the request is signed or any deadline starts, so the streams
        # that do open are not starved by the rest of the burst into timing out (see OPENING_AT_ONCE). The slot is
        # held until Bedrock's response headers arrive, not while the model thinks.
        async with self._opening:
            headers = signed_headers(self._endpoint + path, body, credentials, self._region)
            deadline = asyncio.get_running_loop().time() + self._first_event_timeout
            response = await self._send(path, headers, body, deadline)
        try:
            if response.status != 200:
                raise await self._http_error(model_id, response, deadline)
            if not response.headers.get("content-type", "").startswith(EVENT_STREAM_TYPE):
                raise failure("MODEL_STREAM_ERROR", "Bedrock answered 200 without an event stream.")
        except BaseException:
            response.close()
            raise
        reader = _Reader(response, deadline, self._idle_timeout)
        try:
            return reader, await reader.first_events()
        except BaseException:
            reader.close()
            raise

    async def _send(self, path: str, headers: dict[str, str], body: bytes, deadline: float) -> StreamResponse:
        try:
            async with asyncio.timeout_at(deadline):
                return await self._client.post(path, headers, body)
        except TimeoutError:
            raise failure("MODEL_TIMEOUT", "Bedrock sent no response within BEDROCK_FIRST_EVENT_TIMEOUT.") from None
        except StreamClientError as exc:
            raise _transport_error(exc) from exc

    async def _http_error(self, model_id: str, response: StreamResponse, deadline: float) -> AppError:
        """An error before the stream: the type from ``x-amzn-ErrorType`` (as botocore reads it), else the body."""
        body: dict[str, Any] = {}
        try:
            async with asyncio.timeout_at(deadline):
                body = await _error_body(response)
        except (TimeoutError, StreamClientError):
            pass  # the status and header are enough to classify the failure
        error_type = response.headers.get("x-amzn-errortype") or str(body.get("__type") or body.get("code") or "")
        message = str(body.get("message") or body.get("Message") or "")
        error = bedrock_error(error_type, response.status, message)
        logger.warning(
            "Bedrock answered HTTP %s for %s: %s (request id %s)",
            response.status,
            model_id,
            error.code,
            response.headers.get("x-amzn-requestid", "-"),
        )
        return error
