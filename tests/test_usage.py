"""Every model call of a turn is counted, however the turn ends (services/agents/usage.py): the model's own figures
for the calls that finished, an estimate marked as such for the one a stop, a failure or a timeout cut short; in the
stream's last chunk, the stored answer and the metrics, on both stores, over the fake Bedrock's real wire format."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from app import create_app

from services.agents.assistant import HANDOFF_TOOL
from services.agents.usage import TurnUsage
from services.model import ModelRequest, Usage, estimate_tokens, prompt_tokens
from services.model.bedrock import BedrockModel
from settings import ModelPrice
from tests.conftest import AuthHeaders
from tests.fake_bedrock import (
    FakeBedrock, Gate, Pause, Reply, block_stop, event, exception, message_start, message_stop, text_delta, text_reply,
    tool_use,
)
from tests.support import LiveServer, chunks, new_id, serve
from tests.test_bedrock import CREDS, _read_until_token, bedrock_env, fake_bedrock, last_message  # noqa: F401
from tests.test_bedrock import settings_for

TOKEN = "metrics-token-0123456789"
METRICS = {"Authorization": f"Bearer {TOKEN}"}


def metered_app(tmp_path: Any, env: dict[str, str], live: LiveServer) -> Starlette:
    """The service over the fake Bedrock, with /metrics open to ``TOKEN``."""
    settings = settings_for(tmp_path, env, live, METRICS_TOKEN=TOKEN)
    return create_app(settings, model=BedrockModel(settings, credentials=CREDS))


@pytest.fixture
def api(
    tmp_path: Any, service_env: dict[str, str], bedrock_env: dict[str, str],  # noqa: F811
    fake_bedrock: tuple[FakeBedrock, LiveServer],  # noqa: F811
) -> Iterator[tuple[TestClient, FakeBedrock]]:
    fake, live = fake_bedrock
    with TestClient(metered_app(tmp_path, {**service_env, **bedrock_env}, live)) as client:
        yield client, fake


@pytest.fixture
def live_api(
    tmp_path: Any, service_env: dict[str, str], bedrock_env: dict[str, str],  # noqa: F811
    fake_bedrock: tuple[FakeBedrock, LiveServer],  # noqa: F811
) -> Iterator[tuple[LiveServer, FakeBedrock]]:
    fake, live = fake_bedrock
    with serve(metered_app(tmp_path, {**service_env, **bedrock_env}, live)) as service:
        yield service, fake


def tool_reply(tool_use_id: str, name: str, arguments: dict[str, Any], usage: dict[str, int]) -> Reply:
    frames = tool_use(0, tool_use_id, name, [json.dumps(arguments)])
    return Reply.stream([message_start(), *frames, message_stop("tool_use"), event("metadata", {"usage": usage})])


def handoff(usage: dict[str, int]) -> Reply:
    return tool_reply("tooluse_h", HANDOFF_TOOL, {"agent": "invoices"}, usage)


def test_a_call_cut_short_is_estimated_from_its_request_and_its_output() -> None:
    usage, request = TurnUsage(), ModelRequest("Be brief.", [{"role": "user", "content": []}])
    usage.started("supervisor", request)
    usage.answered("fallback-model")
    usage.finished(Usage(40, 8, cache_read_tokens=30))
    usage.started("invoices", request)  # refused before any answer (throttled, say): nothing to count
    usage.started("invoices", request)
    usage.answered("configured-model")
    usage.produced("You have three invoices")
    usage.produced({"status": "overdue"})
    # The open call waits; these models have no price, so the turn's cost is unknown (null), its tokens counted.
    assert usage.totals() == {"input_tokens": 40, "output_tokens": 8, "cache_read_tokens": 30, "cost": None}
    usage.close()
    usage.close()  # closing twice counts the cut call once
    usage.started("invoices", request)
    usage.answered("configured-model")
    usage.close()  # answered, then cut before any output: its input only
    first, cut, silent = usage.calls
    assert (silent.input_tokens, silent.output_tokens, silent.estimated) == (prompt_tokens(request), 0, True)
    assert (first.model_id, first.estimated, cut.model_id, cut.agent_type) == (
        "fallback-model", False, "configured-model", "invoices")
    assert (cut.input_tokens, cut.output_tokens, cut.estimated) == (
        prompt_tokens(request), estimate_tokens('You have three invoices{"status": "overdue"}'), True)
    assert usage.totals() == {"input_tokens": 40 + 2 * cut.input_tokens, "output_tokens": 8 + cut.output_tokens,
                              "cache_read_tokens": 30, "cost": None, "estimated": True}


def test_each_call_is_priced_at_its_models_rates_and_an_unpriced_model_costs_null() -> None:
    prices = {"priced": ModelPrice(input=1.0, output=2.0, cache_read=0.1, cache_write=1.25),
              "no-cache-rates": ModelPrice(input=1.0, output=2.0)}
    usage, request = TurnUsage(prices), ModelRequest("Be brief.", [{"role": "user", "content": []}])
    for model in ("priced", "no-cache-rates"):
        usage.started("supervisor", request)
        usage.answered(model)
        usage.finished(Usage(1_000, 100, cache_read_tokens=10_000, cache_write_tokens=2_000))
    priced, plain = usage.calls
    assert priced.cost == pytest.approx((1_000 * 1 + 100 * 2 + 10_000 * 0.1 + 2_000 * 1.25) / 1e6)
    assert plain.cost == pytest.approx((1_000 + 100 * 2 + 10_000 + 2_000) / 1e6)  # cache tokens at the input rate
    assert [c.index for c in usage.calls] == [0, 1]  # their rows' places in the run's ledger
    assert usage.totals()["cost"] == pytest.approx(priced.cost + plain.cost)  # type: ignore[index]
    usage.started("invoices", request)
    usage.answered("unpriced")
    usage.finished(Usage(5, 5))
    assert usage.calls[-1].cost is None and usage.totals()["cost"] is None  # type: ignore[index]


def test_cache_tokens_reach_the_stream_the_answer_and_the_metrics(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    client, fake = api
    answer = text_reply("Nothing is overdue.")
    answer[-1] = event("metadata", {"usage": {"inputTokens": 120, "outputTokens": 6, "cacheReadInputTokens": 100,
                                              "cacheWriteInputTokens": 20}})
    fake.replies = [handoff({"inputTokens": 40, "outputTokens": 8}), Reply.stream(answer)]
    conversation = new_id()
    body = {"message": "Anything overdue?", "conversation_id": conversation, "user_id": user_id}
    items = chunks(client.post("/api/chat/stream", json=body, headers=auth_headers(user_id)).text)
    # Nova Lite's shipped price (0.06 in, 0.24 out per million), cache tokens at the input rate: it names no cache rates.
    cost = (160 * 0.06 + 14 * 0.24 + (100 + 20) * 0.06) / 1e6
    expected = {"input_tokens": 160, "output_tokens": 14, "cache_read_tokens": 100, "cache_write_tokens": 20,
                "cost": pytest.approx(cost)}
    assert items[-1]["type"] == "complete" and items[-1]["usage"] == expected
    assert last_message(client, auth_headers, user_id, conversation)["metadata"]["usage"] == expected
    metrics = client.get("/metrics", headers=METRICS).text
    model = fake.requests[0].model_id
    assert f'canvalo_llm_tokens_total{{kind="cache_read",model="{model}"}} 100' in metrics
    assert f'canvalo_llm_tokens_total{{kind="cache_write",model="{model}"}} 20' in metrics
    assert f'canvalo_llm_tokens_total{{kind="input",model="{model}"}} 160' in metrics
    (spent,) = re.findall(rf'^canvalo_llm_cost_usd_total{{model="{re.escape(model)}"}} (\S+)$', metrics, re.M)
    assert float(spent) == pytest.approx(cost)


def test_a_failed_turn_counts_the_calls_that_finished_and_estimates_the_broken_one(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    client, fake = api
    fake.replies = [
        handoff({"inputTokens": 40, "outputTokens": 8}),
        Reply.stream([message_start(), text_delta("You have "), text_delta("three")], Pause(0.05),
                     exception("modelStreamErrorException", "stream broke")),
    ]
    conversation = new_id()
    body = {"message": "How are my invoices?", "conversation_id": conversation, "user_id": user_id}
    items = chunks(client.post("/api/chat/stream", json=body, headers=auth_headers(user_id)).text)
    assert items[-1]["type"] == "error"
    stored = last_message(client, auth_headers, user_id, conversation)["metadata"]
    assert stored["status"] == "error" and stored["usage"]["estimated"] is True
    # The handoff's own figures, plus the broken call's estimate: its request is longer than the user's message alone.
    assert stored["usage"]["input_tokens"] > 40 + estimate_tokens("How are my invoices?")
    assert stored["usage"]["output_tokens"] == 8 + estimate_tokens("You have three")
    assert "cache_read_tokens" not in stored["usage"]


def test_a_stopped_turn_counts_the_call_it_cut(
    live_api: tuple[LiveServer, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    service, fake = live_api
    never = threading.Event()
    fake.replies = [
        handoff({"inputTokens": 40, "outputTokens": 8}),
        Reply.stream([message_start(), text_delta("Half an ans")], Gate(never), block_stop(), message_stop()),
    ]
    conversation = new_id()
    body = {"message": "Hi", "conversation_id": conversation, "user_id": user_id, "history": []}
    try:
        with httpx.Client(base_url=service.url, timeout=5) as client:
            with client.stream("POST", "/api/chat/stream", json=body, headers=auth_headers(user_id)) as response:
                assert _read_until_token(response.iter_lines())["content"] == "Half an ans"
                run_id = response.headers["x-run-id"]
            stop = {"user_id": user_id, "seen_chars": 4}
            client.post(f"/api/chat/runs/{run_id}/stop", json=stop, headers=auth_headers(user_id)).raise_for_status()
            stored = last_message(client, auth_headers, user_id, conversation)
            metrics = client.get("/metrics", headers=METRICS).text
            ledger = usage_of(client, auth_headers, user_id)
    finally:
        never.set()
    assert stored["metadata"]["status"] == "stopped"
    # The ledger bills the handoff that finished and the answer the stop cut, the latter estimated.
    (row,) = ledger["by_model"]
    assert (row["calls"], row["estimated_calls"]) == (2, 1)
    assert (row["input_tokens"], row["output_tokens"]) == (
        stored["metadata"]["usage"]["input_tokens"], stored["metadata"]["usage"]["output_tokens"])
    usage = stored["metadata"]["usage"]
    assert usage["estimated"] is True and usage["output_tokens"] == 8 + estimate_tokens("Half an ans")
    assert usage["input_tokens"] > 40
    model = fake.requests[0].model_id
    assert f'canvalo_llm_tokens_total{{kind="output",model="{model}"}} {usage["output_tokens"]}' in metrics
    cut = estimate_tokens("Half an ans")
    assert f'canvalo_llm_estimated_tokens_total{{kind="output",model="{model}"}} {cut}' in metrics


def test_a_turn_whose_conversation_is_deleted_mid_answer_counts_the_call_it_cut(
    live_api: tuple[LiveServer, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    """The delete ends the run in the store and the worker stops generating; its calls, the cut one estimated, are
    still in the ledger (under the deleted conversation's id), so deleting mid-answer is no way round a budget."""
    service, fake = live_api
    never = threading.Event()
    fake.replies = [
        handoff({"inputTokens": 40, "outputTokens": 8}),
        Reply.stream([message_start(), text_delta("Half an ans")], Gate(never), block_stop(), message_stop()),
    ]
    conversation = new_id()
    body = {"message": "Hi", "conversation_id": conversation, "user_id": user_id}
    try:
        with httpx.Client(base_url=service.url, timeout=5) as client:
            with client.stream("POST", "/api/chat/stream", json=body, headers=auth_headers(user_id)) as response:
                lines = response.iter_lines()
                assert _read_until_token(lines)["content"] == "Half an ans"
                deleted = client.delete(f"/api/conversations/{conversation}", params={"user_id": user_id},
                                        headers=auth_headers(user_id))
                assert deleted.status_code == 200, deleted.text
                assert chunks("\n".join(lines))[-1]["code"] == "CONVERSATION_DELETED"
            deadline = time.monotonic() + 5
            while not (ledger := usage_of(client, auth_headers, user_id))["by_model"] and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        never.set()
    (row,) = ledger["by_model"]
    assert (row["calls"], row["estimated_calls"]) == (2, 1)
    assert row["output_tokens"] == 8 + estimate_tokens("Half an ans") and row["input_tokens"] > 40
    assert [c["conversation_id"] for c in ledger["by_conversation"]] == [conversation]


def test_a_call_refused_before_any_answer_counts_nothing(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    client, fake = api
    fake.replies = [Reply.http_error(429, "ThrottlingException")] * 3  # every attempt throttled: Bedrock bills none
    conversation = new_id()
    body = {"message": "How are my invoices?", "conversation_id": conversation, "user_id": user_id}
    items = chunks(client.post("/api/chat/stream", json=body, headers=auth_headers(user_id)).text)
    assert items[-1]["type"] == "error" and items[-1]["code"] == "MODEL_THROTTLED"
    assert "usage" not in last_message(client, auth_headers, user_id, conversation)["metadata"]
    assert "canvalo_llm_tokens_total{" not in client.get("/metrics", headers=METRICS).text


# -- the usage ledger: a row per call, written with the run's events, on both stores ------------------------------


def usage_of(client: httpx.Client | TestClient, auth_headers: AuthHeaders, user_id: str) -> dict[str, Any]:
    response = client.get("/api/usage", params={"user_id": user_id, "period": "day"}, headers=auth_headers(user_id))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_a_tool_turn_writes_one_ledger_row_per_model_call(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str
) -> None:
    client, fake = api
    answer = text_reply("No invoices.")
    answer[-1] = event("metadata", {"usage": {"inputTokens": 300, "outputTokens": 5, "cacheReadInputTokens": 200}})
    fake.replies = [handoff({"inputTokens": 40, "outputTokens": 8}),
                    tool_reply("tooluse_l", "list_invoices", {}, {"inputTokens": 250, "outputTokens": 12}),
                    Reply.stream(answer)]
    conversation = new_id()
    body = {"message": "What invoices do I have?", "conversation_id": conversation, "user_id": user_id}
    items = chunks(client.post("/api/chat/stream", json=body, headers=auth_headers(user_id)).text)
    assert items[-1]["type"] == "complete" and len(fake.requests) == 3
    usage = usage_of(client, auth_headers, user_id)
    (row,) = usage["by_model"]
    price_in, price_out = 0.06, 0.24  # Nova Lite's shipped price; cache reads at the input rate
    cost = ((40 + 250 + 300 + 200) * price_in + (8 + 12 + 5) * price_out) / 1e6
    assert row == {"model_id": fake.requests[0].model_id, "calls": 3, "estimated_calls": 0, "input_tokens": 590,
                   "output_tokens": 25, "cache_read_tokens": 200, "cache_write_tokens": 0, "cost": pytest.approx(cost)}
    assert usage["by_conversation"] == [{"conversation_id": conversation, "calls": 3, "tokens": 815,
                                         "cost": pytest.approx(cost)}]
    assert usage["used"] == {"tokens": 815, "cost": pytest.approx(cost)} and usage["reserved"]["tokens"] == 0
    assert usage["limit"] == {"tokens": None, "cost": None} == usage["remaining"]  # budgets are off by default
    assert items[-1]["usage"]["cost"] == pytest.approx(cost)
    # Deleting the conversation refunds nothing: its rows stay.
    client.delete(f"/api/conversations/{conversation}", params={"user_id": user_id}, headers=auth_headers(user_id))
    assert usage_of(client, auth_headers, user_id)["used"]["tokens"] == 815


def test_a_failed_and_a_timed_out_turn_bill_what_they_used(
    tmp_path: Any, service_env: dict[str, str], bedrock_env: dict[str, str],  # noqa: F811
    fake_bedrock: tuple[FakeBedrock, LiveServer], auth_headers: AuthHeaders, user_id: str,  # noqa: F811
) -> None:
    fake, live = fake_bedrock
    never = threading.Event()
    settings = settings_for(tmp_path, {**service_env, **bedrock_env, "RUN_MAX_SECONDS": "1"}, live)
    fake.replies = [
        handoff({"inputTokens": 40, "outputTokens": 8}),
        Reply.stream([message_start(), text_delta("You have ")], Pause(0.05),
                     exception("modelStreamErrorException", "stream broke")),
        handoff({"inputTokens": 30, "outputTokens": 6}),
        Reply.stream([message_start(), text_delta("Still thinking")], Gate(never), block_stop(), message_stop()),
    ]
    try:
        with TestClient(create_app(settings, model=BedrockModel(settings, credentials=CREDS))) as client:
            for message, code in (("How are my invoices?", "MODEL_STREAM_ERROR"), ("And now?", "RUN_TIMEOUT")):
                body = {"message": message, "conversation_id": new_id(), "user_id": user_id}
                items = chunks(client.post("/api/chat/stream", json=body, headers=auth_headers(user_id)).text)
                assert (items[-1]["type"], items[-1]["code"]) == ("error", code), items[-1]
            usage = usage_of(client, auth_headers, user_id)
    finally:
        never.set()
    (row,) = usage["by_model"]
    # Each turn: its handoff's own figures, and the call it cut, estimated from its request and what it streamed.
    assert (row["calls"], row["estimated_calls"]) == (4, 2)
    assert row["output_tokens"] == 8 + 6 + estimate_tokens("You have ") + estimate_tokens("Still thinking")
    assert row["input_tokens"] > 40 + 30 + 2 * estimate_tokens("How are my invoices?")
    assert usage["reserved"] == {"tokens": 0, "cost": 0}
