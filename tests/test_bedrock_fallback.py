"""BEDROCK_FALLBACK_MODEL_IDS against the fake Bedrock: which failures move on to the next model, and which never do.

Each model id gets a script of its own (``FakeBedrock.by_model``). The end-to-end tests read back what the client
was sent, what was stored, the metrics and the turn's log line.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from app import create_app
from services.agents.assistant import HANDOFF_TOOL
from services.model import ModelUsed, Stop, TextDelta, Usage
from services.model.bedrock import BedrockModel
from services.model.bedrock_errors import FAILURES
from tests.conftest import AuthHeaders
from tests.fake_bedrock import (
    FakeBedrock,
    Gate,
    Pause,
    Reply,
    exception,
    message_start,
    text_delta,
    text_reply,
)
from tests.support import LiveServer, chunks, new_id, serve, streamed_text
from tests.test_agents_bedrock import tool_reply
from tests.test_bedrock import (  # noqa: F401  (fixtures)
    CREDS,
    bedrock_env,
    chat,
    collect,
    failing,
    fake_bedrock,
    last_message,
    settings_for,
)

pytestmark = pytest.mark.anyio

PRIMARY = "amazon.nova-lite-v1:0"  # BEDROCK_MODEL_ID's default
FIRST = "us.amazon.nova-lite-v1:0"
SECOND = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.amazon.nova-micro-v1:0"
FALLBACKS = {"BEDROCK_FALLBACK_MODEL_IDS": f"{FIRST}, {SECOND}"}
TOKEN = "metrics-token-0123456789"

THROTTLED = Reply.http_error(429, "ThrottlingException", "Too many tokens, please wait before trying again.")


def answer(text: str, usage: tuple[int, int] = (12, 7)) -> Reply:
    return Reply.stream(text_reply(text, usage=usage))


def models_called(fake: FakeBedrock) -> list[str]:
    return [r.model_id for r in fake.requests]


@pytest.fixture
def api(
    tmp_path: Any,
    service_env: dict[str, str],
    bedrock_env: dict[str, str],  # noqa: F811
    fake_bedrock: tuple[FakeBedrock, LiveServer],  # noqa: F811
) -> Iterator[tuple[TestClient, FakeBedrock]]:
    fake, live = fake_bedrock
    env = {**service_env, **bedrock_env, **FALLBACKS, "METRICS_TOKEN": TOKEN}
    settings = settings_for(tmp_path, env, live, BEDROCK_FIRST_EVENT_TIMEOUT="0.3")
    with TestClient(create_app(settings, model=BedrockModel(settings, credentials=CREDS))) as client:
        yield client, fake


def metric(client: TestClient, name: str, **labels: str) -> float:
    text = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search("^" + re.escape(f"{name}{{{wanted}}}") + r" (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


# -- end to end: what the user gets, what is stored, counted and logged -----------------------------------------------


def test_a_throttled_model_hands_the_turn_to_the_first_fallback(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, fake = api
    fake.by_model = {PRIMARY: [THROTTLED], FIRST: [answer("Two invoices are overdue.")]}
    conversation = new_id()
    with caplog.at_level(logging.INFO):
        items = chat(client, auth_headers, user_id, conversation)
    assert streamed_text(items) == "Two invoices are overdue." and items[-1]["type"] == "complete"
    assert models_called(fake) == [PRIMARY, FIRST]  # at once: no retry of the throttled model first
    stored = last_message(client, auth_headers, user_id, conversation)
    assert stored["content"] == "Two invoices are overdue."
    assert stored["metadata"]["status"] == "complete" and stored["metadata"]["model_id"] == FIRST
    assert "model_ids" not in stored["metadata"]  # one model answered the whole turn
    ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Chat run ended")]
    assert len(ended) == 1 and "status=complete" in ended[0] and f"model={FIRST} " in ended[0]


def test_a_failing_model_and_a_throttled_fallback_leave_the_turn_to_the_second_fallback(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    client, fake = api
    fake.by_model = {
        PRIMARY: [Reply.http_error(500, "InternalServerException")],
        FIRST: [THROTTLED],
        SECOND: [answer("From the second fallback.")],
    }
    conversation = new_id()
    items = chat(client, auth_headers, user_id, conversation)
    assert streamed_text(items) == "From the second fallback." and items[-1]["type"] == "complete"
    assert models_called(fake) == [PRIMARY, FIRST, SECOND]
    assert fake.requests[2].raw_path.startswith("/model/arn%3Aaws%3Abedrock%3A")  # the ARN is one encoded segment
    stored = last_message(client, auth_headers, user_id, conversation)
    assert stored["metadata"]["model_id"] == SECOND


def test_every_model_throttled_ends_as_before_after_the_same_attempts_over_the_listed_models_only(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    client, fake = api
    fake.replies = [answer("Nobody should see this.")]  # what any model not in the list would answer
    fake.by_model = {PRIMARY: [THROTTLED], FIRST: [THROTTLED], SECOND: [THROTTLED]}
    conversation = new_id()
    items = chat(client, auth_headers, user_id, conversation)
    assert [i["type"] for i in items] == ["error"]
    assert (items[0]["code"], items[0]["retryable"]) == ("MODEL_THROTTLED", True)
    assert items[0]["error"] == FAILURES["MODEL_THROTTLED"].user_message
    # MAX_RETRY_ATTEMPTS (3) passes down the list, each model once per pass, and nothing beyond it.
    assert models_called(fake) == [PRIMARY, FIRST, SECOND] * 3
    stored = last_message(client, auth_headers, user_id, conversation)
    assert stored["metadata"]["status"] == "error" and stored["metadata"]["error_code"] == "MODEL_THROTTLED"
    assert "model_id" not in stored["metadata"]  # no model answered
    assert metric(client, "canvalo_llm_requests_total", model=SECOND, outcome="MODEL_THROTTLED") == 3


def test_an_error_after_the_first_token_never_falls_back(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    client, fake = api
    fake.by_model = {
        PRIMARY: [Reply.stream([message_start(), text_delta("You have ")], Pause(0.05),
                               exception("throttlingException", "slow down"))],
        FIRST: [answer("A second answer mixed into the first.")],
    }
    conversation = new_id()
    items = chat(client, auth_headers, user_id, conversation)
    assert streamed_text(items) == "You have "
    assert items[-1]["type"] == "error" and items[-1]["code"] == "MODEL_THROTTLED"
    assert models_called(fake) == [PRIMARY]
    stored = last_message(client, auth_headers, user_id, conversation)
    assert stored["content"] == "You have "
    assert stored["metadata"]["status"] == "error" and stored["metadata"]["model_id"] == PRIMARY


@pytest.mark.parametrize(
    ("status", "error_type", "message", "code"),
    [
        (400, "ValidationException", "A conversation must alternate between user and assistant roles.",
         "MODEL_REQUEST_REJECTED"),
        (400, "ValidationException", "Input is too long for requested model.", "MODEL_INPUT_TOO_LONG"),
        (403, "AccessDeniedException", "User is not authorized to perform: bedrock:InvokeModelWithResponseStream",
         "MODEL_ACCESS_DENIED"),
    ],
)
def test_an_error_that_is_the_requests_own_never_falls_back(
    api: tuple[TestClient, FakeBedrock],
    auth_headers: AuthHeaders,
    user_id: str,
    status: int,
    error_type: str,
    message: str,
    code: str,
) -> None:
    client, fake = api
    fake.by_model = {PRIMARY: [Reply.http_error(status, error_type, message)], FIRST: [answer("Should not answer.")]}
    items = chat(client, auth_headers, user_id, new_id())
    assert [(i["type"], i["code"], i["retryable"]) for i in items] == [("error", code, False)]
    assert models_called(fake) == [PRIMARY]
    assert metric(client, "canvalo_llm_requests_total", model=PRIMARY, outcome=code) == 1
    assert metric(client, "canvalo_llm_requests_total", model=FIRST, outcome="answered") == 0


def test_the_metrics_name_the_model_that_answered_and_the_one_passed_over(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    client, fake = api
    fake.by_model = {PRIMARY: [THROTTLED], FIRST: [answer("Fine.", usage=(30, 4))]}
    chat(client, auth_headers, user_id, new_id())
    assert metric(client, "canvalo_llm_requests_total", model=PRIMARY, outcome="MODEL_THROTTLED") == 1
    assert metric(client, "canvalo_llm_requests_total", model=FIRST, outcome="answered") == 1
    assert metric(client, "canvalo_llm_tokens_total", kind="input", model=FIRST) == 30
    assert metric(client, "canvalo_llm_tokens_total", kind="output", model=FIRST) == 4
    assert metric(client, "canvalo_llm_tokens_total", kind="output", model=PRIMARY) == 0


def test_a_turn_whose_calls_were_answered_by_two_models_records_both(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    """Supervisor throttled (its call answered by the fallback), then the specialist's two calls by the primary."""
    client, fake = api
    fake.by_model = {
        PRIMARY: [
            THROTTLED,
            tool_reply("tooluse_1", "list_invoices", {"status": "overdue"}, (90, 12)),
            Reply.stream(text_reply("None are overdue.", usage=(120, 6))),
        ],
        FIRST: [tool_reply("tooluse_h", HANDOFF_TOOL, {"agent": "invoices"}, (40, 8))],
    }
    conversation = new_id()
    items = chat(client, auth_headers, user_id, conversation)
    assert streamed_text(items) == "None are overdue." and items[-1]["type"] == "complete"
    assert models_called(fake) == [PRIMARY, FIRST, PRIMARY, PRIMARY]
    metadata = last_message(client, auth_headers, user_id, conversation)["metadata"]
    assert (metadata["model_id"], metadata["model_ids"]) == (PRIMARY, [FIRST, PRIMARY])
    # Both priced (Nova Lite and its profile, shipped at the same price): the turn's cost is every call's.
    assert metadata["usage"] == {"input_tokens": 250, "output_tokens": 26,
                                 "cost": pytest.approx((250 * 0.06 + 26 * 0.24) / 1e6)}
    assert metric(client, "canvalo_llm_tokens_total", kind="input", model=FIRST) == 40
    assert metric(client, "canvalo_llm_tokens_total", kind="input", model=PRIMARY) == 210


