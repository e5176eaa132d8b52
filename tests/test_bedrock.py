"""LLM_PROVIDER=bedrock against a fake Bedrock on 127.0.0.1 that speaks the real wire format and checks SigV4.

Model-level tests drive ``BedrockModel.stream`` directly; end-to-end tests go through our HTTP API (TestClient when
only the final body matters, a live uvicorn server when timing or disconnects matter) and read back what was stored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import botocore.session
import httpx
import pytest
from botocore.credentials import Credentials, RefreshableCredentials
from botocore.eventstream import EventStream
from botocore.exceptions import CredentialRetrievalError, EventStreamError
from botocore.parsers import EventStreamJSONParser
from starlette.testclient import TestClient

from app import create_app
from errors import AppError
from services.agents.assistant import HANDOFF_TOOL
from services.model import ModelEvent, ModelRequest, ModelUsed, Stop, TextDelta, ToolUse, Usage
from services.model.bedrock import BedrockModel
from services.model.bedrock_errors import BEDROCK_ERRORS, FAILURES
from services.model.build import build_model
from services.model.converse import ConverseStreamDecoder, converse_messages, request_body
from services.runs import manager as runs_module
from settings import Settings
from tests.conftest import AuthHeaders
from tests.fake_bedrock import (
    FakeBedrock,
    Gate,
    Pause,
    Reply,
    block_stop,
    error,
    event,
    exception,
    message_start,
    message_stop,
    metadata,
    text_delta,
    text_reply,
    tool_use,
)
from tests.support import LiveServer, chunks, make_settings, new_id, parse_sse, serve, streamed_text

pytestmark = pytest.mark.anyio

CREDS = Credentials("AKIDCANVALOTEST", "canvalo-test-secret", "canvalo-test-session-token")
HELLO = ModelRequest(system="Be brief.", messages=[{"role": "user", "content": [{"text": "Hi"}]}])
WEATHER_TOOL = {
    "toolSpec": {
        "name": "get_weather",
        "description": "Weather for a city",
        "inputSchema": {"json": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
}


@pytest.fixture
def bedrock_env() -> dict[str, str]:
    """Fast retries and small timeouts. End-to-end fixtures add ``service_env`` (the store and auth under test)."""
    return {
        "LLM_PROVIDER": "bedrock",
        "RETRY_BASE_DELAY": "0.01",
        "RETRY_MAX_DELAY": "0.02",
        "BEDROCK_CONNECT_TIMEOUT": "2",
        "BEDROCK_FIRST_EVENT_TIMEOUT": "3",
        "BEDROCK_IDLE_TIMEOUT": "3",
    }


@pytest.fixture
def fake_bedrock() -> Iterator[tuple[FakeBedrock, LiveServer]]:
    fake = FakeBedrock(credentials=[CREDS])
    with serve(fake) as live:
        yield fake, live


def settings_for(tmp_path: Any, env: dict[str, str], live: LiveServer, **overrides: str) -> Settings:
    return make_settings(tmp_path, **{**env, "BEDROCK_ENDPOINT_URL": live.url, **overrides})


async def collect(model: BedrockModel, request: ModelRequest = HELLO) -> list[ModelEvent]:
    try:
        return [event async for event in model.stream(request)]
    finally:
        await model.aclose()


async def failing(model: BedrockModel, request: ModelRequest = HELLO) -> tuple[AppError, list[ModelEvent]]:
    seen: list[ModelEvent] = []
    with pytest.raises(AppError) as info:
        try:
            async for item in model.stream(request):
                seen.append(item)
        finally:
            await model.aclose()
    return info.value, seen


# -- the fake is faithful ------------------------------------------------------------------------------------------


class _RawStream:
    """What botocore's EventStream reads from: the fake's frames, cut every 37 bytes like a slow network."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self) -> Iterator[bytes]:
        return (self._data[i : i + 37] for i in range(0, len(self._data), 37))

    def close(self) -> None:
        return None


def test_fake_frames_decode_with_botocores_own_parser() -> None:
    usage = {"inputTokens": 412, "outputTokens": 38, "totalTokens": 450}
    tool_start = {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather"}}
    frames = [
        *text_reply("Hel", "lo")[:3],
        *tool_use(1, "tooluse_1", "get_weather", ['{"city": "Par', 'is"}']),
        message_stop("tool_use"),
        metadata(412, 38),
        exception("throttlingException", "Too many tokens"),
    ]
    operation = botocore.session.get_session().get_service_model("bedrock-runtime").operation_model("ConverseStream")
    stream = EventStream(
        _RawStream(b"".join(frames)), operation.get_event_stream_output(), EventStreamJSONParser(), "ConverseStream"
    )
    parsed: list[dict[str, Any]] = []
    with pytest.raises(EventStreamError) as info:
        parsed.extend(stream)
    assert parsed == [
        {"messageStart": {"role": "assistant"}},  # botocore drops the "p" padding, as it does for real Bedrock
        {"contentBlockDelta": {"contentBlockIndex": 0, "delta": {"text": "Hel"}}},
        {"contentBlockDelta": {"contentBlockIndex": 0, "delta": {"text": "lo"}}},
        {"contentBlockStart": {"contentBlockIndex": 1, "start": tool_start}},
        {"contentBlockDelta": {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"city": "Par'}}}},
        {"contentBlockDelta": {"contentBlockIndex": 1, "delta": {"toolUse": {"input": 'is"}'}}}},
        {"contentBlockStop": {"contentBlockIndex": 1}},
        {"messageStop": {"stopReason": "tool_use"}},
        {"metadata": {"usage": usage, "metrics": {"latencyMs": 42}}},
    ]
    assert info.value.response["Error"] == {"Code": "throttlingException", "Message": "Too many tokens"}


# -- decoding ------------------------------------------------------------------------------------------------------


STOP_REASONS = [
    "end_turn",
    "tool_use",
    "max_tokens",
    "stop_sequence",
    "guardrail_intervened",
    "content_filtered",
    "malformed_model_output",
    "malformed_tool_use",
    "model_context_window_exceeded",
]


@pytest.mark.parametrize("reason", STOP_REASONS)
def test_every_stop_reason_ends_the_stream_with_that_reason(reason: str) -> None:
    decoder = ConverseStreamDecoder()
    events = decoder.feed(b"".join(text_reply("Hello", " world", stop_reason=reason)))
    assert events == [TextDelta("Hello world"), Stop(reason), Usage(12, 7)]
    assert decoder.failure is None


def test_frames_split_anywhere_decode_the_same_and_unknown_events_and_fields_are_ignored() -> None:
    frames = [
        message_start(),
        event("contentBlockStart", {"contentBlockIndex": 0, "start": {}}),  # a text block announced, as some models do
        text_delta("Hel"),
        event("futureEvent", {"anything": 1}),
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "hmm"}}}),
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "lo"}, "newField": True}),
        block_stop(),
        event("messageStop", {"stopReason": "end_turn", "additionalModelResponseFields": {"x": 1}}),
        metadata(3, 2),
    ]
    data = b"".join(frames)
    decoder = ConverseStreamDecoder()
    events = [e for i in range(0, len(data), 7) for e in decoder.feed(data[i : i + 7])]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello"
    assert [e for e in events if not isinstance(e, TextDelta)] == [Stop("end_turn"), Usage(3, 2)]
    assert decoder.failure is None


