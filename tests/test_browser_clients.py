"""The API as a frontend in a real browser uses it: headless Chromium (Debian's ``chromium``, driven by Playwright)
against a real uvicorn server on 127.0.0.1.

- A page served from **another origin** (a second server on loopback, as a Vite dev server is) streams a chat turn
  with ``fetch`` and an ``Authorization`` header (a CORS preflight), reads ``X-Run-ID``, sees tokens while the model
  is still generating, and aborts mid-answer: the answer is still generated to its end and saved. Directly and
  through the shipped nginx config.
- An ``EventSource`` from that origin follows a run, and after its connection is cut reconnects with
  ``Last-Event-ID`` and goes on exactly where it was.
- The playground rides out a network outage mid-answer (it keeps trying to attach to the run and shows the whole
  stored answer once the network is back), and the shutdown of the worker it watches from (a retryable notice with
  no ``id:`` is a cue to resume, not the run's end).

"While the model is still generating" is shown without timing: a ``GatedModel`` holds its answer after a few words
until the test releases it, so tokens the browser saw before that were streamed, not buffered.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from playwright.sync_api import Browser, Page, expect
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from app import create_app
from services.model import ModelEvent, ModelRequest, Stop, TextDelta, Usage
from tests.scripted_model import ScriptedModel
from tests.support import LiveServer, make_settings, new_id, serve
from tests.test_playground import TIMEOUT_MS, Watched, browser, browser_only  # noqa: F401 - browser: the fixture
from tests.tokens import TEST_JWT_SECRET, mint

WORDS = [f"w{i} " for i in range(12)]
HELD_AT = 4  # the GatedModel sends this many words, then waits for the test


@dataclass
class GatedModel:
    """Sends ``HELD_AT`` words, waits for ``gate`` (at most 30 s), then sends the rest: words a client has before
    the gate opens were streamed to it while the answer was still being generated."""

    gate: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    provider = "scripted"
    is_llm = False
    configured = True
    model_id = "gated-test-model"

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        try:
            for index, word in enumerate(WORDS):
                if index == HELD_AT:
                    for _ in range(1500):  # bounded: 30 s
                        if self.gate.is_set():
                            break
                        await anyio.sleep(0.02)
                yield TextDelta(word)
            yield Stop("end_turn")
            yield Usage(5, len(WORDS))
        finally:
            self.finished.set()


class CuttableRelay:
    """A TCP relay on 127.0.0.1 in front of ``upstream_port`` (which a test may change: new connections go to the new
    port, as a load balancer moves clients between workers). ``cut()`` drops every connection it holds; while
    ``refusing`` is set, a new connection is closed as soon as it is accepted (``refused`` counts them): a network
    outage as a browser meets it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refusing = threading.Event()
        self.refused = 0
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing.is_set():
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._open.update((client, upstream))
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, one: socket.socket, other: socket.socket) -> None:
        try:
            while not self._closed and one in self._open:
                ready, _, _ = select.select((one, other), (), (), 0.5)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (other if sock is one else one).sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._open.difference_update((one, other))
            for sock in (one, other):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def cut(self) -> None:
        with self._lock:
            held = list(self._open)
            self._open.clear()
        for sock in held:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


@contextlib.contextmanager
def relay_to(server: LiveServer) -> Iterator[CuttableRelay]:
    relay = CuttableRelay(int(server.url.rsplit(":", 1)[1]))
    try:
        yield relay
    finally:
        relay.close()