# -- the model: in-stream failures before any text ------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [
        [message_start(), exception("modelStreamErrorException", "An error occurred while streaming.")],
        [exception("serviceUnavailableException", "down")],
        [message_start(), exception("throttlingException", "slow down")],
    ],
    ids=["modelStreamErrorException", "serviceUnavailableException", "throttlingException"],
)
async def test_an_exception_event_before_any_text_falls_back(
    tmp_path: Any,
    bedrock_env: dict[str, str],  # noqa: F811
    fake_bedrock: tuple[FakeBedrock, LiveServer],  # noqa: F811
    frames: list[bytes],
) -> None:
    fake, live = fake_bedrock
    fake.by_model = {PRIMARY: [Reply.stream(frames)], FIRST: [answer("Hello from the fallback.")]}
    settings = settings_for(tmp_path, bedrock_env, live, **FALLBACKS)
    events = await collect(BedrockModel(settings, credentials=CREDS))
    assert events == [ModelUsed(FIRST), TextDelta("Hello from the fallback."), Stop("end_turn"), Usage(12, 7)]
    assert models_called(fake) == [PRIMARY, FIRST]
    assert all(r.auth_error is None for r in fake.requests)  # each model's request is signed for its own path


async def test_a_timeout_is_retried_on_the_same_model_not_handed_over(
    tmp_path: Any,
    bedrock_env: dict[str, str],  # noqa: F811
    fake_bedrock: tuple[FakeBedrock, LiveServer],  # noqa: F811
) -> None:
    """Another model would wait on the same slow path; the retry policy handles it exactly as without fallbacks."""
    fake, live = fake_bedrock
    fake.by_model = {PRIMARY: [Reply.stream(Pause(2), *text_reply("late")), answer("In time.")],
                     FIRST: [answer("Should not answer.")]}
    settings = settings_for(tmp_path, bedrock_env, live, BEDROCK_FIRST_EVENT_TIMEOUT="0.2", **FALLBACKS)
    events = await collect(BedrockModel(settings, credentials=CREDS))
    assert events[:2] == [ModelUsed(PRIMARY), TextDelta("In time.")]
    assert models_called(fake) == [PRIMARY, PRIMARY]