def test_a_corrupt_frame_keeps_the_text_before_it_and_fails_the_stream() -> None:
    corrupt = bytearray(text_delta("lost"))
    corrupt[-1] ^= 0xFF  # break the message CRC
    decoder = ConverseStreamDecoder()
    assert decoder.feed(message_start() + text_delta("kept") + bytes(corrupt)) == [TextDelta("kept")]
    assert decoder.failure is not None and decoder.failure.code == "MODEL_STREAM_ERROR"


# What a model can send that no store keeps or no encoder writes: half of a surrogate pair (the JSON escape \\ud83d,
# as a UTF-16 based encoder writes half an emoji), alone, and NUL.
UNSTORABLE = {"high-surrogate": "\ud83d", "low-surrogate": "\ude00", "nul": "\x00"}


def _strings(value: Any) -> Iterator[str]:
    """Every string in decoded events, dict keys included."""
    if isinstance(value, str):
        yield value
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from _strings(getattr(value, field.name))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@pytest.mark.parametrize("bad", UNSTORABLE.values(), ids=UNSTORABLE.keys())
def test_every_string_the_model_sends_leaves_the_decoder_as_text_both_stores_keep(bad: str) -> None:
    frames = [
        message_start(), text_delta(f"a{bad}b"), block_stop(),
        *tool_use(1, f"id{bad}", f"tool{bad}", [json.dumps({f"key{bad}": [f"value{bad}"]})]),
        message_stop(f"end{bad}turn"), metadata(),
    ]
    decoder = ConverseStreamDecoder()
    events = decoder.feed(b"".join(frames))
    assert decoder.failure is None
    text, tool, stop, _ = events
    assert text == TextDelta("a\ufffdb") and stop == Stop("end\ufffdturn") and decoder.stop_reason == "end\ufffdturn"
    assert isinstance(tool, ToolUse) and (tool.tool_use_id, tool.name) == ("id\ufffd", "tool\ufffd")
    # The input keeps a NUL, for the tool to refuse to the model (services/agents/tools.py); not a lone surrogate.
    kept = "\x00" if bad == "\x00" else "\ufffd"
    assert tool.input == {f"key{kept}": [f"value{kept}"]}
    for string in _strings(events):
        string.encode()  # UTF-8, as SQLite binds it, httpx sends it and web/sse.py writes it
        assert "\x00" not in string or string in (f"key{kept}", f"value{kept}")


def test_a_number_json_cannot_write_stays_the_models_text_and_the_next_request_is_json() -> None:
    """json.loads takes NaN and Infinity, and reads 1e400 as infinity; the tool refuses them, but the input goes back to
    Bedrock in the next request, whose body must be JSON (RFC 8259; Bedrock parses strictly)."""
    raw = '{"changes": {"amount_paid": NaN, "line_items": [{"price": 1e400, "qty": -Infinity, "unit": 2.5}]}}'
    decoder = ConverseStreamDecoder()
    (tool,) = [e for e in decoder.feed(b"".join(tool_use(1, "t1", "update_invoice", [raw]))) if isinstance(e, ToolUse)]
    assert tool.input == {"changes": {"amount_paid": "NaN",
                                      "line_items": [{"price": "1e400", "qty": "-Infinity", "unit": 2.5}]}}
    turn = [{"role": "user", "content": [{"text": "pay"}]},
            {"role": "assistant",
             "content": [{"toolUse": {"toolUseId": "t1", "name": tool.name, "input": tool.input}}]},
            {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [{"json": {"error": "no"}}],
                                                          "status": "error"}}]}]
    json.loads(request_body(ModelRequest("system", turn, []), 100, 0.0), parse_constant=_not_json)


def test_a_request_holding_a_number_json_cannot_write_is_never_sent() -> None:
    turn = [{"role": "user", "content": [{"toolResult": {"toolUseId": "t", "content": [{"json": {"x": float("nan")}}],
                                                          "status": "success"}}]}]
    with pytest.raises(ValueError):
        request_body(ModelRequest("system", turn, []), 100, 0.0)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


