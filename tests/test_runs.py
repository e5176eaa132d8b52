"""Durable chat runs over real uvicorn servers, on both stores: a run outlives its connection, resumes from
``Last-Event-ID`` on any server sharing the store, stops from anywhere, deduplicates repeated sends, allows one run
per conversation, and survives a SIGKILL of its worker as ``interrupted`` with its saved text.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import create_app
from errors import UpstreamUnavailable
from services.agents.assistant import Assistant
from services.metrics import Metrics
from services.runs import manager as runs_module
from services.runs.feeds import LiveFeed
from services.runs.live import TEXT_SAVE_SECONDS, LiveRun
from services.runs.manager import RunManager
from services.store import Caller, NewRun, Run, RunControl, TurnLimits
from services.store import run_log
from services.store.run_log import UNSAVED_EVENTS_MAX, chunk, reaped_seq
from services.store.sqlite.store import SQLiteStore
from settings import Settings
from tests.conftest import AuthHeaders
from tests.scripted_model import ScriptedByMessage, ScriptedModel
from tests.support import LiveServer, chunks, event_ids, free_port, make_settings, new_id, serve, streamed_text
from tests.tokens import mint
from web.sse import EventStreamResponse

ROOT = Path(__file__).resolve().parent.parent


def slow_model(pieces: int = 60, pause: float = 0.02) -> ScriptedModel:
    return ScriptedModel(pieces=[f"w{i} " for i in range(pieces)], pause=pause)


def chat_body(user: str, conversation: str, message: str = "tell me everything", **extra: Any) -> dict[str, Any]:
    return {"message": message, "conversation_id": conversation, "user_id": user, **extra}


def read_until(url: str, body: dict[str, Any], headers: dict[str, str], events: int) -> tuple[str, str]:
    """POST a chat turn and leave after ``events`` events; (what was received, the run id)."""
    received = ""
    with httpx.stream("POST", f"{url}/api/chat/stream", json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        run_id = response.headers["x-run-id"]
        for text in response.iter_text():
            received += text
            if len(event_ids(received)) >= events:
                break
    return received, run_id


def resume(url: str, run_id: str, user: str, headers: dict[str, str], last_event_id: int | None = None,
           **params: Any) -> httpx.Response:
    extra = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    return httpx.get(f"{url}/api/chat/runs/{run_id}/events", params={"user_id": user, **params},
                     headers={**headers, **extra}, timeout=30)


def conversation(url: str, user: str, conversation_id: str, headers: dict[str, str]) -> dict[str, Any]:
    response = httpx.get(f"{url}/api/conversations/{conversation_id}", params={"user_id": user}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def answer(url: str, user: str, conversation_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """The last message as a stop answers it: without ``sibling_ids``, which only a conversation's read carries."""
    shown = conversation(url, user, conversation_id, headers)["messages"][-1]
    return {key: value for key, value in shown.items() if key != "sibling_ids"}