# -- a fallback that refuses the request, the time a pass may take, a failure after the stop ------------------------


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (Reply.http_error(403, "AccessDeniedException", "User is not authorized to perform: "
                          "bedrock:InvokeModelWithResponseStream"), "MODEL_ACCESS_DENIED"),
        (Reply.http_error(400, "ValidationException", "Input is too long for requested model."),
         "MODEL_INPUT_TOO_LONG"),
    ],
    ids=["access-denied", "input-too-long"],
)
def test_a_fallback_that_refuses_the_request_is_passed_over_not_shown_to_the_user(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str, refusal: Reply, code: str
) -> None:
    """The configured model is only throttled: a fallback without the permission (or with a smaller context window)
    must not turn that into a permanent "configuration problem" or "start a new conversation" for the user."""
    client, fake = api
    fake.by_model = {PRIMARY: [THROTTLED], FIRST: [refusal], SECOND: [answer("From the second fallback.")]}
    items = chat(client, auth_headers, user_id, new_id())
    assert streamed_text(items) == "From the second fallback." and items[-1]["type"] == "complete"
    assert models_called(fake) == [PRIMARY, FIRST, SECOND]
    assert metric(client, "canvalo_llm_requests_total", model=FIRST, outcome=code) == 1

    fake.requests.clear()
    fake.by_model = {PRIMARY: [THROTTLED], FIRST: [refusal], SECOND: [refusal]}
    conversation = new_id()
    items = chat(client, auth_headers, user_id, conversation)
    # What the configured model said, as without fallbacks: retryable, after every pass.
    assert [(i["type"], i["code"], i["retryable"]) for i in items] == [("error", "MODEL_THROTTLED", True)]
    assert models_called(fake) == [PRIMARY, FIRST, SECOND] * 3
    stored = last_message(client, auth_headers, user_id, conversation)
    assert stored["metadata"]["error_code"] == "MODEL_THROTTLED"