@pytest.mark.parametrize("step", [1, 7, 10_000], ids=["every-byte", "every-7-bytes", "one-read"])
def test_a_surrogate_pair_split_between_two_deltas_arrives_whole(step: int) -> None:
    frames = [
        message_start(), text_delta("Hi \ud83d"), text_delta("\ude00 there"), block_stop(),
        *tool_use(1, "t1", "note", ['{"text": "\ud83d', '\ude00"}']),  # raw halves: the outer JSON escapes each
        text_delta("lone \ud83d", 2), message_stop(), metadata(),
    ]
    data = b"".join(frames)
    decoder = ConverseStreamDecoder()
    events = [e for i in range(0, len(data), step) for e in decoder.feed(data[i : i + step])]
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(texts) == "Hi \U0001f600 therelone \ufffd"  # the last half never met its pair: shown before the stop
    assert all(text.encode() for text in texts)
    assert [e.input for e in events if isinstance(e, ToolUse)] == [{"text": "\U0001f600"}]
    assert [e for e in events if not isinstance(e, (TextDelta, ToolUse))] == [Stop("end_turn"), Usage(12, 7)]


CALL = {"toolUse": {"toolUseId": "t1", "name": "x", "input": {}}}
RESULT = {"toolResult": {"toolUseId": "t1", "content": [{"json": {"ok": True}}]}}


def test_every_bedrock_failure_in_the_issue_has_a_row_in_the_error_table() -> None:
    listed = [
        "ThrottlingException", "ModelTimeoutException", "ServiceUnavailableException", "InternalServerException",
        "ModelStreamErrorException", "ValidationException", "AccessDeniedException", "ResourceNotFoundException",
        "ModelNotReadyException", "ExpiredTokenException", "UnrecognizedClientException",
    ]
    assert all(name.lower() in BEDROCK_ERRORS for name in listed)
    ours = {"MODEL_INPUT_TOO_LONG", "MODEL_NOT_ENABLED", "MODEL_CREDENTIALS_MISSING", "MODEL_NETWORK_ERROR",
            "MODEL_STREAM_INCOMPLETE", "MODEL_TIMEOUT"}
    assert set(BEDROCK_ERRORS.values()) | ours == set(FAILURES)
    for row in FAILURES.values():
        assert row.user_message.endswith(".") and row.suggested_actions and row.code.startswith("MODEL_")


def test_history_is_made_valid_for_bedrock() -> None:
    messages = [
        {"role": "assistant", "content": [{"text": "A greeting nobody asked for"}]},
        {"role": "user", "content": [{"text": "first"}]},
        {"role": "user", "content": [{"text": "   "}, {"text": "second"}]},
        {"role": "assistant", "content": [{"text": ""}]},
        {"role": "assistant", "content": [{"text": "answer"}, CALL]},
        {"role": "user", "content": [RESULT]},
        {"role": "assistant", "content": [{"text": "dangling"}]},
    ]
    assert converse_messages(messages) == [
        {"role": "user", "content": [{"text": "first"}, {"text": "second"}]},
        {"role": "assistant", "content": [{"text": "answer"}, CALL]},
        {"role": "user", "content": [RESULT]},
    ]


# -- the model over HTTP ---------------------------------------------------------------------------------------------


async def test_text_streams_per_read_from_a_signed_converse_request(
    tmp_path: Any, bedrock_env: dict[str, str], fake_bedrock: tuple[FakeBedrock, LiveServer]
) -> None:
    fake, live = fake_bedrock
    fake.replies = [
        Reply.stream(
            [message_start(), text_delta("Hel"), text_delta("lo")],  # one write: must come out as one TextDelta
            Pause(0.05),
            [text_delta(", world"), block_stop(), message_stop(), metadata(20, 4)],
        )
    ]
    settings = settings_for(tmp_path, bedrock_env, live, BEDROCK_MAX_TOKENS="321", BEDROCK_TEMPERATURE="0.5")
    events = await collect(BedrockModel(settings, credentials=CREDS))
    assert events == [ModelUsed("amazon.nova-lite-v1:0"), TextDelta("Hello"), TextDelta(", world"), Stop("end_turn"),
                      Usage(20, 4)]
    (request,) = fake.requests
    assert request.auth_error is None  # the fake recomputed the SigV4 signature with the test secret
    assert request.model_id == "amazon.nova-lite-v1:0"
    assert request.headers["x-amz-security-token"] == CREDS.token
    assert request.headers["content-type"] == "application/json"
    assert request.body == {
        "messages": [{"role": "user", "content": [{"text": "Hi"}]}],
        "inferenceConfig": {"maxTokens": 321, "temperature": 0.5},
        "system": [{"text": "Be brief."}],
    }


async def test_tool_use_input_is_assembled_from_fragments(
    tmp_path: Any, bedrock_env: dict[str, str], fake_bedrock: tuple[FakeBedrock, LiveServer]
) -> None:
    fake, live = fake_bedrock
    start, first, second, stop = tool_use(1, "tooluse_42", "get_weather", ['{"city": "Pa', 'ris", "days": [1, 2]}'])
    fake.replies = [
        Reply.stream(
            [message_start(), text_delta("Let me check."), block_stop(0), start, first],
            Pause(0.03),
            [second, stop, message_stop("tool_use"), metadata(30, 9)],
        )
    ]
    request = ModelRequest(system="", messages=HELLO.messages, tools=[WEATHER_TOOL])
    events = await collect(BedrockModel(settings_for(tmp_path, bedrock_env, live), credentials=CREDS), request)
    assert events == [
        ModelUsed("amazon.nova-lite-v1:0"),
        TextDelta("Let me check."),
        ToolUse(tool_use_id="tooluse_42", name="get_weather", input={"city": "Paris", "days": [1, 2]}),
        Stop("tool_use"),
        Usage(30, 9),
    ]
    body = fake.requests[0].body
    assert body["toolConfig"] == {"tools": [WEATHER_TOOL]}
    assert "system" not in body  # Bedrock rejects an empty system text block