def wait_for(condition: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return result


@pytest.fixture
def pair(tmp_path: Path, service_env: dict[str, str]) -> Iterator[tuple[LiveServer, LiveServer, ScriptedModel]]:
    """Two servers sharing one store, as two workers or machines would: the first generates (slowly)."""
    settings = make_settings(tmp_path, **service_env)
    model = slow_model()
    with serve(create_app(settings, model=model)) as first, serve(create_app(settings, model=slow_model())) as second:
        yield first, second, model


# -- a run outlives its connection and resumes anywhere -----------------------------------------------------------


def test_a_disconnected_client_resumes_from_last_event_id_without_gaps_or_duplicates(
    pair: tuple[LiveServer, LiveServer, ScriptedModel], auth_headers: AuthHeaders, user_id: str
) -> None:
    first, _, model = pair
    conversation_id = new_id()
    received, run_id = read_until(first.url, chat_body(user_id, conversation_id), auth_headers(user_id), 5)
    seen_ids = event_ids(received)
    rest = resume(first.url, run_id, user_id, auth_headers(user_id), last_event_id=seen_ids[-1])
    assert rest.status_code == 200 and rest.headers["x-run-id"] == run_id
    ids = seen_ids + event_ids(rest.text)
    assert ids == list(range(1, len(ids) + 1))
    items = chunks(received) + chunks(rest.text)
    assert items[-1]["type"] == "complete" and items[-1]["run_id"] == run_id
    stored = answer(first.url, user_id, conversation_id, auth_headers(user_id))
    assert stored["content"] == streamed_text(items) == "".join(model.pieces)
    assert stored["metadata"]["status"] == "complete" and stored["metadata"]["run_id"] == run_id
    assert not model.cancelled.is_set()


def test_a_second_server_replays_and_follows_a_run_generating_on_the_first(
    pair: tuple[LiveServer, LiveServer, ScriptedModel], auth_headers: AuthHeaders, user_id: str
) -> None:
    first, second, model = pair
    conversation_id = new_id()
    received, run_id = read_until(first.url, chat_body(user_id, conversation_id), auth_headers(user_id), 3)
    # ?after= works as Last-Event-ID does; here from after event 2, on the other server, while the run goes on.
    rest = resume(second.url, run_id, user_id, auth_headers(user_id), after=2)
    assert rest.status_code == 200
    ids = event_ids(rest.text)
    assert ids == list(range(3, 3 + len(ids)))
    full = chunks(received)[:2] + chunks(rest.text)
    assert full[-1]["type"] == "complete"
    assert streamed_text(full) == "".join(model.pieces)
    assert len(model.requests) == 1  # the second server generated nothing


def test_a_finished_run_replays_and_a_resume_at_or_past_its_end_still_gets_its_terminal_event(
    pair: tuple[LiveServer, LiveServer, ScriptedModel], auth_headers: AuthHeaders, user_id: str
) -> None:
    first, second, _ = pair
    response = httpx.post(f"{first.url}/api/chat/stream", json=chat_body(user_id, new_id()),
                          headers=auth_headers(user_id), timeout=30)
    run_id = response.headers["x-run-id"]
    for server in (first, second):
        replay = resume(server.url, run_id, user_id, auth_headers(user_id))
        assert replay.text == response.text  # the same events, byte for byte
    terminal = response.text.rstrip("\n").rsplit("\n\n", 1)[-1] + "\n\n"
    last = event_ids(response.text)[-1]
    # A client that missed the end (or sends any id past it) learns the run is over, instead of reconnecting forever.
    for server in (first, second):
        for cursor in (last, last + 1, 10_000):
            assert resume(server.url, run_id, user_id, auth_headers(user_id), last_event_id=cursor).text == terminal


def test_a_resume_past_the_last_event_of_a_running_run_waits_for_its_own_cursor_without_pinging(
    pair: tuple[LiveServer, LiveServer, ScriptedModel], auth_headers: AuthHeaders, user_id: str
) -> None:
    """From this worker's memory and from the store: ahead of the run, a viewer is woken by no event before its own
    id (a ping per event was the bug: 63 pings in 3.2 s), and still ends with the run's terminal event."""
    first, second, model = pair
    _, run_id = read_until(first.url, chat_body(user_id, new_id()), auth_headers(user_id), 2)
    answers: dict[str, httpx.Response] = {}
    viewers = [threading.Thread(target=lambda s=server: answers.__setitem__(
        s.url, resume(s.url, run_id, user_id, auth_headers(user_id), last_event_id=10_000))) for server in pair[:2]]
    for viewer in viewers:
        viewer.start()
    for viewer in viewers:
        viewer.join(30)
    for url, response in answers.items():
        assert response.status_code == 200 and response.text.count(": ping") == 0, (url, response.text)
        assert [c["type"] for c in chunks(response.text)] == ["complete"], (url, response.text)
    assert len(answers) == 2 and len(model.requests) == 1


def test_viewers_of_a_run_on_another_worker_share_its_store_reads(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    """Counted in the store's read_run calls on the viewers' worker, 1 viewer against 20: each extra viewer costs
    its own ownership check and end, not a read every POLL_SECONDS (100 viewers each polling cost 1.4 cores)."""
    token = "m" * 32
    settings = make_settings(tmp_path, **{**service_env, "METRICS_TOKEN": token})
    metrics = {"Authorization": f"Bearer {token}"}

    def reads(url: str) -> float:
        text = httpx.get(f"{url}/metrics", headers=metrics, timeout=10).text
        counts = [line.rsplit(" ", 1)[1] for line in text.splitlines()
                  if line.startswith("canvalo_store_query_duration_seconds_count") and 'operation="read_run"' in line]
        return sum(float(count) for count in counts)

    def watch(url: str, viewers: int) -> float:
        received, run_id = read_until(first.url, chat_body(user_id, new_id()), auth_headers(user_id), 1)
        before = reads(url)
        replies: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: replies.append(resume(url, run_id, user_id, auth_headers(user_id))))
                   for _ in range(viewers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(replies) == viewers and all(chunks(r.text)[-1]["type"] == "complete" for r in replies)
        return reads(url) - before

    model = slow_model(pieces=40, pause=0.05)  # about 2 s: 8 poll intervals
    with serve(create_app(settings, model=model)) as first, serve(create_app(settings, model=slow_model())) as second:
        alone = watch(second.url, 1)
        crowd = watch(second.url, 20)
    assert crowd - alone <= 3 * 19, (alone, crowd)


def test_a_reloaded_page_finds_the_running_answer_and_attaches_where_its_text_ends(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    model = slow_model(pieces=60, pause=0.08)  # about 5 s, so both looks happen mid-answer
    settings = make_settings(tmp_path, **service_env)
    conversation_id = new_id()
    with serve(create_app(settings, model=model)) as first, serve(create_app(settings)) as second:
        _, run_id = read_until(first.url, chat_body(user_id, conversation_id), auth_headers(user_id), 10)
        time.sleep(1.1)  # a text save has happened since
        # The generating worker shows the answer live; another shows the last saved text; both say where it ends.
        looks = [answer(server.url, user_id, conversation_id, auth_headers(user_id)) for server in (first, second)]
        for server, shown in zip((first, second), looks):
            meta = shown["metadata"]
            assert (meta["status"], meta["run_id"]) == ("streaming", run_id)
            assert meta["seq"] >= 10 and shown["content"]
            rest = chunks(resume(server.url, run_id, user_id, auth_headers(user_id), after=meta["seq"]).text)
            assert shown["content"] + streamed_text(rest) == "".join(model.pieces)


# -- stop ---------------------------------------------------------------------------------------------------------


def test_stop_from_another_server_cancels_the_model_and_keeps_what_was_seen(
    pair: tuple[LiveServer, LiveServer, ScriptedModel], auth_headers: AuthHeaders, user_id: str
) -> None:
    first, second, model = pair
    conversation_id = new_id()
    received, run_id = read_until(first.url, chat_body(user_id, conversation_id), auth_headers(user_id), 4)
    seen = len(streamed_text(chunks(received))) - 2
    stop = {"user_id": user_id, "seen_chars": seen}
    url = f"{second.url}/api/chat/runs/{run_id}/stop"
    started = time.monotonic()
    stopped = httpx.post(url, json=stop, headers=auth_headers(user_id), timeout=30)
    took = time.monotonic() - started
    assert stopped.status_code == 200, stopped.text
    message = stopped.json()
    assert message["metadata"]["status"] == "stopped"
    assert message["content"] == streamed_text(chunks(received))[:seen]
    assert took < 4  # seen by the generating worker's next flush, not by the stop's own give-up deadline
    wait_for(model.cancelled.is_set)
    assert answer(first.url, user_id, conversation_id, auth_headers(user_id)) == message
    again = httpx.post(url, json={"user_id": user_id, "seen_chars": 1}, headers=auth_headers(user_id), timeout=30)
    assert again.status_code == 200 and again.json() == message  # idempotent: the first stop stands
    tail = chunks(resume(second.url, run_id, user_id, auth_headers(user_id)).text)[-1]
    assert (tail["type"], tail["status"], tail["stop_reason"]) == ("complete", "stopped", "stopped")
    # Its replay says what its stored answer says, from the first event or from any id a viewer holds.
    held = event_ids(received)
    for server in (first, second):
        replay = resume(server.url, run_id, user_id, auth_headers(user_id)).text
        assert streamed_text(chunks(replay)) == message["content"] and chunks(replay)[-1] == tail
        assert event_ids(replay) == sorted(set(event_ids(replay))) and event_ids(replay)[:len(held) - 1] == held[:-1]
        for cursor in held[:-1]:
            rest = resume(server.url, run_id, user_id, auth_headers(user_id), last_event_id=cursor).text
            before = chunks(received)[:held.index(cursor) + 1]
            assert streamed_text(before + chunks(rest)) == message["content"] and chunks(rest)[-1] == tail


def test_stop_on_the_generating_server_and_after_the_end(
    pair: tuple[LiveServer, LiveServer, ScriptedModel], auth_headers: AuthHeaders, user_id: str
) -> None:
    first, _, model = pair
    conversation_id = new_id()
    received, run_id = read_until(first.url, chat_body(user_id, conversation_id), auth_headers(user_id), 3)
    stopped = httpx.post(f"{first.url}/api/chat/runs/{run_id}/stop", json={"user_id": user_id},
                         headers=auth_headers(user_id), timeout=30).json()
    assert stopped["metadata"]["status"] == "stopped"
    assert stopped["content"].startswith(streamed_text(chunks(received)))  # no seen_chars: all that was made
    assert model.cancelled.wait(5)
    finished = httpx.post(f"{first.url}/api/chat/stream", json=chat_body(user_id, new_id(), "hi"),
                          headers=auth_headers(user_id), timeout=30)
    late = httpx.post(f"{first.url}/api/chat/runs/{finished.headers['x-run-id']}/stop",
                      json={"user_id": user_id, "seen_chars": 1}, headers=auth_headers(user_id), timeout=30).json()
    assert late["metadata"]["status"] == "complete" and late["content"] == streamed_text(chunks(finished.text))


# -- idempotent sends, one run per conversation ------------------------------------------------------------------


def test_a_repeated_client_message_id_attaches_to_the_same_run_without_a_second_generation(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    model = slow_model(pieces=20)
    settings = make_settings(tmp_path, **{**service_env, "RATE_LIMIT_CHAT_PER_MINUTE": "1"})
    conversation_id, client_message_id = new_id(), new_id()
    body = chat_body(user_id, conversation_id, client_message_id=client_message_id)
    with serve(create_app(settings, model=model)) as live:
        first, run_id = read_until(live.url, body, auth_headers(user_id), 2)  # still running when repeated
        repeated = httpx.post(f"{live.url}/api/chat/stream", json=body, headers=auth_headers(user_id), timeout=30)
        after_end = httpx.post(f"{live.url}/api/chat/stream", json=body, headers=auth_headers(user_id), timeout=30)
        messages = conversation(live.url, user_id, conversation_id, auth_headers(user_id))["messages"]
    assert repeated.status_code == after_end.status_code == 200  # not counted: the chat limit is 1
    assert repeated.headers["x-run-id"] == after_end.headers["x-run-id"] == run_id
    assert repeated.text == after_end.text and event_ids(repeated.text)[0] == 1  # replayed from the start
    assert streamed_text(chunks(repeated.text)) == "".join(model.pieces)
    assert len(model.requests) == 1
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert first.startswith("id: 1\n")


def test_a_repeated_send_with_last_event_id_resumes_after_it_and_a_send_that_starts_a_run_ignores_it(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    """@microsoft/fetch-event-source resumes by sending the same POST again with Last-Event-ID: on a network error,
    and by default whenever the tab becomes visible again."""
    model = slow_model(pieces=30)
    body = chat_body(user_id, new_id(), client_message_id=new_id())
    mine = auth_headers(user_id)
    with serve(create_app(make_settings(tmp_path, **service_env), model=model)) as live:
        send = f"{live.url}/api/chat/stream"
        first, run_id = read_until(live.url, body, {**mine, "Last-Event-ID": "7"}, 3)  # starts the run
        held = event_ids(first)[-1]
        resumed = httpx.post(send, json=body, headers={**mine, "Last-Event-ID": str(held)}, timeout=30)
        after_end = httpx.post(send, json=body, headers={**mine, "Last-Event-ID": "5"}, timeout=30)
        whole = httpx.post(send, json=body, headers={**mine, "Last-Event-ID": ""}, timeout=30)  # blank: absent
    assert event_ids(first)[0] == 1  # a new run streams from its first event, whatever the header said
    assert resumed.status_code == 200 and resumed.headers["x-run-id"] == run_id
    ids = event_ids(first) + event_ids(resumed.text)
    assert ids == list(range(1, len(ids) + 1))  # after what the client held: no gap, no duplicate
    assert chunks(resumed.text)[-1]["type"] == "complete"
    assert event_ids(whole.text)[0] == 1 and after_end.text == whole.text[whole.text.index("id: 6\n"):]
    assert len(model.requests) == 1


def test_a_send_with_a_malformed_last_event_id_is_a_422_and_starts_nothing(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    model = slow_model(pieces=2)
    with serve(create_app(make_settings(tmp_path, **service_env), model=model)) as live:
        for value in ("1e3", "-1", "x", "10000001", "+1"):
            conversation_id = new_id()
            refused = httpx.post(f"{live.url}/api/chat/stream", json=chat_body(user_id, conversation_id),
                                 headers={**auth_headers(user_id), "Last-Event-ID": value}, timeout=30)
            assert refused.status_code == 422, (value, refused.text)
            assert refused.json()["error"]["code"] == "VALIDATION_ERROR" and "Last-Event-ID" in refused.text
            listed = httpx.get(f"{live.url}/api/conversations/{conversation_id}", params={"user_id": user_id},
                               headers=auth_headers(user_id))
            assert listed.status_code == 404
    assert model.requests == []


def test_a_client_message_id_reused_for_another_message_is_a_conflict(
    pair: tuple[LiveServer, LiveServer, ScriptedModel], auth_headers: AuthHeaders, user_id: str
) -> None:
    first, _, _ = pair
    client_message_id = new_id()
    body = chat_body(user_id, new_id(), "hi", client_message_id=client_message_id)
    assert httpx.post(f"{first.url}/api/chat/stream", json=body, headers=auth_headers(user_id), timeout=30).is_success
    for changed in ({"message": "something else"}, {"conversation_id": new_id()}):
        refused = httpx.post(f"{first.url}/api/chat/stream", json={**body, **changed}, headers=auth_headers(user_id))
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    other_user = new_id()  # the same id from another user is theirs alone
    mine = {**body, "user_id": other_user, "conversation_id": new_id()}
    assert httpx.post(f"{first.url}/api/chat/stream", json=mine, headers=auth_headers(other_user), timeout=30).is_success


def test_one_run_per_conversation_even_when_sends_race(
    pair: tuple[LiveServer, LiveServer, ScriptedModel], auth_headers: AuthHeaders, user_id: str
) -> None:
    first, second, _ = pair
    conversation_id = new_id()
    headers = auth_headers(user_id)
    results: list[httpx.Response] = []

    def send(url: str, index: int) -> None:
        body = chat_body(user_id, conversation_id, f"question {index}")
        results.append(httpx.post(f"{url}/api/chat/stream", json=body, headers=headers, timeout=30))

    threads = [threading.Thread(target=send, args=(server.url, i)) for i in range(5) for server in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    started = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 409]
    assert len(started) + len(refused) == len(results) and started and refused
    assert all(r.json()["error"]["code"] == "RUN_IN_PROGRESS" for r in refused)
    winners = {r.headers["x-run-id"] for r in started}
    assert all(r.json()["error"]["runId"] in winners for r in refused)
    messages = conversation(first.url, user_id, conversation_id, headers)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * len(started)  # each answer after its question


# -- bounds, ownership, bad input -----------------------------------------------------------------------------------


def test_a_run_is_bounded_by_run_max_seconds(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    model = slow_model(pieces=100, pause=0.05)
    settings = make_settings(tmp_path, **{**service_env, "RUN_MAX_SECONDS": "1"})
    conversation_id = new_id()
    with serve(create_app(settings, model=model)) as live:
        response = httpx.post(f"{live.url}/api/chat/stream", json=chat_body(user_id, conversation_id),
                              headers=auth_headers(user_id), timeout=30)
        stored = answer(live.url, user_id, conversation_id, auth_headers(user_id))
    last = chunks(response.text)[-1]
    assert (last["type"], last["code"], last["retryable"]) == ("error", "RUN_TIMEOUT", False)
    assert stored["metadata"]["status"] == "error" and stored["metadata"]["error_code"] == "RUN_TIMEOUT"
    assert stored["content"] == streamed_text(chunks(response.text)) != ""
    assert model.cancelled.is_set()


@pytest.mark.parametrize("ending", ["complete", "error", "timeout", "stopped"])
def test_every_terminal_states_replay_says_what_its_stored_answer_says(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str, ending: str
) -> None:
    """From the worker that generated it and from another one (the store), from the first event and from each id a
    viewer held. (``interrupted`` is the SIGKILL test's.)"""
    model = slow_model(pieces=60 if ending == "timeout" else 30, pause=0.03)
    if ending == "error":
        model.fail_with = UpstreamUnavailable("The model is unavailable.", code="LLM_UNAVAILABLE")
    settings = make_settings(tmp_path, **{**service_env, "RUN_MAX_SECONDS": "1" if ending == "timeout" else "60"})
    conversation_id = new_id()
    with serve(create_app(settings, model=model)) as first, serve(create_app(settings, model=slow_model())) as second:
        received, run_id = read_until(first.url, chat_body(user_id, conversation_id), auth_headers(user_id), 3)
        if ending == "stopped":
            stop = {"user_id": user_id, "seen_chars": len(streamed_text(chunks(received))) - 1}
            httpx.post(f"{first.url}/api/chat/runs/{run_id}/stop", json=stop, headers=auth_headers(user_id), timeout=30)
        whole = resume(first.url, run_id, user_id, auth_headers(user_id)).text
        stored = answer(first.url, user_id, conversation_id, auth_headers(user_id))
        held = event_ids(whole)
        for server in (first, second):
            assert resume(server.url, run_id, user_id, auth_headers(user_id)).text == whole
            for cursor in held[::4] + held[-2:]:
                rest = resume(server.url, run_id, user_id, auth_headers(user_id), last_event_id=cursor).text
                shown = streamed_text(chunks(whole)[:held.index(cursor) + 1] + chunks(rest))
                assert shown == stored["content"] and chunks(rest)[-1] == chunks(whole)[-1], cursor
    status = {"complete": "complete", "error": "error", "timeout": "error", "stopped": "stopped"}[ending]
    assert stored["metadata"]["status"] == status and streamed_text(chunks(whole)) == stored["content"] != ""


def test_an_answer_outlives_its_users_access_token_and_is_saved(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str,
    request: pytest.FixtureRequest,
) -> None:
    """Tokens last an hour, runs up to RUN_MAX_SECONDS: on Supabase the run's write key, not the user's token, is
    what saves it (migrations/009_keyed_flush.sql), so a token that expires mid-answer costs nothing of it."""
    if service_env.get("STORE") == "supabase":
        fake = request.getfixturevalue("fake_postgrest")
        allowed, fake.jwt_skew_seconds = fake.jwt_skew_seconds, 0  # PostgREST allows 30 s; the answer lasts 5
        request.addfinalizer(lambda: setattr(fake, "jwt_skew_seconds", allowed))
    model = slow_model(pieces=80, pause=0.06)  # about 5 s, against a token with 2 to 3 s to live
    settings = make_settings(tmp_path, **service_env)
    conversation_id = new_id()
    auth_headers(user_id)  # registers the user on Supabase
    url = service_env.get("SUPABASE_URL")
    expires = int(time.time() + 3)
    token = mint(user_id, issuer=f"{url}/auth/v1" if url else None, exp=expires)
    short = {"Authorization": f"Bearer {token}"}
    with serve(create_app(settings, model=model)) as live:
        streamed = httpx.post(f"{live.url}/api/chat/stream", json=chat_body(user_id, conversation_id),
                              headers=short, timeout=30)
        assert streamed.status_code == 200 and time.time() > expires + 1, streamed.text
        stored = answer(live.url, user_id, conversation_id, auth_headers(user_id))
    assert chunks(streamed.text)[-1]["type"] == "complete"
    assert stored["metadata"]["status"] == "complete" and stored["content"] == "".join(model.pieces)


def test_a_send_whose_begin_answers_were_all_lost_is_answered_when_sent_again(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str,
    request: pytest.FixtureRequest,
) -> None:
    """On Supabase a begin can commit and its answer be lost (the gateway fails after the transaction), on every
    attempt: the client gets a retryable 503 while its run holds the conversation. Sent again (the same
    client_message_id), the turn is that begin, so its run starts generating now, not after RUN_STALE_SECONDS as an
    interrupted run. SQLite never commits without answering; there the resend is simply a new turn."""
    model = ScriptedModel(pieces=["Here ", "is ", "your ", "answer."])
    settings = make_settings(tmp_path, **service_env)
    conversation_id = new_id()
    body = chat_body(user_id, conversation_id, client_message_id=new_id())
    with serve(create_app(settings, model=model)) as live:
        if service_env.get("STORE") == "supabase":
            fake = request.getfixturevalue("fake_postgrest")
            fake.fail_next(503, after=True, times=settings.max_retry_attempts, path="rpc/agent_run_begin")
            lost = httpx.post(f"{live.url}/api/chat/stream", json=body, headers=auth_headers(user_id), timeout=30)
            assert (lost.status_code, lost.json()["error"]["retryable"]) == (503, True)
        started = time.monotonic()
        again = httpx.post(f"{live.url}/api/chat/stream", json=body, headers=auth_headers(user_id), timeout=30)
        took = time.monotonic() - started
        stored = answer(live.url, user_id, conversation_id, auth_headers(user_id))
    assert chunks(again.text)[-1]["type"] == "complete" and streamed_text(chunks(again.text)) == "Here is your answer."
    assert took < settings.run_stale_seconds / 2
    assert stored["content"] == "Here is your answer." and len(model.requests) == 1


def test_a_stopped_runs_replay_after_its_events_expired_shows_no_text_its_answer_lacks(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    """A stop cuts the answer at what the viewer saw; once the run's events expire but the batch with its end, a replay
    cannot count that cut from the first event any more: it shows the end alone, never text the stop cut off."""
    model = ScriptedModel(pieces=[f"{i:03d} " for i in range(300)], pause=0.01)
    settings = make_settings(tmp_path, **{**service_env, "RUN_EVENTS_TTL": "0"})
    conversation_id, headers = new_id(), auth_headers(user_id)
    with serve(create_app(settings, model=model)) as live:
        received = ""
        with httpx.stream("POST", f"{live.url}/api/chat/stream", json=chat_body(user_id, conversation_id),
                          headers=headers, timeout=30) as response:
            run_id = response.headers["x-run-id"]
            for text in response.iter_text():
                received += text
                if len(streamed_text(chunks(received))) > 60:
                    break
        time.sleep(0.6)  # it goes on generating and flushing past what the viewer saw
        stop = httpx.post(f"{live.url}/api/chat/runs/{run_id}/stop", json={"user_id": user_id, "seen_chars": 6},
                          headers=headers, timeout=30)
        assert stop.status_code == 200 and stop.json()["content"] == "000 00", stop.text
        early = resume(live.url, run_id, user_id, headers).text
        # The user's next turn sweeps the expired events (RUN_EVENTS_TTL 0): the batch with the end stays.
        httpx.post(f"{live.url}/api/chat/stream", json=chat_body(user_id, conversation_id, "next"), headers=headers,
                   timeout=30)
        late = resume(live.url, run_id, user_id, headers).text
        seen = resume(live.url, run_id, user_id, headers, last_event_id=event_ids(received)[-1]).text
    assert streamed_text(chunks(early)) == "000 00"
    for replay in (late, seen):
        assert streamed_text(chunks(replay)) == "" and chunks(replay)[-1]["status"] == "stopped", replay
        assert event_ids(replay) == [event_ids(early)[-1]]  # the end, under its own id


def test_deleting_the_conversation_stops_its_run_and_tells_every_viewer_so(
    pair: tuple[LiveServer, LiveServer, ScriptedModel], auth_headers: AuthHeaders, user_id: str
) -> None:
    """The viewer on the generating worker (from memory) and one on another worker (from the store) both end with
    one error chunk that says the conversation was deleted, not retryable: no "server stopped, send again", no
    connection cut without a word, no exception in the server."""
    first, second, model = pair
    conversation_id = new_id()
    _, run_id = read_until(first.url, chat_body(user_id, conversation_id), auth_headers(user_id), 1)
    answers: dict[str, httpx.Response] = {}
    viewers = [threading.Thread(target=lambda s=server: answers.__setitem__(
        s.url, resume(s.url, run_id, user_id, auth_headers(user_id), last_event_id=1))) for server in (first, second)]
    for viewer in viewers:
        viewer.start()
    time.sleep(0.3)
    deleted = httpx.delete(f"{second.url}/api/conversations/{conversation_id}", params={"user_id": user_id},
                           headers=auth_headers(user_id))
    assert deleted.status_code == 200
    assert model.cancelled.wait(5)
    for viewer in viewers:
        viewer.join(30)
    for url, response in answers.items():
        last = chunks(response.text)[-1]
        assert (last["type"], last["code"], last["retryable"]) == ("error", "CONVERSATION_DELETED", False), url
    assert len(answers) == 2


def test_a_stop_whose_run_has_not_ended_is_a_202_with_the_message_as_saved(
    client: Any, auth_headers: AuthHeaders, user_id: str
) -> None:
    """A run no worker here generates and whose heartbeat is fresh (its worker is slow, or has just died): the stop
    is asked and the answer says so, instead of a 200 for an answer that still says streaming."""
    store = client.app_state["store"]
    from services.store import NewRun, TurnLimits

    begun = client.portal.call(store.begin_run, Caller(user_id, _token(auth_headers, user_id)),
                               NewRun(new_id(), "hello", "hello"), TurnLimits(30, 3600), 10)
    stopped = client.post(f"/api/chat/runs/{begun.run.id}/stop", json={"user_id": user_id, "seen_chars": 5.0},
                          headers=auth_headers(user_id))
    assert stopped.status_code == 202, stopped.text
    assert (stopped.json()["metadata"]["status"], stopped.json()["id"]) == ("streaming", begun.run.assistant_message_id)


def _token(auth: AuthHeaders, user: str) -> str | None:
    return auth(user).get("Authorization", "").removeprefix("Bearer ") or None


def test_runs_are_private_and_bad_resume_input_is_a_4xx(
    pair: tuple[LiveServer, LiveServer, ScriptedModel], auth_headers: AuthHeaders, user_id: str
) -> None:
    first, _, _ = pair
    response = httpx.post(f"{first.url}/api/chat/stream", json=chat_body(user_id, new_id(), "hi"),
                          headers=auth_headers(user_id), timeout=30)
    run_id = response.headers["x-run-id"]
    intruder = new_id()
    for attempt in (
        resume(first.url, run_id, intruder, auth_headers(intruder)),
        httpx.post(f"{first.url}/api/chat/runs/{run_id}/stop", json={"user_id": intruder},
                   headers=auth_headers(intruder)),
        resume(first.url, new_id(), user_id, auth_headers(user_id)),
    ):
        assert attempt.status_code == 404 and attempt.json()["error"]["code"] == "RUN_NOT_FOUND"
    bad = [
        resume(first.url, run_id, user_id, auth_headers(user_id), last_event_id=None, after="-1"),
        resume(first.url, run_id, user_id, auth_headers(user_id), after="x"),
        httpx.get(f"{first.url}/api/chat/runs/{run_id}/events", params={"user_id": user_id},
                  headers={**auth_headers(user_id), "Last-Event-ID": "1e3"}),
        httpx.get(f"{first.url}/api/chat/runs/not-a-uuid/events", params={"user_id": user_id},
                  headers=auth_headers(user_id)),
        httpx.post(f"{first.url}/api/chat/runs/{run_id}/stop", json={"user_id": user_id, "seen_chars": -1},
                   headers=auth_headers(user_id)),
        httpx.post(f"{first.url}/api/chat/runs/{run_id}/stop", json={"user_id": user_id, "seen_chars": True},
                   headers=auth_headers(user_id)),
        httpx.post(f"{first.url}/api/chat/runs/{run_id}/stop", json={"user_id": user_id, "seen_chars": 1.5},
                   headers=auth_headers(user_id)),
        httpx.post(f"{first.url}/api/chat/stream", json=chat_body(user_id, new_id(), client_message_id="nope"),
                   headers=auth_headers(user_id)),
    ]
    for refused in bad:
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "VALIDATION_ERROR"


# -- what reaches the store, and when --------------------------------------------------------------------------------


def test_events_are_written_in_batches_not_one_write_per_token(tmp_path: Path, user_id: str) -> None:
    model = slow_model(pieces=60, pause=0.02)  # about 1.2 s of tokens
    settings = make_settings(tmp_path)
    conversation_id = new_id()
    with serve(create_app(settings, model=model)) as live:
        response = httpx.post(f"{live.url}/api/chat/stream", json=chat_body(user_id, conversation_id), timeout=30)
    run_id = response.headers["x-run-id"]
    with sqlite3.connect(settings.sqlite_path) as db:
        batches = db.execute("SELECT seq, last_seq FROM agent_run_events WHERE run_id = ? ORDER BY seq",
                             (run_id,)).fetchall()
    events = len(event_ids(response.text))
    assert streamed_text(chunks(response.text)) == "".join(model.pieces)
    assert events > 20  # tokens 20 ms apart reach a reading viewer as events of their own (waiting ones merge)
    assert 2 <= len(batches) <= 1.2 / 0.25 + 3  # a flush every 250 ms at most, not a write per token
    assert [first for first, _ in batches] == [1] + [last + 1 for _, last in batches[:-1]]  # contiguous
    assert batches[-1][1] == events


def test_finished_runs_lose_their_events_after_the_ttl_but_still_end_a_resume(
    tmp_path: Path, auth_headers: AuthHeaders, user_id: str, service_env: dict[str, str]
) -> None:
    settings = make_settings(tmp_path, **{**service_env, "RUN_EVENTS_TTL": "0"})
    conversation_id = new_id()
    with serve(create_app(settings, model=slow_model(pieces=40))) as live:
        response = httpx.post(f"{live.url}/api/chat/stream", json=chat_body(user_id, conversation_id),
                              headers=auth_headers(user_id), timeout=30)
        run_id = response.headers["x-run-id"]
        # The next turn of the same user sweeps what has expired (and, on SQLite, so does every worker's periodic
        # maintenance, which this test does not wait for).
        httpx.post(f"{live.url}/api/chat/stream", json=chat_body(user_id, conversation_id, "again"),
                   headers=auth_headers(user_id), timeout=30)
        replay = resume(live.url, run_id, user_id, auth_headers(user_id))
        kept = answer(live.url, user_id, conversation_id, auth_headers(user_id))
    assert chunks(replay.text)[-1]["type"] == "complete"
    assert len(event_ids(replay.text)) < len(event_ids(response.text))
    assert kept["metadata"]["status"] == "complete"


# -- a worker killed mid-run ---------------------------------------------------------------------------------------


def start_service(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    full = {**os.environ, **env, "API_HOST": "127.0.0.1", "API_PORT": str(port), "LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=full,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code in (200, 503):
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.1)


@pytest.mark.parametrize("stopped", [False, True], ids=["dead", "dead-then-stopped"])
def test_sigkill_mid_run_leaves_it_interrupted_with_its_saved_text_and_frees_the_slot(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str, stopped: bool
) -> None:
    """And a stop sent to the run of a dead worker, through another one, ends it ``stopped`` (once its heartbeat
    lapses) cut where its viewer saw, and its replay says the same."""
    env = {**service_env, "SQLITE_PATH": str(tmp_path / "canvalo.db"), "LOCAL_TOKEN_DELAY": "0.3",
           "RUN_STALE_SECONDS": "2", "MAX_STREAMS_PER_USER": "1"}
    port, other_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    conversation_id = new_id()
    process = start_service(env, port)
    other = start_service(env, other_port) if stopped else None
    try:
        received, run_id = read_until(url, chat_body(user_id, conversation_id, "hello"), auth_headers(user_id), 5)
        time.sleep(1.5)  # past a text save (every second)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        cut = len(streamed_text(chunks(received))) - 1
        if other is not None:
            stop = httpx.post(f"http://127.0.0.1:{other_port}/api/chat/runs/{run_id}/stop",
                              json={"user_id": user_id, "seen_chars": cut}, headers=auth_headers(user_id), timeout=30)
            assert stop.status_code == 200 and stop.json()["metadata"]["status"] == "stopped", stop.text
    finally:
        for started in (process, other):
            if started is not None and started.poll() is None:
                started.kill()
                started.wait()
    process = start_service(env, port)
    try:
        time.sleep(2.5)  # the dead run's heartbeat lapses (RUN_STALE_SECONDS)
        stored = answer(url, user_id, conversation_id, auth_headers(user_id))
        replay = chunks(resume(url, run_id, user_id, auth_headers(user_id)).text)
        # From the highest id the viewer held: the end, under an id it has never seen.
        tail = resume(url, run_id, user_id, auth_headers(user_id), last_event_id=event_ids(received)[-1]).text
        again = httpx.post(f"{url}/api/chat/stream", json=chat_body(user_id, conversation_id, "hello again"),
                           headers=auth_headers(user_id), timeout=30)
    finally:
        process.kill()
        process.wait()
    seen = streamed_text(chunks(received))
    assert stored["metadata"]["run_id"] == run_id
    assert stored["content"] == streamed_text(replay)  # exactly what the replay shows
    if stopped:
        assert stored["metadata"]["status"] == "stopped" and stored["content"] == seen[:cut]
        assert (replay[-1]["type"], replay[-1]["status"]) == ("complete", "stopped")
    else:
        assert stored["metadata"]["status"] == "interrupted"
        assert stored["content"].startswith(seen)  # at least what the viewer had, saved before the kill
        assert (replay[-1]["type"], replay[-1]["code"], replay[-1]["retryable"]) == ("error", "RUN_INTERRUPTED", True)
    assert chunks(tail)[-1] == replay[-1] and event_ids(tail)[-1] > event_ids(received)[-1]
    assert again.status_code == 200, again.text  # the conversation and the user's one stream slot are free
    assert chunks(again.text)[-1]["type"] == "complete"


class Held:
    """Given to a run as its caller's token: a weak reference to it shows whether the run is still kept in memory."""


def live_run(token: Held | None = None) -> LiveRun:
    """A run generating on this worker, outside any server: for its viewers' and its flushes' own behaviour."""
    run = Run(new_id(), new_id(), new_id(), new_id(), None, "running", 0, time.time())
    return LiveRun(run, Caller(new_id(), token))  # type: ignore[arg-type]


def test_viewers_are_shown_no_more_than_unsaved_events_max_past_the_last_save() -> None:
    """So the end a dead worker's run is given (run_log.reaped_seq: the last saved id + UNSAVED_EVENTS_MAX + 1) has an
    id no viewer can hold: a client's Last-Event-ID never names other content, and its resume reaches the end."""
    live = live_run()
    for _ in range(UNSAVED_EVENTS_MAX + 5):
        live.emit(chunk("tool_call", "invoices", tool_name="list_invoices"))
    assert (len(live.frames), live.visible) == (UNSAVED_EVENTS_MAX + 5, UNSAVED_EVENTS_MAX)
    assert reaped_seq(0) > live.visible
    live.committed(live.take_update(time.monotonic()), time.monotonic())  # saved: all may be seen
    assert live.visible == UNSAVED_EVENTS_MAX + 5
    # An end that could not be saved shows nothing more than was visible, then a farewell under no id; every frame
    # is kept, to be saved once the store takes it.
    live.emit(chunk("tool_call", "invoices", tool_name="list_invoices"))
    live.finish("complete", chunk("complete", "invoices"), "", {}, "invoices")
    farewell = run_log.frame(None, chunk("error", "supervisor", code="STORE_UNAVAILABLE"))
    live.publish_end(farewell)
    assert (len(live.frames), live.visible) == (UNSAVED_EVENTS_MAX + 7, UNSAVED_EVENTS_MAX + 6)

    async def view() -> tuple[str, int, bool]:
        return await LiveFeed(live).next_frames(UNSAVED_EVENTS_MAX + 5, 1.0)

    assert asyncio.run(view()) == (live.frames[UNSAVED_EVENTS_MAX + 5] + farewell, UNSAVED_EVENTS_MAX + 6, True)


def test_a_stopped_runs_replay_is_its_log_up_to_the_cut_then_its_end() -> None:
    """run_log.stopped_replay, which both a live viewer and a replay from the store use: the frame that crosses
    the cut keeps its id and its text up to the cut; later frames but the terminal one are left out."""
    live = live_run()
    for item in (chunk("token", "invoices", content="ab"), chunk("tool_call", "invoices", tool_name="list_invoices"),
                 chunk("token", "invoices", content="cdé"), chunk("token", "invoices", content="fg"),
                 chunk("tool_call", "invoices", tool_name="list_invoices")):
        live.emit(item)
        live.seal()
    live.finish("complete", chunk("complete", "invoices", status="stopped"), "", {}, "invoices")
    frames = live.frames  # 1 "ab", 2 a tool call, 3 "cdé", 4 "fg", 5 a tool call, 6 the end
    trimmed = run_log.frame(3, {**chunks(frames[2])[0], "content": "cd"})
    for kept, expected in ((0, ["", "", "", "", ""]), (2, frames[:2] + ["", "", ""]), (4, frames[:2] + [trimmed, "", ""]),
                           (5, frames[:3] + ["", ""]), (7, frames[:5]), (99, frames[:5])):
        replay = run_log.stopped_replay(frames, kept)
        assert replay == expected + frames[-1:], kept
        assert run_log.streamed_text("".join(replay)) == "abcdéfg"[:kept]
    # A live viewer of a run that ended stopped here reads it so too, from the start or from any id it holds.
    stopped = live_run()
    for token in ("one ", "two ", "three"):
        stopped.emit(chunk("token", "invoices", content=token))
        stopped.seal()
    stopped.finish("stopped", chunk("complete", "invoices", status="stopped"), "one tw", {}, "invoices")
    stopped.publish_end()

    async def view(after: int) -> tuple[str, int, bool]:
        return await LiveFeed(stopped).next_frames(after, 1.0)

    whole, cursor, over = asyncio.run(view(0))
    assert run_log.streamed_text(whole) == "one tw" and (cursor, over) == (4, True)
    assert event_ids(whole) == [1, 2, 4] and asyncio.run(view(2))[0] == stopped.frames[-1]


def test_a_runs_text_is_saved_every_text_save_seconds_counted_from_its_start() -> None:
    # Admission saved the empty placeholder, so the first text save waits one interval like every later one: saving
    # at the first flush put a burst's text saves on the writer thread just as its first tokens went out.
    async def scenario() -> list[str | None]:
        live = live_run()
        start = time.monotonic()
        saved = []
        for at, token in ((0.1, "a"), (TEXT_SAVE_SECONDS + 0.1, "b"), (TEXT_SAVE_SECONDS + 0.5, "c")):
            live.emit(chunk("token", "supervisor", content=token))
            update = live.take_update(start + at)
            live.committed(update, start + at)
            saved.append(update.content)
        return saved

    assert asyncio.run(scenario()) == [None, "ab", None]


def test_a_live_viewer_times_out_only_after_a_quiet_timeout_whatever_its_earlier_waits() -> None:
    # The viewer's timer is set once and moved on lazily (services/runs/feeds.py, LiveFeed): a timer left from an
    # earlier, shorter-lived wait must neither end a later wait early nor hold a shorter one back.
    async def scenario() -> list[tuple[bool, float]]:
        loop = asyncio.get_running_loop()
        live = live_run()
        feed = LiveFeed(live)
        waits: list[tuple[bool, float]] = []
        cursor = 0

        async def wait(timeout: float, frame_after: float | None) -> None:
            nonlocal cursor
            if frame_after is not None:
                loop.call_later(frame_after, live.emit, chunk("token", "supervisor", content="x"))
            started = loop.time()
            text, cursor, _ = await feed.next_frames(cursor, timeout)
            waits.append((bool(text), loop.time() - started))

        await wait(0.3, 0.2)  # a frame before the timeout: its timer is due at 0.3
        await wait(0.3, None)  # no frame: that timer fires 0.1 into this wait, which must go on to 0.3
        await wait(5.0, 0.05)  # a long timeout answered by a frame
        await wait(0.1, None)  # a shorter timeout than the timer left armed: due at 0.1, not at 5
        return waits

    waits = asyncio.run(scenario())
    assert [framed for framed, _ in waits] == [True, False, True, False]
    assert 0.15 <= waits[0][1] < 0.3
    assert 0.28 <= waits[1][1] < 0.5
    assert 0.08 <= waits[3][1] < 0.5


def test_a_live_viewer_keeps_nothing_in_memory_once_the_run_is_over_or_it_leaves() -> None:
    # An armed timer would hold the feed, and through it the run's frames, until it fired.
    async def scenario() -> list[weakref.ref[Held]]:
        loop = asyncio.get_running_loop()
        ended = live_run(Held())
        feed = LiveFeed(ended)
        loop.call_later(0.05, ended.emit, chunk("token", "supervisor", content="x"))
        _, cursor, _ = await feed.next_frames(0, 30)
        ended.publish_end()
        assert (await feed.next_frames(cursor, 30))[2]  # over

        left = live_run(Held())
        viewing = asyncio.ensure_future(LiveFeed(left).next_frames(0, 30))
        await asyncio.sleep(0.05)
        viewing.cancel()
        await asyncio.gather(viewing, return_exceptions=True)
        refs = [weakref.ref(ended.caller.access_token), weakref.ref(left.caller.access_token)]  # type: ignore[arg-type]
        del feed, ended, left, viewing
        gc.collect()
        return refs  # checked while the loop, and any timer on it, is still alive

    assert [ref() for ref in asyncio.run(scenario())] == [None, None]


def test_a_live_viewer_that_leaves_while_sending_keeps_nothing_in_memory() -> None:
    # The client disconnects while the response is blocked writing to it (a slow client, a full socket buffer): the
    # viewer leaves from inside send, not from a wait, and its timer must not keep the run's frames alive.
    async def scenario() -> weakref.ref[Held]:
        live = live_run(Held())
        sending, left = asyncio.Event(), asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message.get("body"):
                sending.set()
                await asyncio.sleep(3600)  # the client reads nothing

        async def receive() -> dict[str, Any]:
            await left.wait()
            return {"type": "http.disconnect"}

        response = EventStreamResponse(LiveFeed(live), after=0, ping_interval=30, shutdown_frame="")
        viewing = asyncio.ensure_future(response({"type": "http"}, receive, send))
        await asyncio.sleep(0.01)
        live.emit(chunk("token", "supervisor", content="x"))
        await sending.wait()
        left.set()
        await viewing
        live.finish("complete", chunk("complete", "supervisor"), "x", {}, "supervisor")
        live.publish_end()
        held = weakref.ref(live.caller.access_token)  # type: ignore[arg-type]
        del live, response, viewing
        gc.collect()
        return held  # checked while the loop, and any timer on it, is still alive

    assert asyncio.run(scenario())() is None


# -- a store that refuses this worker's flushes (a full disk, an expired token): the run manager over real SQLite ----


class Refusing:
    """The real SQLite store, but for ``flush_runs``, which fails while ``refuse`` is set, as a full disk does, raises
    ``fault`` while it is set, as a bug would, and answers every update of a run in ``rejects`` as refused bad input,
    writing the others."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.refuse = inner, False
        self.fault: Exception | None = None
        self.rejects: set[str] = set()
        self.sweeps = 0  # background sweeps (maintain_runs for every user) asked of the store
        self.flushes = 0
        self.sent: Counter[str] = Counter()  # updates sent, by run

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def maintain_runs(self, caller: Caller | None, stale_seconds: float, events_ttl: float) -> None:
        self.sweeps += caller is None
        await self.inner.maintain_runs(caller, stale_seconds, events_ttl)

    async def flush_runs(self, updates: list[Any]) -> Any:
        self.flushes += 1
        if self.refuse:
            raise UpstreamUnavailable("The database is unavailable.", code="STORE_UNAVAILABLE")
        if self.fault is not None:
            raise self.fault
        self.sent.update(update.run_id for update in updates)
        controls = await self.inner.flush_runs([update for update in updates if update.run_id not in self.rejects])
        return {**controls, **{u.run_id: RunControl(rejected=True) for u in updates if u.run_id in self.rejects}}


async def _manager(tmp_path: Path, model: Any, stale: float = 30.0) -> tuple[Any, Refusing, RunManager]:
    inner = SQLiteStore(str(tmp_path / "runs.db"))
    await inner.open()
    store = Refusing(inner)
    settings = Settings(history_max_messages=20, history_token_budget=10_000, run_max_seconds=120,
                        run_stale_seconds=stale, run_events_ttl=3600, model_prices={})
    manager = RunManager(store, Assistant(model, store, action_ttl=600), Metrics(""), settings)  # type: ignore[arg-type]
    await manager.open()
    return inner, store, manager


async def _begin(manager: RunManager, caller: Caller, conversation: str | None = None, text: str = "hello") -> Run:
    new = NewRun(conversation or new_id(), text, text)
    begun = await manager.begin(caller, new, TurnLimits(manager.stale_seconds, 3600), time.perf_counter())
    assert begun.run is not None
    return begun.run


async def _until(condition: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):  # a test that fails, not one that hangs
        while not condition():
            await asyncio.sleep(0.02)


def test_a_run_reaped_elsewhere_while_this_worker_could_not_save_reuses_no_id_its_viewers_hold(tmp_path: Path) -> None:
    """This worker's flushes fail, another worker (sharing the store) ends the run as dead: its end's id is one no
    viewer was shown, and the viewer here is told what the store holds (interrupted), under no id."""

    async def scenario() -> tuple[list[int], str, int]:
        inner, store, manager = await _manager(tmp_path, ScriptedModel([f"w{i} " for i in range(2500)], pause=0.002))
        caller = Caller(new_id())
        run = await _begin(manager, caller)
        live = manager._live[run.id]
        feed, received = LiveFeed(live), []

        async def view() -> None:
            cursor, over = 0, False
            while not over:
                text, cursor, over = await feed.next_frames(cursor, 1.0)
                received.append(text)

        viewer = asyncio.get_running_loop().create_task(view())
        while len(live.frames) < 50:
            await asyncio.sleep(0.01)
        store.refuse = True
        while len(live.frames) < live.visible + 300:  # well past what viewers may see unsaved
            await asyncio.sleep(0.01)
        await inner.maintain_runs(None, 0.2, 3600)  # another worker: the heartbeat is past its RUN_STALE_SECONDS
        end = (await inner.read_run(caller, run.id, None)).run.last_seq
        store.refuse = False
        await asyncio.wait_for(viewer, 20)
        await manager.aclose()
        await inner.aclose()
        return event_ids("".join(received)), "".join(received), end

    seen, text, end = asyncio.run(scenario())
    assert max(seen) < end  # every id the viewer holds is below the stored end's
    last = chunks(text)[-1]
    assert (last["code"], last["retryable"]) == ("RUN_INTERRUPTED", True)
    assert text.rstrip("\n").rsplit("\n\n", 1)[-1].startswith("data: ")


def test_a_turn_is_refused_while_this_worker_holds_an_unsaved_answer_of_the_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admitting a turn ends the user's dead runs: while this worker holds one the store has not taken, the turn is
    a retryable 503 (not an admission that would end it with what was saved), and once the store takes it again the
    whole answer is saved and the retry is admitted."""
    monkeypatch.setattr(runs_module, "FINAL_SAVE_SECONDS", 1.0)  # our own timing, so viewers are let go sooner

    async def scenario() -> tuple[str, str, str, int]:
        model = ScriptedModel([f"w{i} " for i in range(40)], pause=0.02)
        inner, store, manager = await _manager(tmp_path, model, stale=2.0)
        caller = Caller(new_id())
        run = await _begin(manager, caller)
        live = manager._live[run.id]
        while len(live.parts) < 5:
            await asyncio.sleep(0.01)
        store.refuse = True
        while live.farewell is None:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.2)  # its heartbeat is past RUN_STALE_SECONDS
        with pytest.raises(UpstreamUnavailable) as refused:
            await _begin(manager, caller, run.conversation_id)
        store.refuse = False
        while run.id in manager._live:
            await asyncio.sleep(0.05)
        stored = (await inner.read_run(caller, run.id, None)).message
        again = await _begin(manager, caller, run.conversation_id)
        await manager.aclose()
        await inner.aclose()
        return refused.value.code, stored.content, stored.metadata["status"], len(again.id)

    code, content, status, admitted = asyncio.run(scenario())
    assert code == "STORE_UNAVAILABLE"
    assert (content, status) == ("".join(f"w{i} " for i in range(40)), "complete")
    assert admitted == 36


def test_flushes_per_second_do_not_grow_with_the_runs_that_end(tmp_path: Path) -> None:
    """A run's end asks for a flush at once; 100 ends in about a second still make at most one flush per
    FLUSH_GAP_SECONDS (each carrying every end since), not one each. Counted: flush calls to the store."""

    async def scenario() -> tuple[int, float, set[str]]:
        inner, store, manager = await _manager(tmp_path, ScriptedModel(["a", "b"], pause=0.05))
        caller = Caller(new_id())
        started = time.monotonic()
        before = store.flushes
        runs = []
        for _ in range(100):
            runs.append(await _begin(manager, caller))
            await asyncio.sleep(0.01)
        while manager._live:
            await asyncio.sleep(0.01)
        flushes, took = store.flushes - before, time.monotonic() - started
        statuses = {(await inner.read_run(caller, run.id, None)).run.status for run in runs}
        await manager.aclose()
        await inner.aclose()
        return flushes, took, statuses

    flushes, took, statuses = asyncio.run(scenario())
    assert statuses == {"complete"}
    assert flushes <= took / runs_module.FLUSH_GAP_SECONDS + 2 and flushes < 50, (flushes, took)


@pytest.mark.parametrize("failure", ["refused", "bug"])
def test_no_sweep_runs_while_this_workers_flushes_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    """Its own runs' heartbeats lapse while its flushes fail, whether the store refuses them or a bug breaks them: a
    sweep then (the moment the store came back, say) would end them as dead with their last saved text. Counted:
    sweeps asked in each phase. A bug is logged without what its message quotes (an answer, say)."""
    monkeypatch.setattr(runs_module, "MAINTAIN_SECONDS", 0.05)

    async def scenario() -> tuple[int, int, str]:
        inner, store, manager = await _manager(tmp_path, ScriptedModel(["a"] * 400, pause=0.01))
        caller = Caller(new_id())
        run = await _begin(manager, caller)
        await asyncio.sleep(0.3)
        assert store.sweeps > 0  # sweeping while flushes go through
        if failure == "refused":
            store.refuse = True
        else:
            store.fault = RuntimeError("the answer so far: secret words")
        await asyncio.sleep(0.3)  # the flush in flight settles
        before = store.sweeps
        await asyncio.sleep(1.0)  # 20 sweep intervals
        refused = store.sweeps - before
        store.refuse, store.fault = False, None
        await asyncio.sleep(0.5)
        resumed = store.sweeps - before - refused
        await manager.aclose()
        status = (await inner.read_run(caller, run.id, None)).run.status
        await inner.aclose()
        return refused, resumed, status

    with caplog.at_level(logging.WARNING):
        refused, resumed, status = asyncio.run(scenario())
    assert refused == 0 and resumed > 0
    assert status in ("complete", "interrupted")  # saved by this worker, never ended as dead by its own sweep
    assert "secret words" not in caplog.text
    if failure == "bug":
        assert "Unexpected RuntimeError while flushing" in caplog.text


def test_sweeps_resume_once_this_worker_holds_nothing_unsaved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose last held run was given up (UNSAVED_KEEP_SECONDS) sweeps again: a dead run elsewhere ends."""
    monkeypatch.setattr(runs_module, "FINAL_SAVE_SECONDS", 0.2)
    monkeypatch.setattr(runs_module, "UNSAVED_KEEP_SECONDS", 0.3)
    monkeypatch.setattr(runs_module, "MAINTAIN_SECONDS", 0.2)

    async def scenario() -> str:
        inner, store, manager = await _manager(tmp_path, ScriptedModel(["a", "b"]), stale=2.0)
        caller = Caller(new_id())
        orphan = (await inner.begin_run(caller, NewRun(new_id(), "x", "x"), TurnLimits(2, 3600), 10)).run
        assert orphan is not None  # no worker generates it: it dies once its heartbeat is 2 s old
        run = await _begin(manager, caller)
        store.refuse = True
        while run.id in manager._live:  # ended, refused, kept, then given up
            await asyncio.sleep(0.05)
        store.refuse = False
        await asyncio.sleep(3)
        status = (await inner.read_run(caller, orphan.id, None)).run.status
        await manager.aclose()
        await inner.aclose()
        return status

    assert asyncio.run(scenario()) == "interrupted"


# -- a run whose update the store refuses as bad input: the run manager over real SQLite ---------------------------


def test_a_run_whose_update_the_store_refuses_ends_as_an_error_and_the_others_are_saved_whole(tmp_path: Path) -> None:
    """A model path that lets a lone surrogate through (no UTF-8 encoder writes one, so real SQLite refuses every
    update holding it): that run stops and ends ``RUN_NOT_SAVED`` with what was saved, its answer and its replay
    agreeing, while another user's run, in the same flushes, is saved whole."""

    async def scenario() -> tuple[Any, Any, str | None, bool, bool]:
        clean = ScriptedModel([f"w{i} " for i in range(150)], pause=0.01)
        poisoned = ScriptedModel([f"k{i} " for i in range(40)] + ["\ud83d"] + [f"p{i} " for i in range(40)],
                                 pause=0.02)
        inner, store, manager = await _manager(tmp_path, ScriptedByMessage({"poison": poisoned}, clean))
        alice, bob = Caller(new_id()), Caller(new_id())
        bad, good = await _begin(manager, alice, text="poison"), await _begin(manager, bob)
        live = manager._live[bad.id]
        await _until(lambda: not manager._live)
        flushing = manager._flushing
        views = await inner.read_run(alice, bad.id, 0), await inner.read_run(bob, good.id, 0)
        await manager.aclose()
        await inner.aclose()
        return *views, live.farewell, poisoned.cancelled.is_set(), flushing

    bad, good, farewell, cancelled, flushing = asyncio.run(scenario())
    saved = "".join(batch.frames for batch in good.batches)
    assert (good.run.status, good.message.content) == ("complete", "".join(f"w{i} " for i in range(150)))
    assert run_log.streamed_text(saved) == good.message.content and chunks(saved)[-1]["type"] == "complete"
    replay = "".join(batch.frames for batch in bad.batches)
    assert (bad.run.status, bad.message.metadata["error_code"]) == ("error", "RUN_NOT_SAVED")
    assert bad.message.content == run_log.streamed_text(replay)  # the answer is what its replay streams
    assert bad.message.content.startswith("k0 k1 ") and "p0" not in bad.message.content
    assert chunks(replay)[-1]["code"] == "RUN_NOT_SAVED"
    assert farewell is not None and chunks(farewell)[-1]["code"] == "RUN_NOT_SAVED"  # its viewers are told so, no id
    ids = event_ids(replay)
    assert ids[-1] == reaped_seq(ids[-2]) == bad.run.last_seq  # above every id its viewers could have been shown
    assert cancelled and flushing  # it stopped generating; the worker's flushes count as going through


def test_a_run_whose_end_too_the_store_refuses_is_given_up_and_ends_as_a_dead_workers_run(tmp_path: Path) -> None:
    """Even its end refused, a run is tried no more: it leaves memory, its viewers are told it was interrupted, and a
    sweep ends it so once its heartbeat lapses; the other run on the worker is saved whole meanwhile."""

    async def scenario() -> tuple[int, str | None, str, str, str]:
        inner, store, manager = await _manager(tmp_path, ScriptedModel([f"w{i} " for i in range(150)], pause=0.01))
        alice, bob = Caller(new_id()), Caller(new_id())
        bad = await _begin(manager, alice)
        store.rejects.add(bad.id)  # every update of it, its end too
        good = await _begin(manager, bob)
        live = manager._live[bad.id]
        await _until(lambda: bad.id not in manager._live)
        sent = store.sent[bad.id]
        await _until(lambda: not manager._live)  # the other run's flushes go on meanwhile
        later = store.sent[bad.id] - sent
        await inner.maintain_runs(None, 0, 3600)  # its heartbeat lapsed (RUN_STALE_SECONDS 0 here)
        ended, whole = await inner.read_run(alice, bad.id, None), await inner.read_run(bob, good.id, None)
        await manager.aclose()
        await inner.aclose()
        return later, live.farewell, ended.run.status, whole.run.status, whole.message.content

    later, farewell, status, other, content = asyncio.run(scenario())
    assert later == 0 and farewell is not None and chunks(farewell)[-1]["code"] == "RUN_INTERRUPTED"
    assert status == "interrupted"
    assert (other, content) == ("complete", "".join(f"w{i} " for i in range(150)))


def test_a_shutdown_while_the_store_refuses_writes_names_the_runs_it_loses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM during an outage: what the store never took is lost (docs/operations.md, Shutdown). It is said once, at
    ERROR, with the runs' ids, rather than only as a flush failure 'retrying' that no flush will retry."""
    monkeypatch.setattr(runs_module, "FINAL_SAVE_SECONDS", 0.3)

    async def scenario() -> str:
        inner, store, manager = await _manager(tmp_path, ScriptedModel(["a "] * 400, pause=0.01))
        run = await _begin(manager, Caller(new_id()))
        await asyncio.sleep(0.2)
        store.refuse = True
        await manager.aclose()
        await inner.aclose()
        return run.id

    with caplog.at_level(logging.WARNING):
        run_id = asyncio.run(scenario())
    lost = [r for r in caplog.records if r.levelno == logging.ERROR and run_id in r.getMessage()]
    assert len(lost) == 1 and "not saved" in lost[0].getMessage(), caplog.text
