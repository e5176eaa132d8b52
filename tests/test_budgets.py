"""Usage budgets (services/limits/budgets.py): a turn is admitted inside begin_run's transaction when the period's ledger, the
reservations of the user's turns still going and its own reservation stay within every budget; a refusal is a 429
BUDGET_EXCEEDED that says when the budget resets and is not retryable. On both stores, over real servers (and, for a
worker's death, real processes)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from app import create_app
from services.model import estimate_tokens
from services.store import USAGE_CONVERSATIONS
from services.store.postgrest.rows import usage_report_of
from tests.conftest import AuthHeaders
from tests.support import chunks, free_port, make_settings, new_id, serve
from tests.test_runs import ROOT, chat_body, read_until, start_service

TOKEN = "metrics-token-0123456789"
MESSAGE = "tell me everything"
# Each turn reserves its message's estimate, the whole history budget and the most output one call may produce.
BUDGET_ENV = {"HISTORY_TOKEN_BUDGET": "500", "BEDROCK_MAX_TOKENS": "2000"}
RESERVE = estimate_tokens(MESSAGE) + 500 + 2000
# One turn's reservation fits, with room for a finished turn's ledger (about 700 tokens a local turn), but not two.
EDGE = str(RESERVE + 1500)


def usage(client: httpx.Client | TestClient, auth_headers: AuthHeaders, user_id: str) -> dict[str, Any]:
    response = client.get("/api/usage", params={"user_id": user_id}, headers=auth_headers(user_id))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def next_midnight() -> datetime:
    return datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def assert_budget_refusal(response: httpx.Response, used_at_least: int) -> None:
    """A 429 distinct from rate limiting: not retryable, with the period, the budget, what was used and the reset,
    in the envelope and the headers; Retry-After counts down to the reset."""
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["retryable"]) == (429, "BUDGET_EXCEEDED", False)
    assert (error["limit"], error["period"], error["unit"], error["budget"]) == ("budget", "day", "tokens", int(EDGE))
    assert used_at_least <= error["used"] <= int(EDGE)
    resets = next_midnight()
    assert error["resetsAt"] == resets.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs(int(response.headers["retry-after"]) - (resets - datetime.now(timezone.utc)).total_seconds()) < 5
    assert (response.headers["x-budget-period"], response.headers["x-budget-unit"],
            response.headers["x-budget-limit"], response.headers["x-budget-reset"]) == (
        "day", "tokens", EDGE, error["resetsAt"])
    assert float(response.headers["x-budget-used"]) == error["used"]


def test_two_turns_at_a_budgets_edge_admit_one_and_the_end_releases_its_reservation(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    settings = make_settings(tmp_path, **{**service_env, **BUDGET_ENV, "BUDGET_DAY_TOKENS": EDGE,
                                          "LOCAL_TOKEN_DELAY": "0.05", "METRICS_TOKEN": TOKEN})
    statuses: list[int] = []
    refused: list[httpx.Response] = []
    admitted: list[str] = []
    start = threading.Barrier(2)

    def send(url: str) -> None:
        start.wait()
        with httpx.stream("POST", f"{url}/api/chat/stream", json=chat_body(user_id, new_id(), MESSAGE),
                          headers=auth_headers(user_id), timeout=30) as response:
            response.read()
            statuses.append(response.status_code)
            (admitted.append(response.text) if response.status_code == 200 else refused.append(response))

    with serve(create_app(settings)) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        senders = [threading.Thread(target=send, args=(live.url,)) for _ in range(2)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        assert sorted(statuses) == [200, 429], [r.text for r in refused]
        assert_budget_refusal(refused[0], RESERVE)
        assert chunks(admitted[0])[-1]["type"] == "complete"
        # The admitted turn has ended: its reservation is released, its ledger rows are what it cost.
        after = usage(client, auth_headers, user_id)
        assert after["reserved"] == {"tokens": 0, "cost": 0} and 0 < after["used"]["tokens"] < 1500
        assert after["limit"]["tokens"] == int(EDGE)
        assert after["remaining"]["tokens"] == int(EDGE) - after["used"]["tokens"]
        again = client.post("/api/chat/stream", json=chat_body(user_id, new_id(), MESSAGE),
                            headers=auth_headers(user_id))
        assert again.status_code == 200 and chunks(again.text)[-1]["type"] == "complete"
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert 'canvalo_budget_refusals_total{period="day",unit="tokens"} 1' in metrics
    assert 'canvalo_rate_limit_rejections_total{' not in metrics  # a budget is not a rate limit


def test_a_running_turn_holds_its_reservation_and_a_repeat_costs_nothing(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    settings = make_settings(tmp_path, **{**service_env, **BUDGET_ENV, "BUDGET_DAY_TOKENS": EDGE,
                                          "LOCAL_TOKEN_DELAY": "0.3"})
    first = chat_body(user_id, new_id(), MESSAGE, client_message_id=new_id())
    with serve(create_app(settings)) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        _, run_id = read_until(live.url, first, auth_headers(user_id), 2)
        during = usage(client, auth_headers, user_id)
        assert during["reserved"]["tokens"] > RESERVE - 1000  # its reservation, less what its finished calls used
        other = client.post("/api/chat/stream", json=chat_body(user_id, new_id(), MESSAGE),
                            headers=auth_headers(user_id))
        assert_budget_refusal(other, RESERVE)
        # The same client_message_id again attaches to its turn: no second reservation, no refusal.
        repeat = client.post("/api/chat/stream", json=first, headers=auth_headers(user_id))
        assert repeat.status_code == 200 and repeat.headers["x-run-id"] == run_id
        assert chunks(repeat.text)[-1]["type"] == "complete"


def test_the_reaper_releases_the_reservation_of_a_run_whose_worker_was_killed(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    env = {**service_env, **BUDGET_ENV, "BUDGET_DAY_TOKENS": EDGE, "SQLITE_PATH": str(tmp_path / "canvalo.db"),
           "LOCAL_TOKEN_DELAY": "0.3", "RUN_STALE_SECONDS": "2"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_service(env, port)
    try:
        read_until(url, chat_body(user_id, new_id(), MESSAGE), auth_headers(user_id), 2)
        held = httpx.post(f"{url}/api/chat/stream", json=chat_body(user_id, new_id(), MESSAGE),
                          headers=auth_headers(user_id), timeout=30)
        assert_budget_refusal(held, RESERVE)  # the running turn's reservation counts
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    process = start_service(env, port)
    try:
        time.sleep(2.5)  # the dead run's heartbeat lapses (RUN_STALE_SECONDS): reading the usage reaps it
        report = httpx.get(f"{url}/api/usage", params={"user_id": user_id}, headers=auth_headers(user_id), timeout=30)
        assert report.json()["reserved"] == {"tokens": 0, "cost": 0}, report.text
        # A short answer: at 0.3 s a word, a long one would outlive RUN_STALE_SECONDS between its heartbeats.
        again = httpx.post(f"{url}/api/chat/stream", json=chat_body(user_id, new_id(), "hello"),
                           headers=auth_headers(user_id), timeout=30)
        after = httpx.get(f"{url}/api/usage", params={"user_id": user_id}, headers=auth_headers(user_id), timeout=30)
    finally:
        process.kill()
        process.wait()
    assert again.status_code == 200, again.text
    assert chunks(again.text)[-1]["type"] == "complete"
    assert after.json()["reserved"] == {"tokens": 0, "cost": 0}


def test_a_cost_budget_refuses_turns_at_the_models_prices(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    """Priced at 1,000 USD per million tokens in and out, a turn reserves about 2.5 USD: a budget of 2.8 USD admits
    one turn, whose ledger then costs its tokens at that price (about 0.4 USD), and refuses the next."""
    prices = '{"canvalo-local-responder": {"input": 1000, "output": 1000}}'
    settings = make_settings(tmp_path, **{**service_env, **BUDGET_ENV, "MODEL_PRICES": prices,
                                          "BUDGET_DAY_COST": "2.8"})
    with TestClient(create_app(settings)) as client:
        first = client.post("/api/chat/stream", json=chat_body(user_id, new_id(), MESSAGE),
                            headers=auth_headers(user_id))
        assert first.status_code == 200
        cost = chunks(first.text)[-1]["usage"]["cost"]
        report = usage(client, auth_headers, user_id)
        assert report["used"]["cost"] == pytest.approx(cost) and cost > 0.1
        assert report["remaining"]["cost"] == pytest.approx(2.8 - cost)
        second = client.post("/api/chat/stream", json=chat_body(user_id, new_id(), MESSAGE),
                             headers=auth_headers(user_id))
    error = second.json()["error"]
    assert (second.status_code, error["code"], error["unit"], error["budget"]) == (429, "BUDGET_EXCEEDED", "cost", 2.8)
    assert error["used"] == pytest.approx(cost)


def test_a_cost_budget_without_a_price_for_a_model_in_use_refuses_to_start(tmp_path: Path) -> None:
    env = {**os.environ, "SQLITE_PATH": str(tmp_path / "canvalo.db"), "API_PORT": str(free_port()),
           "LLM_PROVIDER": "bedrock", "BEDROCK_MODEL_ID": "amazon.nova-lite-v1:0",
           "BEDROCK_FALLBACK_MODEL_IDS": "amazon.nova-pro-v1:0", "BUDGET_MONTH_COST": "20"}
    finished = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=30)
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines() == [
        "canvalo: Invalid configuration: a cost budget (BUDGET_DAY_COST, BUDGET_MONTH_COST) needs a price for every "
        "model in use: add amazon.nova-pro-v1:0 to MODEL_PRICES"]


def _seed_ledger(request: pytest.FixtureRequest, settings: Any, user_id: str, conversations: list[str]) -> None:
    """One model call today in each conversation, the i-th of i + 1 tokens, written straight into the store's ledger
    (as the flushes would, without running that many turns)."""
    now = time.time()
    rows = [(new_id(), 0, user_id, conversation, "supervisor", "canvalo-local-responder", i + 1, 0, 0, 0, 0.0, False)
            for i, conversation in enumerate(conversations)]
    if settings.store == "sqlite":
        with sqlite3.connect(settings.sqlite_path) as db:
            db.executemany("INSERT INTO agent_usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(*row, now) for row in rows])
        return
    from tests.conftest import DATABASE
    with request.getfixturevalue("pg_cluster").connect(DATABASE) as db, db.cursor() as cursor:
        cursor.executemany("insert into api.agent_usage (run_id, call_index, user_id, conversation_id, agent_type,"
                           " model_id, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost,"
                           " estimated) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)


def test_usage_lists_the_conversations_that_used_most_and_counts_the_rest(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str,
    request: pytest.FixtureRequest,
) -> None:
    """A user with more conversations this period than the report lists (a month of turns can touch hundreds of
    thousands): the answer stays bounded, the most used first, and its totals still count every conversation."""
    settings = make_settings(tmp_path, **service_env)
    conversations = [new_id() for _ in range(USAGE_CONVERSATIONS + 50)]
    with serve(create_app(settings)) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        usage(client, auth_headers, user_id)  # the store is open (and the user registered) before the rows go in
        _seed_ledger(request, settings, user_id, conversations)
        report = usage(client, auth_headers, user_id)
    listed = report["by_conversation"]
    assert len(listed) == USAGE_CONVERSATIONS and report["by_conversation_total"] == len(conversations)
    assert [row["conversation_id"] for row in listed] == conversations[::-1][:USAGE_CONVERSATIONS]
    assert report["used"]["tokens"] == sum(range(1, len(conversations) + 1))


def test_a_database_still_on_013s_unbounded_report_is_cut_to_the_same_shape() -> None:
    """Before 018 is applied, agent_usage_report lists every conversation and counts none: the service's answer is
    bounded all the same."""
    listed = [{"conversation_id": new_id(), "calls": 1, "tokens": USAGE_CONVERSATIONS + 50 - i, "cost": None}
              for i in range(USAGE_CONVERSATIONS + 50)]
    report = usage_report_of({"by_model": [], "by_conversation": listed, "reserved_tokens": 0, "reserved_cost": 0})
    assert report.by_conversation == listed[:USAGE_CONVERSATIONS]
    assert report.conversations == USAGE_CONVERSATIONS + 50


def test_eight_turns_racing_for_the_last_of_a_budget_admit_exactly_one(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    """Stream slots and the chat rate out of the way: only the budget decides, under the store's per-user
    serialisation, so of eight turns sent at once one is admitted, whatever their order."""
    settings = make_settings(tmp_path, **{**service_env, **BUDGET_ENV, "BUDGET_DAY_TOKENS": EDGE,
                                          "MAX_STREAMS_PER_USER": "20", "RATE_LIMIT_CHAT_PER_MINUTE": "100",
                                          "LOCAL_TOKEN_DELAY": "0.02"})
    statuses: list[int] = []
    start = threading.Barrier(8)

    def send(url: str) -> None:
        start.wait()
        response = httpx.post(f"{url}/api/chat/stream", json=chat_body(user_id, new_id(), MESSAGE),
                              headers=auth_headers(user_id), timeout=60)
        statuses.append(response.status_code)

    with serve(create_app(settings)) as live:
        auth_headers(user_id)  # registered before the race
        senders = [threading.Thread(target=send, args=(live.url,)) for _ in range(8)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
    assert sorted(statuses) == [200] + [429] * 7


def test_turns_stopped_with_nothing_shown_do_not_grow_the_next_prompt_past_its_reservation(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    """Each turn stopped with seen_chars 0 keeps an empty answer, so its 4,000-character message and the next merge
    into one user block. The next turn's prompt is still cut to HISTORY_TOKEN_BUDGET, the history its reservation
    counts, rather than carrying every one of them (the local responder reports its prompt's size as input tokens)."""
    settings = make_settings(tmp_path, **{**service_env, **BUDGET_ENV, "LOCAL_TOKEN_DELAY": "0.05"})
    conversation = new_id()
    with serve(create_app(settings)) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        for i in range(5):
            _, run_id = read_until(live.url, chat_body(user_id, conversation, f"{i} " + "x" * 4000),
                                   auth_headers(user_id), 2)
            stopped = client.post(f"/api/chat/runs/{run_id}/stop", json={"user_id": user_id, "seen_chars": 0},
                                  headers=auth_headers(user_id))
            assert stopped.status_code == 200 and stopped.json()["content"] == "", stopped.text
        last = client.post("/api/chat/stream", json=chat_body(user_id, conversation, "hello"),
                           headers=auth_headers(user_id))
    usage_of_turn = chunks(last.text)[-1]["usage"]
    assert usage_of_turn["input_tokens"] < 500 + 1000, usage_of_turn  # the history budget and the system prompt


def test_a_budget_no_turn_fits_in_is_warned_at_startup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A budget below what one turn reserves refuses every turn, each with 'used' 0: said once at startup, by name,
    so an operator does not read it as users having spent it (a budget of 1 still works as a switch)."""
    prices = '{"canvalo-local-responder": {"input": 1000, "output": 1000}}'
    small = make_settings(tmp_path, **BUDGET_ENV, MODEL_PRICES=prices, BUDGET_DAY_TOKENS="1000",
                          BUDGET_MONTH_TOKENS=EDGE, BUDGET_DAY_COST="1")
    with caplog.at_level("WARNING", logger="canvalo"), TestClient(create_app(small)):
        pass
    lines = [r.getMessage() for r in caplog.records if "every chat turn" in r.getMessage()]
    assert len(lines) == 2 and "BUDGET_DAY_TOKENS" in lines[0] and "BUDGET_DAY_COST" in lines[1], lines
    assert not any("BUDGET_MONTH_TOKENS" in line for line in lines)