@pytest.mark.parametrize(
    ("model_id", "raw_path"),
    [
        ("amazon.nova-lite-v1:0", "/model/amazon.nova-lite-v1%3A0/converse-stream"),
        ("us.amazon.nova-lite-v1:0", "/model/us.amazon.nova-lite-v1%3A0/converse-stream"),
        (
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.amazon.nova-lite-v1:0",
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.amazon.nova-lite-v1%3A0"
            "/converse-stream",
        ),
        (
            "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-lite-v1:0",
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A%3Afoundation-model%2Famazon.nova-lite-v1%3A0/converse-stream",
        ),
    ],
)
async def test_every_model_id_form_is_one_encoded_segment_and_signs_correctly(
    tmp_path: Any,
    bedrock_env: dict[str, str],
    fake_bedrock: tuple[FakeBedrock, LiveServer],
    model_id: str,
    raw_path: str,
) -> None:
    fake, live = fake_bedrock
    settings = settings_for(tmp_path, bedrock_env, live, BEDROCK_MODEL_ID=model_id)
    assert await collect(BedrockModel(settings, credentials=CREDS))
    (request,) = fake.requests
    assert (request.raw_path, request.model_id, request.auth_error) == (raw_path, model_id, None)


HTTP_ERRORS = [
    # status, Bedrock error type, Bedrock message, our code, attempts made (3 = retried, 1 = not retried)
    (429, "ThrottlingException", "Too many tokens, please wait before trying again.", "MODEL_THROTTLED", 3),
    (408, "ModelTimeoutException", "Model timed out.", "MODEL_TIMEOUT", 3),
    (503, "ServiceUnavailableException", "Service unavailable.", "MODEL_UNAVAILABLE", 3),
    (500, "InternalServerException", "Internal error.", "MODEL_INTERNAL_ERROR", 3),
    (429, "ModelNotReadyException", "Model is not ready.", "MODEL_NOT_READY", 3),
    (400, "ValidationException", "Input is too long for requested model.", "MODEL_INPUT_TOO_LONG", 1),
    (400, "ValidationException", "A conversation must alternate between user and assistant roles.",
     "MODEL_REQUEST_REJECTED", 1),
    (403, "AccessDeniedException", "You don't have access to the model with the specified model ID.",
     "MODEL_NOT_ENABLED", 1),
    (403, "AccessDeniedException", "User is not authorized to perform: bedrock:InvokeModelWithResponseStream",
     "MODEL_ACCESS_DENIED", 1),
    (404, "ResourceNotFoundException", "Model not found.", "MODEL_NOT_FOUND", 1),
    (424, "ModelErrorException", "The model failed.", "MODEL_ERROR", 1),
    (403, "ExpiredTokenException", "The security token included in the request is expired",
     "MODEL_CREDENTIALS_EXPIRED", 1),
    (502, "SomethingNewException", "Bad gateway.", "MODEL_INTERNAL_ERROR", 3),
]


@pytest.mark.parametrize(("status", "error_type", "message", "code", "attempts"), HTTP_ERRORS)
async def test_http_errors_become_our_errors_and_only_transient_ones_are_retried(
    tmp_path: Any,
    bedrock_env: dict[str, str],
    fake_bedrock: tuple[FakeBedrock, LiveServer],
    status: int,
    error_type: str,
    message: str,
    code: str,
    attempts: int,
) -> None:
    fake, live = fake_bedrock
    fake.replies = [Reply.http_error(status, error_type, message)]
    error_, seen = await failing(BedrockModel(settings_for(tmp_path, bedrock_env, live), credentials=CREDS))
    assert (error_.code, error_.retryable, len(fake.requests)) == (code, attempts > 1, attempts)
    assert error_.user_message == FAILURES[code].user_message and error_.suggested_actions
    assert message not in error_.message  # Bedrock's own text never reaches a client
    assert seen == []


IN_STREAM_FAILURES = [
    # frames before the failure (no text yet, so retrying is safe), our code, attempts
    ([message_start(), exception("throttlingException", "slow down")], "MODEL_THROTTLED", 3),
    ([message_start(), exception("modelStreamErrorException", "boom")], "MODEL_STREAM_ERROR", 3),
    ([exception("internalServerException", "oops")], "MODEL_INTERNAL_ERROR", 3),
    ([exception("serviceUnavailableException", "down")], "MODEL_UNAVAILABLE", 3),
    ([exception("validationException", "Input is too long for requested model.")], "MODEL_INPUT_TOO_LONG", 1),
    ([error("InternalFailure", "unmodeled")], "MODEL_INTERNAL_ERROR", 3),
    ([message_start(), text_delta("cut")[:20]], "MODEL_STREAM_INCOMPLETE", 3),
    ([message_start(), block_stop()], "MODEL_STREAM_INCOMPLETE", 3),
]


@pytest.mark.parametrize(("frames", "code", "attempts"), IN_STREAM_FAILURES)
async def test_failures_inside_the_stream_before_any_text(
    tmp_path: Any,
    bedrock_env: dict[str, str],
    fake_bedrock: tuple[FakeBedrock, LiveServer],
    frames: list[bytes],
    code: str,
    attempts: int,
) -> None:
    fake, live = fake_bedrock
    fake.replies = [Reply.stream(*frames)]
    error_, seen = await failing(BedrockModel(settings_for(tmp_path, bedrock_env, live), credentials=CREDS))
    assert (error_.code, len(fake.requests), seen) == (code, attempts, [])


