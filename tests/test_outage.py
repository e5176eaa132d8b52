"""Production mode through a database outage: PostgREST (the stand-in over real PostgreSQL) answering 503, hanging, or
slow while answers stream, over a real uvicorn server on loopback. What the user had is kept and saved once the
database is back, nothing is written twice, and every failure a client sees is a retryable envelope.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import create_app
from services.runs import manager as runs_module
from tests.conftest import DATABASE, AuthHeaders
from tests.scripted_model import ScriptedModel
from tests.support import LiveServer, chunks, event_ids, make_settings, new_id, serve, streamed_text

STORES = ("supabase",)

PIECES = [f"w{i} " for i in range(60)]


def chat_body(user: str, conversation: str, **extra: Any) -> dict[str, Any]:
    return {"message": "tell me everything", "conversation_id": conversation, "user_id": user, **extra}


class Reader:
    """A chat turn read in a thread, so the test can break the database while the answer streams."""

    def __init__(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        self.text, self.status, self.run_id = "", 0, ""
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, body, headers), daemon=True)
        self._thread.start()

    def _read(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        with httpx.stream("POST", f"{url}/api/chat/stream", json=body, headers=headers, timeout=90) as response:
            self.status, self.run_id = response.status_code, response.headers.get("x-run-id", "")
            self.started.set()
            for text in response.iter_text():
                self.text += text

    def join(self, timeout: float = 90) -> str:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"
        return self.text


def wait_for(condition: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return result


def stored(pg_cluster: Any, run_id: str) -> tuple[str, str, str, int, int]:
    """What the database holds of a run: its status, its answer's text and status, its events and ledger rows."""
    with pg_cluster.connect(DATABASE) as db:
        status, content, answer_status = db.execute(
            "select r.status, m.content, m.metadata->>'status' from api.agent_runs r"
            " join api.agent_messages m on m.id = r.assistant_message_id where r.id = %s", (run_id,)).fetchone()
        events = db.execute("select count(*) from api.agent_run_events where run_id = %s", (run_id,)).fetchone()[0]
        calls = db.execute("select count(*) from api.agent_usage where run_id = %s", (run_id,)).fetchone()[0]
    return status, content, answer_status, events, calls


@pytest.fixture
def fake(fake_postgrest: Any) -> Iterator[Any]:
    yield fake_postgrest
    fake_postgrest.up()


@pytest.fixture
def live(tmp_path: Path, service_env: dict[str, str]) -> Iterator[tuple[LiveServer, ScriptedModel]]:
    model = ScriptedModel(pieces=PIECES, pause=0.05)
    settings = make_settings(tmp_path, **service_env, RUN_STALE_SECONDS="2")
    with serve(create_app(settings, model=model)) as server:
        yield server, model


def test_an_answer_streaming_through_an_outage_longer_than_run_stale_seconds_is_saved_whole(
    live: tuple[LiveServer, ScriptedModel], fake: Any, pg_cluster: Any, auth_headers: AuthHeaders, user_id: str,
) -> None:
    server, model = live
    headers = auth_headers(user_id)
    conversation_id = new_id()
    reader = Reader(server.url, chat_body(user_id, conversation_id), headers)
    wait_for(lambda: len(event_ids(reader.text)) >= 3)
    fake.down("503")
    wait_for(lambda: streamed_text(chunks(reader.text)) == "".join(PIECES))  # viewers see it all, unsaved
    health = httpx.get(f"{server.url}/health", timeout=30)
    time.sleep(2.5)  # past RUN_STALE_SECONDS: its heartbeat in the database has lapsed
    # The user opens the conversation the moment the database is back: it must not end the answer as dead.
    fake.up()
    opened = httpx.get(f"{server.url}/api/conversations/{conversation_id}", params={"user_id": user_id},
                       headers=headers, timeout=30)
    text = reader.join()
    replay = httpx.get(f"{server.url}/api/chat/runs/{reader.run_id}/events", params={"user_id": user_id},
                       headers=headers, timeout=30).text
    status, content, answer_status, _, calls = stored(pg_cluster, reader.run_id)
    assert (health.status_code, health.json()["status"]) == (503, "unhealthy")
    assert opened.status_code == 200
    assert chunks(text)[-1]["type"] == "complete", chunks(text)[-1]
    assert (status, answer_status, content) == ("complete", "complete", "".join(PIECES))
    assert replay == text
    assert calls == 1
    assert httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "healthy"


