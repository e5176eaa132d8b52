"""The browser playground (``web/playground.html`` at ``/playground``) in a real headless Chromium, driven by Playwright,
against a real uvicorn server in development mode with a slow scripted model (80 pieces, 0.05 s apart: about 4 s per
answer, time to act mid-answer).

The page must stream an answer and end showing exactly the stored message; resume after a reload mid-answer with no
text duplicated or missing; keep exactly what it showed when stopped; and run under its nonce-only CSP without a
single violation. ``/playground`` is 404 outside development unless ``PLAYGROUND=1``.

Chromium is Debian's ``chromium`` package (``/usr/bin/chromium``), not a Playwright browser download.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Route, expect, sync_playwright
from starlette.testclient import TestClient

from app import create_app
from tests.scripted_model import ScriptedModel
from tests.support import LiveServer, make_settings, new_id, serve


def _find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _find_chromium()
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
_NO_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: /usr/bin/chromium is missing and none is on PATH (apt-get install chromium)"
)


def browser_only(test: Any) -> Any:
    """A test in Chromium: a ``system`` test (``-m "not system"`` leaves it out), skipped without Chromium."""
    return pytest.mark.system(_NO_CHROMIUM(test))

# Astral characters (two UTF-16 units, one code point) all along: Stop must count what it shows as code points.
PIECES = [f"w{i}{'🎨' if i % 4 == 0 else ''} " for i in range(79)] + ["done: ünïcødé."]
FULL_TEXT = "".join(PIECES)
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("playground"))  # development: no auth, playground on
    with serve(create_app(settings, model=ScriptedModel(pieces=PIECES, pause=0.05))) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Watched:
    """A fresh browser context (its own localStorage, so its own user) with every console message, page error and
    request recorded."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console: list[str] = []
        self.errors: list[str] = []
        self.requests: list[Request] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("request", lambda request: self.requests.append(request))

    def _console(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text}")

    def assert_clean(self) -> None:
        assert not [line for line in self.console if "Content Security Policy" in line], self.console
        assert not self.errors, self.errors
        assert not [line for line in self.console if line.startswith("error")], self.console


@pytest.fixture
def watched(browser: Browser, live: LiveServer) -> Iterator[Watched]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = Watched(context.new_page())
    page.page.goto(f"{live.url}/playground")
    expect(page.page.locator("#status")).to_have_text("idle")
    try:
        yield page
        page.assert_clean()  # no CSP violation, script error or failed request in the page's console
    finally:
        context.close()


def user_of(page: Page) -> str:
    return page.locator("#user-id").inner_text()


def answer_text(page: Page) -> str:
    return page.locator("#answer .content").text_content() or ""


def ask(page: Page, message: str = "tell me everything") -> None:
    page.fill("#message", message)
    page.click("#send")
    expect(page.locator("#answer")).to_have_attribute("data-status", "streaming")


def wait_for_text(page: Page, chars: int) -> None:
    page.wait_for_function("n => (document.querySelector('#answer .content')?.textContent || '').length >= n", arg=chars)


def stored_conversation(live: LiveServer, page: Page) -> dict[str, Any]:
    user = user_of(page)
    conversation_id = page.evaluate("u => localStorage.getItem('canvalo.playground.conversation.' + u)", user)
    response = httpx.get(f"{live.url}/api/conversations/{conversation_id}", params={"user_id": user})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


# -- in the browser -----------------------------------------------------------------------------------------------