async def test_a_request_signed_with_other_credentials_is_rejected_and_not_retried(
    tmp_path: Any, bedrock_env: dict[str, str], fake_bedrock: tuple[FakeBedrock, LiveServer]
) -> None:
    fake, live = fake_bedrock
    wrong_secret = Credentials(CREDS.access_key, "not-the-secret", CREDS.token)
    error_, _ = await failing(BedrockModel(settings_for(tmp_path, bedrock_env, live), credentials=wrong_secret))
    assert (error_.code, error_.retryable, len(fake.requests)) == ("MODEL_CREDENTIALS_INVALID", False, 1)
    assert fake.requests[0].auth_error == "InvalidSignatureException"


def _refreshable(refresh: Any, expires_in: timedelta) -> RefreshableCredentials:
    expiry = (datetime.now(timezone.utc) + expires_in).isoformat()
    metadata_ = {"access_key": "AKIDOLD", "secret_key": "old", "token": "old-token", "expiry_time": expiry}
    return RefreshableCredentials.create_from_metadata(metadata_, refresh_using=refresh, method="test")


async def test_credentials_near_expiry_are_refreshed_off_the_event_loop(
    tmp_path: Any, bedrock_env: dict[str, str], fake_bedrock: tuple[FakeBedrock, LiveServer]
) -> None:
    fake, live = fake_bedrock
    fresh = Credentials("AKIDREFRESHED", "refreshed-secret", "refreshed-token")
    fake.credentials = [fresh]  # only the refreshed keys are accepted
    refresh_threads: list[int] = []

    def refresh() -> dict[str, str]:
        refresh_threads.append(threading.get_ident())
        expiry = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
        return {"access_key": fresh.access_key, "secret_key": fresh.secret_key, "token": fresh.token,
                "expiry_time": expiry}

    expiring = _refreshable(refresh, timedelta(minutes=5))  # inside botocore's 15-minute advisory window
    model = BedrockModel(settings_for(tmp_path, bedrock_env, live), credentials=expiring)
    try:
        for _ in range(2):
            assert [e async for e in model.stream(HELLO)][-2:] == [Stop("end_turn"), Usage(12, 7)]
    finally:
        await model.aclose()
    assert len(refresh_threads) == 1 and refresh_threads[0] != threading.get_ident()
    assert [r.auth_error for r in fake.requests] == [None, None]


async def test_credentials_that_cannot_be_refreshed_fail_without_calling_bedrock(
    tmp_path: Any, bedrock_env: dict[str, str], fake_bedrock: tuple[FakeBedrock, LiveServer]
) -> None:
    fake, live = fake_bedrock

    def refresh() -> dict[str, str]:
        raise CredentialRetrievalError(provider="test", error_msg="SSO session expired")

    expired = _refreshable(refresh, timedelta(minutes=-1))
    error_, _ = await failing(BedrockModel(settings_for(tmp_path, bedrock_env, live), credentials=expired))
    assert (error_.code, error_.retryable, fake.requests) == ("MODEL_CREDENTIALS_EXPIRED", False, [])


async def test_idle_gap_after_text_times_out_without_a_retry(
    tmp_path: Any, bedrock_env: dict[str, str], fake_bedrock: tuple[FakeBedrock, LiveServer]
) -> None:
    fake, live = fake_bedrock
    fake.replies = [Reply.stream([message_start(), text_delta("Partial")], Pause(2), text_delta(" never"))]
    settings = settings_for(tmp_path, bedrock_env, live, BEDROCK_IDLE_TIMEOUT="0.2")
    error_, seen = await failing(BedrockModel(settings, credentials=CREDS))
    assert (error_.code, error_.retryable, len(fake.requests)) == ("MODEL_TIMEOUT", True, 1)
    assert seen == [ModelUsed("amazon.nova-lite-v1:0"), TextDelta("Partial")]
    # The socket closes on the event loop's next turn, so wait without blocking the loop.
    assert await anyio.to_thread.run_sync(fake.requests[0].closed_early.wait, 2)


async def test_a_busy_reader_is_not_timed_out_for_bytes_that_already_arrived(
    tmp_path: Any, bedrock_env: dict[str, str], fake_bedrock: tuple[FakeBedrock, LiveServer]
) -> None:
    """The idle deadline is about Bedrock going quiet, not about this side taking its time between reads."""
    fake, live = fake_bedrock
    fake.replies = [Reply.stream(text_reply("First", " and the rest"))]
    settings = settings_for(tmp_path, bedrock_env, live, BEDROCK_IDLE_TIMEOUT="0.2")
    model = BedrockModel(settings, credentials=CREDS)
    stream = model.stream(HELLO)
    events = [await stream.__anext__()]
    await anyio.sleep(0.5)  # everything has arrived meanwhile, and the idle deadline has passed
    events += [event async for event in stream]
    await model.aclose()
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "First and the rest"
    assert Stop("end_turn") in events


async def test_open_streams_hold_no_threads(
    tmp_path: Any, bedrock_env: dict[str, str], fake_bedrock: tuple[FakeBedrock, LiveServer]
) -> None:
    fake, live = fake_bedrock
    release = threading.Event()
    fake.replies = [Reply.stream([message_start(), text_delta("Hi")], Gate(release), text_reply("!")[2:])]
    model = BedrockModel(settings_for(tmp_path, bedrock_env, live), credentials=CREDS)
    streams, started = 40, 0
    baseline = threading.active_count()

    async def consume() -> None:
        nonlocal started
        async for item in model.stream(HELLO):
            if item == TextDelta("Hi"):
                started += 1

    try:
        async with anyio.create_task_group() as group:
            for _ in range(streams):
                group.start_soon(consume)
            with anyio.fail_after(10):
                while started < streams:
                    await anyio.sleep(0.01)
            assert threading.active_count() == baseline  # all 40 streams open, not one thread more
            release.set()
    finally:
        release.set()
        await model.aclose()
    assert len(fake.requests) == streams


