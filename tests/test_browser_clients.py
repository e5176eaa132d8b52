"""The API as a frontend in a real browser uses it: headless Chromium (Debian's ``chromium``, driven by Playwright)
against a real uvicorn server on 127.0.0.1.

- A page served from **another origin** (a second server on loopback, as a Vite dev server is) streams a chat turn
  with ``fetch`` and an ``Authorization`` header (a CORS preflight), reads ``X-Run-ID``, sees tokens while the model
  is still generating, and aborts mid-answer: the answer is still generated to its end and saved. Directly and
  through the shipped nginx config.
- An ``EventSource`` from that origin follows a run, and after its connection is cut reconnects with
  ``Last-Event-ID`` and goes on exactly where it was.
- The playground rides out a network outage mid-answer: it keeps trying to attach to the run and shows the whole
  stored answer once the network is back.

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
from playwright.sync_api import Browser, Page, expect, sync_playwright
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from app import create_app
from services.model import ModelEvent, ModelRequest, Stop, TextDelta, Usage
from tests.scripted_model import ScriptedModel
from tests.support import LiveServer, make_settings, new_id, serve
from tests.test_playground import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, Watched, browser_only
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
    """A TCP relay on 127.0.0.1 in front of ``upstream_port``. ``cut()`` drops every connection it holds; while
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


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def front() -> Iterator[LiveServer]:
    """The frontend's own origin: a second server on loopback serving an empty page (as a Vite dev server would)."""
    page = Starlette(routes=[Route("/", lambda request: HTMLResponse("<!doctype html><title>frontend</title>"))])
    with serve(page) as server:
        yield server


def front_page(browser: Browser, front: LiveServer) -> Iterator[Watched]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    watched = Watched(context.new_page())
    watched.page.goto(f"{front.url}/")
    try:
        yield watched
    finally:
        context.close()


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
            expect(page.locator("#answer")).to_have_attribute("data-status", "complete")
            user = page.locator("#user-id").inner_text()
            conversation_id = page.evaluate("u => localStorage.getItem('canvalo.playground.conversation.' + u)", user)
            stored = httpx.get(f"{server.url}/api/conversations/{conversation_id}", params={"user_id": user}).json()
            assert page.locator("#answer .content").text_content() == stored["messages"][-1]["content"] == FULL_TEXT
            expect(page.locator("#send")).to_be_enabled()
            expect(page.locator("#error")).to_be_hidden()
        finally:
            context.close()
