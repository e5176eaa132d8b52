"""Amazon Bedrock ConverseStream over one shared async HTTP client: the ``ChatModel`` behind ``LLM_PROVIDER=bedrock``.

Why raw HTTP instead of boto3: boto3 is synchronous, so every open stream would hold a thread (Strands does this
with ``asyncio.to_thread``). Here a stream is one HTTP/1.1 request (``services/model/stream_client.py``) signed with
botocore's ``SigV4Auth`` and one ``EventStreamBuffer`` that decodes frames as bytes arrive, so thousands of streams
need no threads at all. Only resolving or refreshing credentials, which may do network I/O (IMDS, STS, SSO), runs
in a worker thread.

A call has two phases. Until the first model event that would reach the user (text, a tool call, a stop), the call
is invisible, so the whole attempt (send, HTTP status, in-stream exception frames, time to first event) is retried
under ``services/retry.py``. After that nothing is retried, so a retry can never duplicate text; later failures end
the stream with a typed error and the chat layer saves the partial answer (after ``messageStop`` they are only logged:
the answer is whole).

Fallbacks (``BEDROCK_FALLBACK_MODEL_IDS``, docs/production.md) live in the first phase too: one attempt walks the
list, trying the next model at once while the one before fails in a way another may not (``Failure.falls_back``);
only when the last one fails too does the retry policy pause and start again. Why not retries per model: a throttled
model's backoff is exactly the wait a fallback exists to avoid, and they would multiply the attempts and the wait for
the first token. A fallback that refuses the request itself is passed over, and none starts once the call has waited
its time (``_first_answer``). The model that answered is the stream's first event (``ModelUsed``).

Every Bedrock failure becomes one of our ``AppError``s through ``FAILURES`` (``bedrock_errors.py``; the table in
docs/production.md, "Production: Amazon Bedrock"). The request and the event stream's decoding are ``converse.py``;
this module sends, reads, retries and falls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import botocore.session
import httpx
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from botocore.exceptions import BotoCoreError, ClientError

from errors import AppError
from services.deadline import Deadline
from services.metrics import record_model_call
from services.model import ModelEvent, ModelRequest, ModelUsed
from services.model.bedrock_errors import bedrock_error, failure, falls_back, transport_error
from services.model.converse import (EVENT_STREAM_TYPE, ConverseStreamDecoder, endpoint_url, model_path, request_body,
                                     signed_headers)
from services.model.stream_client import ReadInterrupted, StreamClient, StreamClientError, StreamResponse
from services.retry import RetryPolicy, with_retry
from settings import ConfigError, Settings

logger = logging.getLogger(__name__)

# Streams being opened at once (connect and request, up to Bedrock's response headers). More turns than this wait in
# line without a clock running; opening thousands at once (a burst after a deploy, a load test) otherwise puts every
# connect and first-event deadline behind the whole burst's CPU, and those that expire fail though the worker could
# carry them.
OPENING_AT_ONCE = 512

MAX_ERROR_BODY = 64 * 1024  # an error body is a short JSON document; never buffer a misrouted HTML page whole
# During the advisory refresh window botocore keeps valid credentials when a refresh fails; without this pause every
# request would wait for another failing IMDS/STS call while the metadata service is down.
REFRESH_RETRY_SECONDS = 10.0


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
            raise transport_error(exc) from exc
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
        # No fallback starts once the call has waited this long: each model may take a first-event timeout to fail,
        # and a pass over six of them would otherwise keep the user waiting six (docs/production.md, the worst case).
        until = time.monotonic() + max(self._retry.max_total, self._first_event_timeout)
        attempt = partial(self._first_answer, request_body(request, self._max_tokens, self._temperature), until)
        model_id, reader, events = await with_retry(attempt, self._retry, what="Bedrock ConverseStream")
        del attempt
        try:
            yield ModelUsed(model_id)
            decoder = reader.decoder
            try:
                while events is not None:
                    for event in events:
                        yield event
                    if decoder.failure is not None:
                        raise decoder.failure
                    events = await reader.read()
            except AppError as exc:
                if decoder.stop_reason is None:
                    raise
                # messageStop said the answer is whole (only its metadata, the usage, may be missing: the call is
                # then estimated): a stall, reset or exception before the body's end must not fail a finished answer.
                logger.warning("Bedrock's stream failed with %s after messageStop; the answer was whole", exc.code)
                return
            reader.finish()
        finally:
            reader.close()

    async def _first_answer(self, body: bytes, until: float) -> tuple[str, _Reader, list[ModelEvent]]:
        """One attempt: the configured model, then each fallback at once (the module docstring says why).

        A fallback that refuses the request itself (an error not retryable: access denied, not enabled, a smaller
        context window) is passed over, and logged as the configuration problem it is: the configured model was only
        busy, so if every model fails the call ends with a busy model's retryable error, never with a "configuration
        problem" or "start a new conversation" that the configured model would not have given. No fallback starts
        after ``until`` (``stream`` says why)."""
        failed: AppError | None = None  # the latest error that moves the call down the list
        for index, model_id in enumerate(self._models):
            try:
                return await self._call(model_id, body)
            except AppError as exc:
                if failed is not None and not exc.retryable:
                    logger.error("Bedrock fallback model %s refused the request with %s; passed over (check its "
                                 "access and limits)", model_id, exc.code)
                elif not falls_back(exc):
                    raise
                else:
                    failed = exc
                if index + 1 == len(self._models):
                    break
                if time.monotonic() >= until:
                    logger.warning("Bedrock model %s failed with %s before any output; too late to try %s",
                                   model_id, exc.code, self._models[index + 1])
                    break
                logger.warning("Bedrock model %s failed with %s before any output; trying %s", model_id, exc.code,
                               self._models[index + 1])
        assert failed is not None  # the configured model's error at least: a refusal of its own is raised above
        raise failed

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
            raise transport_error(exc) from exc

    async def _http_error(self, model_id: str, response: StreamResponse, deadline: float) -> AppError:
        """An error before the stream: the type from ``x-amzn-ErrorType`` (as botocore reads it), else the body."""
        body: dict[str, Any] = {}
        with contextlib.suppress(TimeoutError, StreamClientError):  # the status and header are enough to classify it
            async with asyncio.timeout_at(deadline):
                body = await _error_body(response)
        error_type = response.headers.get("x-amzn-errortype") or str(body.get("__type") or body.get("code") or "")
        message = str(body.get("message") or body.get("Message") or "")
        error = bedrock_error(error_type, response.status, message)
        logger.warning(
            "Bedrock answered HTTP %s for %s: %s (request id %s)", response.status, model_id, error.code,
            response.headers.get("x-amzn-requestid", "-")
        )
        return error