def wait_for(condition: Any, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def front() -> Iterator[LiveServer]:
    """The frontend's own origin: a second server on loopback serving an empty page (as a Vite dev server would)."""
    page = Starlette(routes=[Route("/", lambda request: HTMLResponse("<!doctype html><title>frontend</title>"))])
    with serve(page) as server:
        yield server


@pytest.fixture
def front_page(browser: Browser, front: LiveServer) -> Iterator[Page]:
    """A page of the frontend's origin, checked clean at the end (no CORS refusal or script error in its console)."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    watched = Watched(context.new_page())
    watched.page.goto(f"{front.url}/")
    try:
        yield watched.page
        # Allowed: the frontend page's missing favicon, and the stream a test cuts on purpose.
        expected = ("404 (Not Found)", "net::ERR_INCOMPLETE_CHUNKED_ENCODING")
        watched.console = [line for line in watched.console if not any(e in line for e in expected)]
        watched.assert_clean()
    finally:
        context.close()


def stored_answer(url: str, user: str, conversation_id: str, headers: dict[str, str]) -> dict[str, Any]:
    response = httpx.get(f"{url}/api/conversations/{conversation_id}", params={"user_id": user}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["messages"][-1]  # type: ignore[no-any-return]


# -- fetch from another origin, with a token ------------------------------------------------------------------------

# What a frontend's chat client does: POST with a bearer token, read the run id, read the body as it comes, and leave
# (AbortController) once it has seen the words sent before the model was held.
FETCH_UNTIL_HELD = """async ([api, token, body, held]) => {
  const controller = new AbortController();
  const response = await fetch(api + "/api/chat/stream", {
    method: "POST", signal: controller.signal,
    headers: {"Content-Type": "application/json; charset=utf-8", "Authorization": "Bearer " + token},
    body: JSON.stringify(body)});
  const seen = {status: response.status, type: response.headers.get("Content-Type"),
                runId: response.headers.get("X-Run-ID"), text: "", ids: []};
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (seen.text.split(" ").length - 1 < held) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    for (let end; (end = buffer.indexOf("\\n\\n")) >= 0; buffer = buffer.slice(end + 2)) {
      for (const line of buffer.slice(0, end).split("\\n")) {
        if (line.startsWith("id: ")) seen.ids.push(Number(line.slice(4)));
        if (line.startsWith("data: ")) {
          const chunk = JSON.parse(line.slice(6));
          if (chunk.type === "token") seen.text += chunk.content;
        }
      }
    }
  }
  controller.abort();
  return seen;
}"""


@pytest.fixture
def gated() -> GatedModel:
    return GatedModel()


@pytest.fixture(params=["direct", pytest.param("nginx", marks=pytest.mark.system)])
def api_url(request: pytest.FixtureRequest, tmp_path: Path, front: LiveServer, gated: GatedModel) -> Iterator[str]:
    """The service with auth on and the frontend's origin allowed, reached directly or through the shipped nginx."""
    settings = make_settings(tmp_path, SUPABASE_JWT_SECRET=TEST_JWT_SECRET, CORS_ORIGINS=front.url)
    with serve(create_app(settings, model=gated)) as server:
        if request.param == "direct":
            yield server.url
            return
        from tests.test_nginx import run_nginx

        nginx_dir = tmp_path / "nginx"
        nginx_dir.mkdir()
        with run_nginx(nginx_dir, int(server.url.rsplit(":", 1)[1])) as proxy:
            yield proxy


@browser_only
def test_a_cross_origin_fetch_with_a_token_streams_and_an_abort_leaves_the_answer_to_be_saved(
    front_page: Page, api_url: str, gated: GatedModel
) -> None:
    user, conversation_id = new_id(), new_id()
    token = mint(user, TEST_JWT_SECRET)
    body = {"message": "hello", "conversation_id": conversation_id, "user_id": user, "history": []}
    seen = front_page.evaluate(FETCH_UNTIL_HELD, [api_url, token, body, HELD_AT])
    # The preflight (Authorization, a JSON content type with a charset) passed, the run id is readable from another
    # origin, and the words sent before the model was held arrived while it was: streamed, not buffered to the end.
    assert seen["status"] == 200 and seen["type"] == "text/event-stream; charset=utf-8"
    assert seen["runId"] and seen["ids"] == list(range(1, len(seen["ids"]) + 1))
    assert seen["text"] == "".join(WORDS[:HELD_AT]) and not gated.gate.is_set()
    gated.gate.set()  # the client has left: the answer is still generated to its end and saved
    headers = {"Authorization": f"Bearer {token}"}
    wait_for(lambda: stored_answer(api_url, user, conversation_id, headers)["metadata"]["status"] != "streaming",
             "the run to end")
    stored = stored_answer(api_url, user, conversation_id, headers)
    assert stored["metadata"]["status"] == "complete" and stored["metadata"]["run_id"] == seen["runId"]
    assert stored["content"] == "".join(WORDS)
    again = httpx.post(f"{api_url}/api/chat/stream", json={**body, "message": "and then?"}, headers=headers, timeout=20)
    assert again.status_code == 200 and '"type":"complete"' in again.text  # the run ended: no 409 RUN_IN_PROGRESS


# -- the playground -----------------------------------------------------------------------------------------------

PIECES = [f"p{i} " for i in range(60)]
FULL_TEXT = "".join(PIECES)


@browser_only
def test_the_playground_rides_out_a_network_outage_mid_answer(browser: Browser, tmp_path: Path) -> None:
    """The stream drops and, for a while, every new connection fails (Wi-Fi switching, a laptop waking): the page
    must keep trying to attach to the run, not give up on the first failed attempt with its Send button disabled."""
    model = ScriptedModel(pieces=PIECES, pause=0.05)
    with serve(create_app(make_settings(tmp_path), model=model)) as server, relay_to(server) as relay:
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        try:
            page.goto(f"{relay.url}/playground")
            expect(page.locator("#status")).to_have_text("idle")
            page.fill("#message", "hello")
            page.click("#send")
            page.wait_for_function("n => (document.querySelector('#answer .content')?.textContent || '').length >= n",
                                   arg=12)
            relay.refusing.set()
            relay.cut()
            wait_for(lambda: relay.refused >= 2, "the page to try attaching again during the outage")
            relay.refusing.clear()
            expect(page.locator("#answer")).to_have_attribute("data-status", "complete", timeout=TIMEOUT_MS)
            user = page.locator("#user-id").inner_text()
            conversation_id = page.evaluate("u => localStorage.getItem('canvalo.playground.conversation.' + u)", user)
            stored = httpx.get(f"{server.url}/api/conversations/{conversation_id}", params={"user_id": user}).json()
            assert page.locator("#answer .content").text_content() == stored["messages"][-1]["content"] == FULL_TEXT
            expect(page.locator("#send")).to_be_enabled()
            expect(page.locator("#error")).to_be_hidden()
        finally:
            context.close()