def test_a_new_turn_during_an_outage_is_a_retryable_503_with_retry_after(
    live: tuple[LiveServer, ScriptedModel], fake: Any, auth_headers: AuthHeaders, user_id: str,
) -> None:
    server, _ = live
    headers = auth_headers(user_id)
    fake.down("503")
    refused = httpx.post(f"{server.url}/api/chat/stream", json=chat_body(user_id, new_id(), client_message_id=new_id()),
                         headers=headers, timeout=30)
    fake.up()
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["retryable"] is True and refused.headers.get("retry-after"), refused.headers


def test_an_answer_whose_end_waits_past_final_save_seconds_is_resumed_to_its_end_once_saved(
    live: tuple[LiveServer, ScriptedModel], fake: Any, pg_cluster: Any, auth_headers: AuthHeaders, user_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runs_module, "FINAL_SAVE_SECONDS", 1.0)
    server, _ = live
    headers = auth_headers(user_id)
    reader = Reader(server.url, chat_body(user_id, new_id()), headers)
    wait_for(lambda: len(event_ids(reader.text)) >= 3)
    fake.down("503")
    text = reader.join()
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    fake.up()
    wait_for(lambda: stored(pg_cluster, reader.run_id)[0] != "running")
    resumed = httpx.get(f"{server.url}/api/chat/runs/{reader.run_id}/events", params={"user_id": user_id},
                        headers={**headers, "Last-Event-ID": str(event_ids(text)[-1])}, timeout=30).text
    status, content, _, _, calls = stored(pg_cluster, reader.run_id)
    last = chunks(text)[-1]
    assert (last["code"], last["retryable"]) == ("STORE_UNAVAILABLE", True)
    assert health["runs"]["unsaved"] == 1
    assert chunks(resumed)[-1]["type"] == "complete"
    assert streamed_text(chunks(text) + chunks(resumed)) == content == "".join(PIECES)
    assert (status, calls) == ("complete", 1)


def test_an_answer_streaming_while_every_request_hangs_is_saved_once_and_new_turns_are_bounded(
    tmp_path: Path, service_env: dict[str, str], fake: Any, pg_cluster: Any, auth_headers: AuthHeaders,
    user_id: str,
) -> None:
    """Held requests time out (SUPABASE_TIMEOUT) and then commit when the database answers: the flushes sent again
    write nothing twice, and a turn sent meanwhile is a bounded, retryable refusal."""
    model = ScriptedModel(pieces=PIECES, pause=0.05)
    settings = make_settings(tmp_path, **service_env, SUPABASE_TIMEOUT="1")
    with serve(create_app(settings, model=model)) as server:
        headers = auth_headers(user_id)
        reader = Reader(server.url, chat_body(user_id, new_id()), headers)
        wait_for(lambda: len(event_ids(reader.text)) >= 3)
        fake.down("hang")
        started = time.monotonic()
        refused = httpx.post(f"{server.url}/api/chat/stream", json=chat_body(user_id, new_id()), headers=headers,
                             timeout=60)
        took = time.monotonic() - started
        wait_for(lambda: streamed_text(chunks(reader.text)) == "".join(PIECES))
        time.sleep(1.5)
        fake.up()
        text = reader.join()
        replay = httpx.get(f"{server.url}/api/chat/runs/{reader.run_id}/events", params={"user_id": user_id},
                           headers=headers, timeout=30).text
    status, content, _, _, calls = stored(pg_cluster, reader.run_id)
    assert refused.status_code in (503, 504) and refused.json()["error"]["retryable"] is True, refused.text
    assert refused.headers.get("retry-after"), refused.headers
    assert took < 30
    assert chunks(text)[-1]["type"] == "complete" and replay == text, (chunks(text)[-1]["code"], chunks(text)[-1]["error"])
    assert (status, content, calls) == ("complete", "".join(PIECES), 1)