async def test_no_fallback_starts_once_the_call_has_waited_its_time(
    tmp_path: Any,
    bedrock_env: dict[str, str],  # noqa: F811
    fake_bedrock: tuple[FakeBedrock, LiveServer],  # noqa: F811
) -> None:
    """Each model may take up to BEDROCK_FIRST_EVENT_TIMEOUT (or longer while it sends events) before failing in a way
    that falls back: without a bound, one pass over six models would keep a user waiting six first-event timeouts.
    A fallback starts only while the call has waited less than RETRY_MAX_TOTAL or BEDROCK_FIRST_EVENT_TIMEOUT,
    whichever is longer (here 2 s; the configured model fails after 2.4 s)."""
    fake, live = fake_bedrock
    slow_failure = Reply.stream(message_start(), Pause(1.2), message_start(), Pause(1.2),
                                exception("serviceUnavailableException", "down"))
    fake.by_model = {PRIMARY: [slow_failure], FIRST: [answer("Too late to ask me.")]}
    settings = settings_for(tmp_path, bedrock_env, live, BEDROCK_FIRST_EVENT_TIMEOUT="2", BEDROCK_IDLE_TIMEOUT="2",
                            RETRY_MAX_TOTAL="0.1", **FALLBACKS)
    error_, seen = await failing(BedrockModel(settings, credentials=CREDS))
    assert (error_.code, error_.retryable, seen) == ("MODEL_UNAVAILABLE", True, [])
    assert models_called(fake) == [PRIMARY]