# -- EventSource from another origin --------------------------------------------------------------------------------

# The events route as a browser's EventSource follows it: every event (its lastEventId, its chunk's type and text) and
# every (re)connection, closed on the terminal chunk as the docs ask (EventSource reconnects whenever a stream ends).
FOLLOW_WITH_EVENT_SOURCE = """([url]) => {
  window.seen = {events: [], opens: 0, closed: false};
  const source = new EventSource(url);
  source.onopen = () => { window.seen.opens += 1; };
  source.onmessage = (event) => {
    const chunk = JSON.parse(event.data);
    window.seen.events.push([Number(event.lastEventId), chunk.type, chunk.content || ""]);
    if (chunk.type === "complete" || chunk.type === "error") { source.close(); window.seen.closed = true; }
  };
}"""


@browser_only
def test_an_event_source_from_another_origin_resumes_after_a_cut_with_last_event_id(
    front_page: Page, front: LiveServer, tmp_path: Path, gated: GatedModel
) -> None:
    settings = make_settings(tmp_path, CORS_ORIGINS=front.url)  # development: EventSource cannot send a token
    user, conversation_id = new_id(), new_id()
    with serve(create_app(settings, model=gated)) as server, relay_to(server) as relay:
        body = {"message": "hello", "conversation_id": conversation_id, "user_id": user}
        with httpx.stream("POST", f"{server.url}/api/chat/stream", json=body, timeout=20) as started:
            run_id = started.headers["x-run-id"]  # the run goes on without this client
        front_page.evaluate(FOLLOW_WITH_EVENT_SOURCE, [f"{relay.url}/api/chat/runs/{run_id}/events?user_id={user}"])
        front_page.wait_for_function("() => window.seen.events.length > 0")
        relay.cut()  # the connection drops mid-run; the browser reconnects by itself, sending Last-Event-ID
        front_page.wait_for_function("() => window.seen.opens >= 2")
        gated.gate.set()
        front_page.wait_for_function("() => window.seen.closed")
        seen = front_page.evaluate("() => window.seen")
        stored = stored_answer(server.url, user, conversation_id, {})
    ids = [event[0] for event in seen["events"]]
    assert ids == sorted(set(ids)), ids  # nothing replayed twice, nothing out of order
    assert [event[1] for event in seen["events"]][-1] == "complete"
    assert "".join(event[2] for event in seen["events"]) == stored["content"] == "".join(WORDS)
    assert relay.accepted >= 2


@browser_only
def test_the_playground_resumes_when_the_worker_it_watches_from_shuts_down(browser: Browser, tmp_path: Path) -> None:
    """Two servers share one store (two workers, a rolling restart). The page watches a run generating on the first
    through the second, which is then stopped: its viewers get a retryable ``SERVER_SHUTTING_DOWN`` notice without an
    ``id:``, which docs/api.md says is not the run's end. The page must attach again (to the first) and show the whole
    answer, not end it as an error."""
    settings = make_settings(tmp_path)
    generating, watching = ScriptedModel(pieces=PIECES, pause=0.1), ScriptedModel(pieces=["unused"])
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(serve(create_app(settings, model=generating)))
        second = stack.enter_context(serve(create_app(settings, model=watching), graceful_timeout=1))
        relay = stack.enter_context(relay_to(first))
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        stack.callback(context.close)
        page = context.new_page()
        page.goto(f"{relay.url}/playground")
        expect(page.locator("#status")).to_have_text("idle")
        page.fill("#message", "hello")
        page.click("#send")
        page.wait_for_function("n => (document.querySelector('#answer .content')?.textContent || '').length >= n",
                               arg=6)
        relay.upstream_port = int(second.url.rsplit(":", 1)[1])  # the page's next connection goes to the second
        attached = relay.accepted
        relay.cut()
        wait_for(lambda: relay.accepted > attached, "the page to attach to the run through the second server")
        page.wait_for_function("() => document.querySelector('#status').textContent === 'streaming'")
        relay.upstream_port = int(first.url.rsplit(":", 1)[1])  # the first stays up
        second.server.should_exit = True  # after its 1 s grace, its viewers get the shutdown notice
        expect(page.locator("#answer")).to_have_attribute("data-status", "complete", timeout=TIMEOUT_MS)
        user = page.locator("#user-id").inner_text()
        conversation_id = page.evaluate("u => localStorage.getItem('canvalo.playground.conversation.' + u)", user)
        stored = stored_answer(first.url, user, conversation_id, {})
        assert page.locator("#answer .content").text_content() == stored["content"] == FULL_TEXT
        assert stored["metadata"]["status"] == "complete"
        expect(page.locator("#error")).to_be_hidden()
        assert not watching.requests  # the second server generated nothing