@pytest.mark.parametrize("touch", ["usage", "another_conversation"])
def test_the_users_own_requests_do_not_end_an_answer_this_worker_holds_unsaved_as_dead(
    live: tuple[LiveServer, ScriptedModel], fake: Any, pg_cluster: Any, auth_headers: AuthHeaders, user_id: str,
    touch: str,
) -> None:
    """While this worker's flushes fail (here only they: a flush past the database's statement timeout, say, or the
    moments after an outage before the next flush), its answer's heartbeat in the database lapses. The user's other
    requests end their dead runs: the usage report, or opening a conversation whose run nobody generates (a begin
    whose answer was lost). They must not end this answer, alive here, with only what was saved."""
    server, model = live
    headers = auth_headers(user_id)
    orphaned = new_id()
    if touch == "another_conversation":  # its begin commits, every answer is lost: a run nobody generates
        fake.fail_next(503, after=True, times=3, path="rpc/agent_run_begin")
        lost = httpx.post(f"{server.url}/api/chat/stream", json=chat_body(user_id, orphaned), headers=headers,
                          timeout=30)
        assert lost.status_code == 503
    reader = Reader(server.url, chat_body(user_id, new_id()), headers)
    wait_for(lambda: len(event_ids(reader.text)) >= 3)
    fake.fail_next(503, path="rpc/agent_runs_flush", times=100_000)
    time.sleep(3)  # past RUN_STALE_SECONDS (2)
    if touch == "usage":
        touched = httpx.get(f"{server.url}/api/usage", params={"user_id": user_id}, headers=headers, timeout=30)
    else:
        touched = httpx.get(f"{server.url}/api/conversations/{orphaned}", params={"user_id": user_id},
                            headers=headers, timeout=30)
    fake.faults.clear()
    text = reader.join()
    status, content, answer_status, _, _ = stored(pg_cluster, reader.run_id)
    assert touched.status_code == 200, touched.text
    assert chunks(text)[-1]["type"] == "complete", chunks(text)[-1]
    assert (status, answer_status, content) == ("complete", "complete", "".join(PIECES))


def test_a_short_run_stale_seconds_does_not_make_live_answers_look_dead_between_heartbeats(
    tmp_path: Path, service_env: dict[str, str], pg_cluster: Any, auth_headers: AuthHeaders, user_id: str,
) -> None:
    """RUN_STALE_SECONDS may be as low as 2, and heartbeats went every 5 s whatever it was: between two heartbeats a
    live answer looked dead, and the user's next turn (whose admission ends their dead runs) ended it as
    interrupted. Heartbeats come six times per RUN_STALE_SECONDS when that is under 30 s."""
    model = ScriptedModel(pieces=PIECES * 2, pause=0.05)  # about 6 s
    settings = make_settings(tmp_path, **service_env, RUN_STALE_SECONDS="3")
    with serve(create_app(settings, model=model)) as server:
        headers = auth_headers(user_id)
        reader = Reader(server.url, chat_body(user_id, new_id()), headers)
        wait_for(lambda: len(event_ids(reader.text)) >= 1)
        time.sleep(3.5)  # past RUN_STALE_SECONDS since the begin, before a 5 s heartbeat
        other = httpx.post(f"{server.url}/api/chat/stream", json=chat_body(user_id, new_id()), headers=headers,
                           timeout=60)
        text = reader.join()
    assert other.status_code == 200, other.text
    assert chunks(text)[-1]["type"] == "complete", chunks(text)[-1]
    assert stored(pg_cluster, reader.run_id)[:3] == ("complete", "".join(PIECES * 2), "complete")