# -- end to end through our API ----------------------------------------------------------------------------------------


def chat(client: TestClient, auth: AuthHeaders, user: str, conversation: str) -> list[dict[str, Any]]:
    body = {"message": "How are my invoices?", "conversation_id": conversation, "user_id": user, "history": []}
    response = client.post("/api/chat/stream", json=body, headers=auth(user))
    assert response.status_code == 200, response.text
    return chunks(response.text)


def last_message(client: TestClient | httpx.Client, auth: AuthHeaders, user: str, conversation: str) -> dict[str, Any]:
    response = client.get(f"/api/conversations/{conversation}", params={"user_id": user}, headers=auth(user))
    assert response.status_code == 200, response.text
    return response.json()["messages"][-1]  # type: ignore[no-any-return]


@pytest.fixture
def api(
    tmp_path: Any,
    service_env: dict[str, str],
    bedrock_env: dict[str, str],
    fake_bedrock: tuple[FakeBedrock, LiveServer],
) -> Iterator[tuple[TestClient, FakeBedrock]]:
    fake, live = fake_bedrock
    settings = settings_for(tmp_path, {**service_env, **bedrock_env}, live, BEDROCK_FIRST_EVENT_TIMEOUT="0.3")
    with TestClient(create_app(settings, model=BedrockModel(settings, credentials=CREDS))) as client:
        yield client, fake


def test_provider_setting_selects_bedrock(
    tmp_path: Any,
    service_env: dict[str, str],
    bedrock_env: dict[str, str],
    fake_bedrock: tuple[FakeBedrock, LiveServer],
) -> None:
    env = {**service_env, **bedrock_env, "BEDROCK_MODEL_ID": "us.amazon.nova-lite-v1:0"}
    settings = settings_for(tmp_path, env, fake_bedrock[1])
    built = build_model(settings)  # constructing resolves nothing: credentials are resolved at startup (open)
    assert isinstance(built, BedrockModel) and built.model_id == "us.amazon.nova-lite-v1:0"
    # The app gets test credentials: resolving botocore's real chain here could reach the EC2 metadata address.
    with TestClient(create_app(settings, model=BedrockModel(settings, credentials=CREDS))) as client:
        model = client.get("/health").json()["model"]
    assert (model["provider"], model["model_id"], model["is_llm"]) == ("bedrock", "us.amazon.nova-lite-v1:0", True)
    assert model["configured"] is True