@browser_only
def test_the_page_streams_an_answer_and_ends_showing_the_stored_message(watched: Watched, live: LiveServer) -> None:
    page = watched.page
    expect(page.locator("#model-note")).to_be_visible()  # ScriptedModel.is_llm is False, as the local responder's
    expect(page.locator("#model-note")).to_contain_text("not an LLM")
    ask(page)
    wait_for_text(page, 20)
    assert len(answer_text(page)) < len(FULL_TEXT)  # seen growing, not only at the end
    expect(page.locator("#answer")).to_have_attribute("data-status", "complete")
    shown = answer_text(page)
    stored = stored_conversation(live, page)["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[-1]["metadata"]["status"] == "complete"
    assert shown == stored[-1]["content"] == FULL_TEXT
    # The day's usage: the scripted model's one call, 7 tokens in and one out per piece, unpriced (cost 0).
    expect(page.locator("#usage")).to_have_text(f"{7 + len(PIECES)} tokens · $0.0000")
    # The conversation is listed; opening it from the list shows the same text.
    entry = page.locator("#conversations button[data-conversation-id]")
    expect(entry).to_have_count(1)
    entry.click()
    expect(page.locator("#answer")).to_have_attribute("data-status", "complete")
    assert answer_text(page) == FULL_TEXT
    expect(page.locator("#error")).to_be_hidden()


@browser_only
def test_a_reload_mid_answer_resumes_without_duplicated_or_missing_text(watched: Watched, live: LiveServer) -> None:
    page = watched.page
    user = user_of(page)
    ask(page)
    wait_for_text(page, 40)
    page.reload()
    # The same user and conversation come back with the answer still running, and the page follows it.
    assert user_of(page) == user
    expect(page.locator("#answer")).to_have_attribute("data-status", "streaming")
    partial = answer_text(page)
    assert partial and FULL_TEXT.startswith(partial) and partial != FULL_TEXT
    expect(page.locator("#answer")).to_have_attribute("data-status", "complete")
    shown = answer_text(page)
    stored = stored_conversation(live, page)["messages"][-1]
    assert stored["metadata"]["status"] == "complete"
    assert shown == stored["content"] == FULL_TEXT
    resumes = [r for r in watched.requests if "/api/chat/runs/" in r.url and r.url.split("?")[0].endswith("/events")]
    assert len(resumes) == 1
    assert resumes[0].url.split("/api/chat/runs/")[1].split("/")[0] == stored["metadata"]["run_id"]
    assert int(resumes[0].headers["last-event-id"]) > 0  # attached after the events its text already held


@browser_only
def test_stop_keeps_exactly_what_was_displayed(watched: Watched, live: LiveServer) -> None:
    page = watched.page
    # The stop request is held back 0.3 s on its way out, so tokens keep arriving after the click: the page must not
    # show them, since the server keeps only what had been displayed.
    def held_back(route: Route) -> None:
        time.sleep(0.3)
        route.continue_()

    page.route("**/api/chat/runs/*/stop", held_back)
    ask(page)
    wait_for_text(page, 30)
    expect(page.locator("#stop")).to_be_enabled()
    # Read the text and press Stop in one task of the page, so no token can land in between.
    seen = page.evaluate(
        "() => { const t = document.querySelector('#answer .content').textContent;"
        " document.querySelector('#stop').click(); return t; }"
    )
    expect(page.locator("#answer")).to_have_attribute("data-status", "stopped")
    assert seen and FULL_TEXT.startswith(seen) and seen != FULL_TEXT
    stored = stored_conversation(live, page)["messages"][-1]
    assert stored["metadata"]["status"] == "stopped"
    assert answer_text(page) == stored["content"] == seen
    page.wait_for_timeout(300)
    assert answer_text(page) == seen  # and nothing comes after
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#send")).to_be_enabled()


# -- who the page acts as, and its layout (the real built-in responder) ----------------------------------------------

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
WALK_THROUGH_USER = re.search(r"^USER_ID=(\S+)$", README.split("## Walk-through", 1)[1], re.M).group(1)  # type: ignore[union-attr]


@pytest.fixture
def local_live(tmp_path: Path) -> Iterator[LiveServer]:
    """Development, with the built-in local responder a newcomer has (no scripted model)."""
    with serve(create_app(make_settings(tmp_path))) as server:
        yield server


@pytest.fixture
def local_page(browser: Browser, local_live: LiveServer) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = Watched(context.new_page())
    page.page.goto(f"{local_live.url}/playground")
    expect(page.page.locator("#status")).to_have_text("idle")
    try:
        yield page
        page.assert_clean()
    finally:
        context.close()


def ask_to_the_end(page: Page, message: str) -> str:
    page.fill("#message", message)
    page.click("#send")
    expect(page.locator("#answer")).to_have_attribute("data-status", "complete")
    return answer_text(page)


@browser_only
def test_regenerate_edit_and_the_branch_switcher_and_a_reload_shows_the_same_branch(
    watched: Watched, live: LiveServer
) -> None:
    page = watched.page
    question = page.locator("[data-testid=user-message]")
    ask(page, "first question")
    expect(page.locator("#answer")).to_have_attribute("data-status", "complete")
    page.locator("#answer [data-testid=regenerate]").click()
    expect(page.locator("#answer [data-testid=branch-position]")).to_have_text("2/2")  # once it has ended
    expect(question).to_have_count(1)  # the question is not sent again
    question.locator("[data-testid=edit]").click()
    page.fill("#message", "second question")
    page.click("#send")
    expect(question.locator("[data-testid=branch-position]")).to_have_text("2/2")
    expect(question.locator(".content")).to_have_text("second question")
    question.locator("[data-testid=previous-branch]").click()
    expect(question.locator(".content")).to_have_text("first question")
    page.reload()  # the branch is the server's active leaf, not something the page kept
    expect(question.locator(".content")).to_have_text("first question")
    expect(page.locator("#answer [data-testid=branch-position]")).to_have_text("2/2")  # that branch's newest answer
    stored = stored_conversation(live, page)
    assert [m["content"] for m in stored["messages"]] == ["first question", FULL_TEXT]
    assert stored["message_count"] == 5  # two questions, three answers: nothing was deleted


@browser_only
def test_the_walk_through_user_is_one_click_away_and_its_sample_data_loads(local_page: Watched) -> None:
    page = local_page.page
    assert user_of(page) != WALK_THROUGH_USER  # a new page invents its own user
    page.click("#sample-user")
    expect(page.locator("#user-id")).to_have_text(WALK_THROUGH_USER)
    assert "INV-1043" not in ask_to_the_end(page, "What invoices do I have?")  # nothing loaded yet
    expect(page.locator("#load-sample")).to_be_visible()  # development
    page.click("#load-sample")
    expect(page.locator("#user-note")).to_have_text("sample data: 16 records loaded, 0 already there")
    assert "INV-1043" in ask_to_the_end(page, "What invoices do I have?")  # README's walk-through answer
    page.click("#load-sample")  # idempotent, as the command-line loader
    expect(page.locator("#user-note")).to_have_text("sample data: 0 records loaded, 16 already there")
    # Any user id can be typed in; the walk-through user keeps its conversation for when it comes back.
    other = new_id()
    page.fill("#pick-user", other.upper())
    page.press("#pick-user", "Enter")
    expect(page.locator("#user-id")).to_have_text(other)
    expect(page.locator("#messages .msg")).to_have_count(0)
    page.fill("#pick-user", "not-a-user")
    page.press("#pick-user", "Enter")
    expect(page.locator("#error")).to_contain_text("A user id is a UUID")
    expect(page.locator("#user-id")).to_have_text(other)
    page.click("#sample-user")
    expect(page.locator("#answer")).to_contain_text("INV-1043")


@browser_only
def test_the_message_pane_scrolls_and_the_composer_stays_in_view(local_page: Watched) -> None:
    page = local_page.page
    for turn in range(10):  # in a 900 px window, about three turns fill the pane
        ask_to_the_end(page, f"hello {turn}")
    size = page.evaluate("() => ({page: document.documentElement.scrollHeight, window: window.innerHeight,"
                         " pane: [document.querySelector('#messages').scrollHeight,"
                         " document.querySelector('#messages').clientHeight]})")
    assert size["page"] <= size["window"] == 900  # the page fits the window ...
    assert size["pane"][0] > size["pane"][1]  # ... though the conversation is longer than its pane: the pane scrolls
    for control in ("#message", "#send", "#stop", "#answer"):
        box = page.locator(control).bounding_box()
        assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 900, (control, box)
    expect(page.locator("#send")).to_be_enabled()


# -- the route ----------------------------------------------------------------------------------------------------


def test_the_playground_is_served_in_development_with_a_nonce_only_policy(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        first, second = client.get("/playground"), client.get("/playground")
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/html")
    policy = first.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", policy).group(1)  # type: ignore[union-attr]
    assert f"style-src 'nonce-{nonce}'" in policy and "default-src 'none'" in policy and "unsafe" not in policy
    assert nonce not in second.headers["content-security-policy"]  # a new nonce per response
    html = first.text
    assert "{{nonce}}" not in html
    assert html.count(f'nonce="{nonce}"') == 2  # the one script and the one style
    # Nothing the policy would block: no external files, no inline handlers or style attributes, no eval.
    assert not re.search(r"<(script|link)\b[^>]*\b(src|href)=", html)
    assert not re.search(r"\son[a-z]+\s*=", html) and not re.search(r"\sstyle\s*=", html)
    assert "eval(" not in html and "new Function" not in html


def test_the_playground_is_not_found_outside_development_unless_enabled(tmp_path: Path) -> None:
    development = make_settings(tmp_path)
    # Production settings proper need Supabase and Bedrock; the route only reads these two fields.
    production = dataclasses.replace(development, environment="production")
    for settings, status in (
        (production, 404),
        (dataclasses.replace(production, playground=True), 200),
        (make_settings(tmp_path, PLAYGROUND="1"), 200),
    ):
        with TestClient(create_app(settings)) as client:
            response = client.get("/playground")
        assert response.status_code == status, (settings.environment, settings.playground)
        if status == 404:
            assert response.json()["error"]["code"] == "NOT_FOUND"
            assert "<script" not in response.text


def test_sample_data_loads_for_the_caller_in_development_only(tmp_path: Path) -> None:
    from tests.support import chunks
    from tests.tokens import TEST_JWT_SECRET, bearer, mint

    development = make_settings(tmp_path)
    production = dataclasses.replace(development, environment="production")
    user, refused_user = new_id(), new_id()
    for settings in (production, dataclasses.replace(production, playground=True)):  # writes, so never there
        with TestClient(create_app(settings)) as client:
            response = client.post("/api/dev/sample-data", json={"user_id": refused_user})
        assert response.status_code == 404 and response.json()["error"]["code"] == "NOT_FOUND"
    with TestClient(create_app(development)) as client:
        first = client.post("/api/dev/sample-data", json={"user_id": user})
        again = client.post("/api/dev/sample-data", json={"user_id": user})
        invalid = client.post("/api/dev/sample-data", json={"user_id": "nobody"})
        answer = client.post("/api/chat/stream", json={"message": "What invoices do I have?", "user_id": user,
                                                        "conversation_id": new_id()})
        untouched = client.post("/api/dev/sample-data", json={"user_id": refused_user}).json()
    assert first.status_code == 200 and first.json() == {"status": "loaded", "user_id": user, "written": 16,
                                                         "existing": 0}
    assert again.json() == {"status": "loaded", "user_id": user, "written": 0, "existing": 16}  # idempotent
    assert invalid.status_code == 422
    assert "INV-1043" in "".join(c.get("content") or "" for c in chunks(answer.text))  # what the walk-through shows
    assert untouched["written"] == 16  # production wrote nothing for its user
    # With auth on it acts as the token's user only.
    with TestClient(create_app(make_settings(tmp_path, SUPABASE_JWT_SECRET=TEST_JWT_SECRET))) as client:
        anonymous = client.post("/api/dev/sample-data", json={"user_id": user})
        someone_else = client.post("/api/dev/sample-data", json={"user_id": user}, headers=bearer(mint(new_id())))
        own = client.post("/api/dev/sample-data", json={"user_id": user}, headers=bearer(mint(user)))
    assert (anonymous.status_code, someone_else.status_code, own.status_code) == (401, 403, 200)


@browser_only
def test_with_auth_on_the_token_names_the_user_and_a_prepared_change_runs_on_confirm(
    browser: Browser, tmp_path: Path
) -> None:
    from services.model import Stop, TextDelta, ToolUse
    from services.store import Caller
    from tests.scripted_model import ScriptedCalls
    from tests.test_actions import add_contacts, record
    from tests.test_agents import handoff
    from tests.tokens import TEST_JWT_SECRET, mint
    from tests.support import new_id

    def off_thread(work: Any, *args: Any) -> Any:
        """Playwright's sync API keeps an event loop in this thread: store calls run their own in another."""
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(work, *args).result()

    settings = make_settings(tmp_path, SUPABASE_JWT_SECRET=TEST_JWT_SECRET)  # auth on
    user = new_id()
    token = mint(user, TEST_JWT_SECRET)
    (maria,) = off_thread(add_contacts, settings, Caller(user, token), "Maria Lopez")
    model = ScriptedCalls([
        handoff("contacts"),
        [ToolUse("d", "delete_contact", {"id": maria}), Stop("tool_use")],
        [TextDelta("Confirm to delete Maria."), Stop("end_turn")],
    ])
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    # As if the token had been pasted in this tab before: the page reads it at load (and keeps it over reloads).
    context.add_init_script(f"sessionStorage.setItem('canvalo.playground.token', '{token}')")
    watched = Watched(context.new_page())
    page = watched.page
    try:
        with serve(create_app(settings, model=model)) as server:
            page.goto(f"{server.url}/playground")
            expect(page.locator("#user-id")).to_have_text(user)  # the token's subject is the page's user
            page.fill("#message", "delete Maria")
            page.click("#send")
            confirm = page.locator("[data-testid=confirm]")
            expect(confirm).to_have_text('Confirm: Delete contact "Maria Lopez": contact type "client".')
            assert off_thread(record, settings, Caller(user, token), "contacts", maria) is not None  # not yet
            confirm.click()
            expect(page.locator("#status")).to_have_text("done")
            assert off_thread(record, settings, Caller(user, token), "contacts", maria) is None
            sent = [r for r in watched.requests if "/api/" in r.url]
            assert sent and all(r.headers.get("authorization") == f"Bearer {token}" for r in sent)
        watched.assert_clean()
    finally:
        context.close()