def test_each_call_of_a_turn_is_billed_to_the_model_that_answered_it_at_its_price(
    tmp_path: Any,
    service_env: dict[str, str],
    bedrock_env: dict[str, str],  # noqa: F811
    fake_bedrock: tuple[FakeBedrock, LiveServer],  # noqa: F811
    auth_headers: AuthHeaders,
    user_id: str,
) -> None:
    """Call 1 (the hand-off) by the configured model, call 2 (the tool call) by a fallback, call 3 cut short by a
    failure after its first text, by the configured model again: the ledger has each call under its own model and
    price, the stored answer names both, and the error is the configured model's."""
    fake, live = fake_bedrock
    fake.by_model = {
        PRIMARY: [
            tool_reply("tooluse_h", HANDOFF_TOOL, {"agent": "invoices"}, (40, 8)),
            THROTTLED,
            Reply.stream([message_start(), text_delta("None are ")], Pause(0.05),
                         exception("modelStreamErrorException", "broke")),
        ],
        FIRST: [tool_reply("tooluse_1", "list_invoices", {"status": "overdue"}, (90, 12))],
    }
    prices = '{"us.amazon.nova-lite-v1:0": {"input": 1.0, "output": 2.0}}'
    env = {**service_env, **bedrock_env, **FALLBACKS, "MODEL_PRICES": prices}
    settings = settings_for(tmp_path, env, live)
    conversation = new_id()
    with TestClient(create_app(settings, model=BedrockModel(settings, credentials=CREDS))) as client:
        items = chat(client, auth_headers, user_id, conversation)
        metadata = last_message(client, auth_headers, user_id, conversation)["metadata"]
        report = client.get("/api/usage", params={"user_id": user_id}, headers=auth_headers(user_id)).json()
    assert streamed_text(items) == "None are " and items[-1]["code"] == "MODEL_STREAM_ERROR"
    assert models_called(fake) == [PRIMARY, PRIMARY, FIRST, PRIMARY]
    assert (metadata["status"], metadata["model_id"], metadata["model_ids"]) == ("error", PRIMARY, [PRIMARY, FIRST])
    rows = {row["model_id"]: row for row in report["by_model"]}
    assert set(rows) == {PRIMARY, FIRST}
    assert (rows[FIRST]["calls"], rows[FIRST]["input_tokens"], rows[FIRST]["output_tokens"]) == (1, 90, 12)
    assert rows[FIRST]["cost"] == pytest.approx((90 * 1.0 + 12 * 2.0) / 1e6)
    assert (rows[PRIMARY]["calls"], rows[PRIMARY]["estimated_calls"]) == (2, 1)  # the cut call estimated
    primary_cost = (rows[PRIMARY]["input_tokens"] * 0.06 + rows[PRIMARY]["output_tokens"] * 0.24) / 1e6
    assert rows[PRIMARY]["cost"] == pytest.approx(primary_cost)


@pytest.mark.parametrize("where", ["fallback", "backoff"])
def test_a_stop_during_a_fallback_or_a_backoff_pause_ends_the_run_at_once(
    tmp_path: Any,
    service_env: dict[str, str],
    bedrock_env: dict[str, str],  # noqa: F811
    fake_bedrock: tuple[FakeBedrock, LiveServer],  # noqa: F811
    auth_headers: AuthHeaders,
    user_id: str,
    where: str,
) -> None:
    """Stopped while a fallback is being asked (it hangs) or while every model was throttled and the service pauses
    before the next pass (a long one here): the run ends stopped with nothing billed, and the fallback is hung up on."""
    fake, live = fake_bedrock
    never = threading.Event()
    hang = Reply.stream(Gate(never), *text_reply("never"))
    fake.by_model = {PRIMARY: [THROTTLED], FIRST: [hang if where == "fallback" else THROTTLED], SECOND: [THROTTLED]}
    env = {**service_env, **bedrock_env, **FALLBACKS, "RETRY_BASE_DELAY": "30", "RETRY_MAX_DELAY": "30",
           "RETRY_MAX_TOTAL": "60", "BEDROCK_FIRST_EVENT_TIMEOUT": "60"}
    settings = settings_for(tmp_path, env, live)
    conversation = new_id()
    body = {"message": "Hi", "conversation_id": conversation, "user_id": user_id}
    try:
        with serve(create_app(settings, model=BedrockModel(settings, credentials=CREDS))) as service, \
                httpx.Client(base_url=service.url, timeout=10) as client:
            with client.stream("POST", "/api/chat/stream", json=body, headers=auth_headers(user_id)) as response:
                run_id = response.headers["x-run-id"]
                fake.wait_for_requests(2 if where == "fallback" else 3)
                started = time.monotonic()
                stop = {"user_id": user_id, "seen_chars": 0}
                stopped = client.post(f"/api/chat/runs/{run_id}/stop", json=stop, headers=auth_headers(user_id))
                assert stopped.status_code == 200, stopped.text
                rest = chunks(response.read().decode())
            assert time.monotonic() - started < 10  # not the fallback's 60 s first-event timeout
            stored = last_message(client, auth_headers, user_id, conversation)
    finally:
        never.set()
    assert [i["type"] for i in rest if i["type"] in ("token", "error")] == [], rest
    assert stored["metadata"]["status"] == "stopped" and stored["content"] == ""
    assert "model_id" not in stored["metadata"] and "usage" not in stored["metadata"]
    if where == "fallback":
        assert fake.requests[1].closed_early.wait(5)
        assert len(fake.requests) == 2
    else:  # stopped in the pause after the first pass (or, if that pause was a short draw, the second)
        assert len(fake.requests) in (3, 6)