def test_health_says_when_bedrock_credentials_cannot_be_resolved(
    tmp_path: Any,
    service_env: dict[str, str],
    bedrock_env: dict[str, str],
    fake_bedrock: tuple[FakeBedrock, LiveServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refresh() -> dict[str, str]:
        raise CredentialRetrievalError(provider="test", error_msg="SSO session expired")

    settings = settings_for(tmp_path, {**service_env, **bedrock_env}, fake_bedrock[1])
    expired = _refreshable(refresh, timedelta(minutes=-1))
    with caplog.at_level(logging.WARNING), TestClient(
        create_app(settings, model=BedrockModel(settings, credentials=expired))
    ) as client:
        model = client.get("/health").json()["model"]
    assert model["configured"] is False
    assert "MODEL_CREDENTIALS_EXPIRED" in caplog.text  # said at startup, not on the first chat
    assert fake_bedrock[0].requests == []


def test_throttled_then_successful_call_is_retried_without_duplicating_text(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, fake = api
    fake.replies = [
        Reply.http_error(429, "ThrottlingException"),
        Reply.stream(message_start(), exception("throttlingException", "slow down")),
        Reply.stream(*text_reply("Two invoices ", "are overdue.")),
    ]
    conversation = new_id()
    with caplog.at_level(logging.WARNING, logger="services.retry"):
        items = chat(client, auth_headers, user_id, conversation)
    assert streamed_text(items) == "Two invoices are overdue."
    assert items[-1]["type"] == "complete" and len(fake.requests) == 3
    assert [r.message for r in caplog.records if "MODEL_THROTTLED" in r.getMessage()] != []
    assert len([r for r in caplog.records if r.name == "services.retry"]) == 2
    stored = last_message(client, auth_headers, user_id, conversation)
    assert stored["content"] == "Two invoices are overdue."
    assert stored["metadata"]["status"] == "complete"


def test_throttled_every_time_gives_up_after_three_attempts_with_an_error_chunk(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    client, fake = api
    fake.replies = [Reply.http_error(429, "ThrottlingException")]
    conversation = new_id()
    items = chat(client, auth_headers, user_id, conversation)
    assert len(fake.requests) == 3
    assert [i["type"] for i in items] == ["error"]
    assert items[0]["code"] == "MODEL_THROTTLED" and items[0]["retryable"] is True
    assert items[0]["error"] == FAILURES["MODEL_THROTTLED"].user_message
    stored = last_message(client, auth_headers, user_id, conversation)
    assert stored["metadata"]["status"] == "error" and stored["metadata"]["error_code"] == "MODEL_THROTTLED"


def test_exception_frame_mid_stream_keeps_the_partial_answer(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    client, fake = api
    fake.replies = [
        Reply.stream([message_start(), text_delta("You have "), text_delta("three")], Pause(0.05),
                     exception("modelStreamErrorException", "stream broke"))
    ]
    conversation = new_id()
    items = chat(client, auth_headers, user_id, conversation)
    assert len(fake.requests) == 1  # text had reached the client: a retry would repeat it
    assert streamed_text(items) == "You have three"
    assert items[-1]["type"] == "error" and items[-1]["code"] == "MODEL_STREAM_ERROR" and items[-1]["retryable"]
    stored = last_message(client, auth_headers, user_id, conversation)
    assert stored["content"] == "You have three"
    assert stored["metadata"]["status"] == "error" and stored["metadata"]["error_code"] == "MODEL_STREAM_ERROR"


@pytest.mark.parametrize("tail", [message_stop()[:25], b""], ids=["cut-mid-frame", "ended-without-messageStop"])
def test_truncated_stream_is_an_error_not_a_silent_success(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str, tail: bytes
) -> None:
    client, fake = api
    head = [message_start(), text_delta("Cut"), text_delta(" short"), block_stop()]
    fake.replies = [Reply.stream(head, Pause(0.05), tail)]
    conversation = new_id()
    items = chat(client, auth_headers, user_id, conversation)
    assert streamed_text(items) == "Cut short" and len(fake.requests) == 1
    assert items[-1]["type"] == "error" and items[-1]["code"] == "MODEL_STREAM_INCOMPLETE"
    stored = last_message(client, auth_headers, user_id, conversation)
    assert stored["content"] == "Cut short" and stored["metadata"]["status"] == "error"


def test_slow_first_event_times_out_with_a_retryable_error(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    client, fake = api
    fake.replies = [Reply.stream(Pause(3), *text_reply("too late"))]  # BEDROCK_FIRST_EVENT_TIMEOUT is 0.3 here
    started = time.monotonic()
    items = chat(client, auth_headers, user_id, new_id())
    assert time.monotonic() - started < 2.5
    assert [i["type"] for i in items] == ["error"]
    assert items[0]["code"] == "MODEL_TIMEOUT" and items[0]["retryable"] is True
    assert len(fake.requests) == 3
    assert all(r.closed_early.wait(2) for r in fake.requests)  # each timed-out attempt hung up on Bedrock


# -- end to end over a live server: timing and disconnects ---------------------------------------------------------


@pytest.fixture
def live_api(
    tmp_path: Any,
    service_env: dict[str, str],
    bedrock_env: dict[str, str],
    fake_bedrock: tuple[FakeBedrock, LiveServer],
) -> Iterator[tuple[LiveServer, FakeBedrock]]:
    fake, live = fake_bedrock
    settings = settings_for(tmp_path, {**service_env, **bedrock_env}, live)
    with serve(create_app(settings, model=BedrockModel(settings, credentials=CREDS))) as service:
        yield service, fake


def _read_until_token(lines: Iterator[str]) -> dict[str, Any]:
    for line in lines:
        if line.startswith("data:"):
            item = parse_sse(line + "\n\n")[0].json()
            if item["type"] == "token":
                return item
    raise AssertionError("the stream ended before any token")


def test_text_reaches_the_client_as_bedrock_sends_it(
    live_api: tuple[LiveServer, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    service, fake = live_api
    release = threading.Event()
    fake.replies = [Reply.stream([message_start(), text_delta("Hello")], Gate(release), *text_reply(", world")[1:])]
    body = {"message": "Hi", "conversation_id": new_id(), "user_id": user_id, "history": []}
    try:
        with httpx.Client(base_url=service.url, timeout=5) as client:
            with client.stream("POST", "/api/chat/stream", json=body, headers=auth_headers(user_id)) as response:
                lines = response.iter_lines()
                # Bedrock is still holding the rest, so this token can only have been relayed as it arrived.
                assert _read_until_token(lines)["content"] == "Hello"
                release.set()
                rest = chunks("\n".join(lines) + "\n")
    finally:
        release.set()
    assert streamed_text(rest) == ", world" and rest[-1]["type"] == "complete"


def test_stop_closes_the_bedrock_stream_and_keeps_what_was_seen(
    live_api: tuple[LiveServer, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    service, fake = live_api
    never = threading.Event()
    fake.replies = [Reply.stream([message_start(), text_delta("Half an ans")], Gate(never), *text_reply("wer")[1:])]
    conversation = new_id()
    body = {"message": "Hi", "conversation_id": conversation, "user_id": user_id, "history": []}
    try:
        with httpx.Client(base_url=service.url, timeout=5) as client:
            with client.stream("POST", "/api/chat/stream", json=body, headers=auth_headers(user_id)) as response:
                assert _read_until_token(response.iter_lines())["content"] == "Half an ans"
                run_id = response.headers["x-run-id"]
            # Leaving did not stop the answer: Bedrock is still streaming to the service.
            (request,) = fake.requests
            assert not request.closed_early.wait(0.3)
            stop = {"user_id": user_id, "seen_chars": 4}
            stopped = client.post(f"/api/chat/runs/{run_id}/stop", json=stop, headers=auth_headers(user_id)).json()
            # The stop must hang up on Bedrock, not leave the model generating for nobody.
            assert request.closed_early.wait(5)
            stored = last_message(client, auth_headers, user_id, conversation)
    finally:
        never.set()
    assert stored.pop("sibling_ids") == [stored["id"]]  # only a conversation's read carries the siblings
    assert stored == stopped
    assert stored["role"] == "assistant" and stored["content"] == "Half"
    assert stored["metadata"]["status"] == "stopped"


# -- what one answer's model sends costs no other answer anything, on both stores ----------------------------------


def _slow_reply(pieces: int, pause: float) -> Reply:
    steps: list[Any] = [message_start()]
    for i in range(pieces):
        steps += [text_delta(f"w{i} "), Pause(pause)]
    return Reply.stream(*steps, [block_stop(), message_stop(), metadata()])


def _tool_reply(tool_use_id: str, name: str, arguments: dict[str, Any]) -> Reply:
    frames = tool_use(0, tool_use_id, name, [json.dumps(arguments)])
    return Reply.stream([message_start(), *frames, message_stop("tool_use"), metadata()])


SLOW_ANSWER = "".join(f"w{i} " for i in range(30))


def _beside_a_slow_answer(
    service: LiveServer, fake: FakeBedrock, auth_headers: AuthHeaders, replies: list[Reply]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """User A's slow answer (``SLOW_ANSWER``) and, while it streams on the same worker, user B's turn answered by
    ``replies``: both streams as sent, then both answers as stored."""
    fake.replies = [_slow_reply(30, 0.05), *replies]
    users, conversations = [new_id(), new_id()], [new_id(), new_id()]
    streams: dict[int, str] = {}

    def send(i: int) -> None:
        body = {"message": "Hi", "conversation_id": conversations[i], "user_id": users[i]}
        response = httpx.post(f"{service.url}/api/chat/stream", json=body, headers=auth_headers(users[i]), timeout=60)
        streams[i] = response.text

    first = threading.Thread(target=send, args=(0,))
    first.start()
    fake.wait_for_requests(1)
    try:
        send(1)
    finally:
        first.join(60)
    with httpx.Client(base_url=service.url, timeout=10) as client:
        stored = [last_message(client, auth_headers, users[i], conversations[i]) for i in (0, 1)]
    return chunks(streams[0]), chunks(streams[1]), stored[0], stored[1]


def _assert_saved_whole(items: list[dict[str, Any]], stored: dict[str, Any], text: str) -> None:
    assert items[-1]["type"] == "complete", items[-1]
    assert stored["metadata"]["status"] == "complete", stored["metadata"]
    assert stored["content"] == streamed_text(items) == text


def test_a_split_or_lone_surrogate_in_one_answer_is_saved_as_text_and_costs_no_other_answer(
    live_api: tuple[LiveServer, FakeBedrock], auth_headers: AuthHeaders, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs_module, "FINAL_SAVE_SECONDS", 3.0)  # an end the store cannot take fails this sooner
    service, fake = live_api
    # Half an emoji in one read and its other half in the next (a UTF-16 based encoder splits it so), then a half alone.
    answer = Reply.stream([message_start(), text_delta("Hi \ud83d")], Pause(0.05),
                          [text_delta("\ude00 there \udc00!"), block_stop(), message_stop(), metadata()])
    a, b, stored_a, stored_b = _beside_a_slow_answer(service, fake, auth_headers, [answer])
    _assert_saved_whole(a, stored_a, SLOW_ANSWER)
    _assert_saved_whole(b, stored_b, "Hi \U0001f600 there \ufffd!")


@pytest.mark.parametrize("where", ["stop-reason", "tool-name"])
def test_a_nul_in_what_an_answers_metadata_keeps_is_saved_as_text_and_costs_no_other_answer(
    live_api: tuple[LiveServer, FakeBedrock], auth_headers: AuthHeaders, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setattr(runs_module, "FINAL_SAVE_SECONDS", 3.0)
    service, fake = live_api
    if where == "stop-reason":
        replies = [Reply.stream(*text_reply("Short answer.", stop_reason="end\u0000turn"))]
    else:  # the specialist calls a tool by a name holding a NUL: no such tool, and the turn goes on
        replies = [_tool_reply("tooluse_h", HANDOFF_TOOL, {"agent": "invoices"}),
                   _tool_reply("tooluse\u00001", "list_in\u0000voices", {}), Reply.stream(*text_reply("Short answer."))]
    a, b, stored_a, stored_b = _beside_a_slow_answer(service, fake, auth_headers, replies)
    _assert_saved_whole(a, stored_a, SLOW_ANSWER)
    _assert_saved_whole(b, stored_b, "Short answer.")
    if where == "stop-reason":
        assert stored_b["metadata"]["stop_reason"] == b[-1]["stop_reason"] == "end\ufffdturn"
    else:
        assert "list_in\ufffdvoices" in [call["name"] for call in stored_b["metadata"]["tool_calls"]]



@pytest.mark.parametrize(
    ("tail", "events"),
    [
        ([block_stop(), message_stop(), metadata(30, 4)], [Stop("end_turn"), Usage(30, 4)]),
        ([block_stop(), message_stop(), exception("internalServerException", "after the end")], [Stop("end_turn")]),
    ],
    ids=["stalled-after-metadata", "exception-after-messageStop"],
)
async def test_a_failure_after_messagestop_leaves_the_finished_answer_whole(
    tmp_path: Any, bedrock_env: dict[str, str], fake_bedrock: tuple[FakeBedrock, LiveServer], tail: list[bytes],
    events: list[ModelEvent],
) -> None:
    """Bedrock said the answer is whole (messageStop; metadata only counts it): what breaks after that, before the
    body's end (a stall, an exception, a reset), must not turn a finished answer into an error for the user."""
    fake, live = fake_bedrock
    fake.replies = [Reply.stream([message_start(), text_delta("All done."), *tail], Pause(1))]
    settings = settings_for(tmp_path, bedrock_env, live, BEDROCK_IDLE_TIMEOUT="0.2")
    seen = await collect(BedrockModel(settings, credentials=CREDS))
    assert seen == [ModelUsed("amazon.nova-lite-v1:0"), TextDelta("All done."), *events]
    assert len(fake.requests) == 1
