"""Differential test: the same public API operations, sent to a service on SQLite and to one on Supabase (the fake
PostgREST over real PostgreSQL), must get the same answers: statuses, bodies (generated ids, cursors and timestamps
aside), paging, ordering, search results and counts (README: "both stores answer every public API request
identically").

Each sequence is seeded (``random.Random(seed)``), so a failure names the seed and the operations that led to it;
both servers run with auth on (HS256 tokens) and the built-in local responder, whose answers are deterministic.
Generated ids are compared through a per-store bijection: the Nth new id one store shows must be the Nth the other
shows, in the same place.
"""

from __future__ import annotations

import base64
import json
import random
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from app import create_app
from tests.conftest import AuthHeaders
from tests.pg import RUN_SECRET
from tests.support import LiveServer, chunks, make_settings, new_id, serve
from tests.tokens import TEST_JWT_SECRET, TEST_PUBLISHABLE_KEY, bearer, mint

pytestmark = pytest.mark.system  # the Supabase side needs PostgreSQL

SEEDS = range(16)
OPERATIONS = (12, 26)  # operations per sequence, at random within these bounds

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
CURSOR_KEYS = ("before_cursor", "after_cursor", "message_before_cursor", "message_after_cursor")

TITLES = [
    "Kitchen repaint", "  Spaced   out  title  ", "Café crème", "CAFÉ", "Łódź façade", "東京の塗装", "🎨 paint 🖌️",
    '"Quoted" title', "it's — dash", "İstanbul job", "e\u0301clair", "ＦＵＬＬ width", "x" * 200, "é" * 200,
    "🎨" * 200, "x" * 201, "", "   ", "\t\n", "a\u0000b", "Tab\tand\nnewline", "Ⅻ roman", "ß straße",
]
MESSAGES = [
    "hello", "What invoices do I have?", "Kitchen repaint quote for López", "Paint the 東京 office",
    "Any overdue invoices?", "Café crème colour 🎨", "\"quoted words\" and it's fine", "İstanbul trip",
    "Show my projects and invoices", "prefix testing words", "ＦＵＬＬ width text", "e\u0301clair", "x" * 300,
]
QUERIES = [
    "kitch", "KITCHEN", "café", "cafe", "CAFÉ", "lopez", "lópez", "東京", "東", "🎨", '"quoted', "it's", "it",
    "s", "inv", "invoice", "paint -office", "OR", "*", "x", "İstanbul", "istanbul", "éclair", "e\u0301", "full",
    "ｆｕｌｌ", "ß", "strasse", "straße", "roman", "ⅻ", "xii", "a b", "  ", "k" * 200, "spaced out",
]


@dataclass
class Side:
    """One service under test, with what this sequence learnt of it: the ids it generated, by order of first sight
    (the other store's Nth id is its twin), and the cursors and message ids its last answers carried."""

    name: str
    live: LiveServer
    auth: AuthHeaders
    labels: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)  # label -> id
    cursors: dict[str, str | None] = field(default_factory=dict)
    conversations: list[str] = field(default_factory=list)  # by handle, shared between the sides
    messages: dict[str, list[str]] = field(default_factory=dict)  # conversation -> ids of its last read page
    actions: list[str] = field(default_factory=list)

    def label(self, value: str) -> str:
        if value not in self.labels:
            name = f"<id{len(self.labels)}>"
            self.labels[value], self.ids[name] = name, value
        return self.labels[value]

    def request(self, method: str, path: str, user: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.live.url}{path}", headers=self.auth(user), timeout=30, **kwargs)


def normalize(side: Side, value: Any, shared: set[str]) -> Any:
    """``value`` with what legitimately differs between stores made comparable: generated ids become labels,
    timestamps ``<ts>``, cursors ``<cursor>`` (kept in ``side.cursors``)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "duration_ms":  # a measurement, not an answer
                out[key] = "<ms>"
            elif key in CURSOR_KEYS:
                side.cursors[key] = item
                out[key] = None if item is None else "<cursor>"
            else:
                out[key] = normalize(side, item, shared)
        return out
    if isinstance(value, list):
        return [normalize(side, item, shared) for item in value]
    if isinstance(value, str):
        if _TIMESTAMP.fullmatch(value):
            return "<ts>"
        return _UUID.sub(lambda m: m.group(0) if m.group(0) in shared else side.label(m.group(0)), value)
    return value


def answer(side: Side, response: httpx.Response, shared: set[str]) -> Any:
    """What a response says, normalized: its status and body (a stream: its chunks)."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        body: Any = chunks(response.text)
    else:
        body = response.json()
    return response.status_code, normalize(side, body, shared)


@dataclass
class Sequence:
    """One seeded sequence of operations, sent to both sides; every answer is compared."""

    rng: random.Random
    sides: tuple[Side, Side]
    user: str
    other: str
    shared: set[str]
    log: list[str] = field(default_factory=list)
    divergences: list[str] = field(default_factory=list)

    def both(self, name: str, send: Callable[[Side], httpx.Response | None]) -> list[Any]:
        self.log.append(name)
        answers = []
        for side in self.sides:
            response = send(side)
            answers.append(None if response is None else answer(side, response, self.shared))
        if answers[0] != answers[1]:
            self.divergences.append(f"{name}:\n  sqlite:   {answers[0]}\n  supabase: {answers[1]}")
        return answers

    # -- choices, made once for both sides ----------------------------------------------------------------------

    def handle(self) -> int | None:
        count = len(self.sides[0].conversations)
        return self.rng.randrange(count) if count else None

    def conversation_of(self, side: Side, handle: int | None, who: str) -> str:
        """The conversation a handle names on ``side``; ``who`` may ask for an unknown id or the other user's."""
        if who == "unknown" or handle is None:
            return "00000000-0000-4000-8000-00000000dead"
        return side.conversations[handle]

    # -- operations ---------------------------------------------------------------------------------------------

    def create(self) -> None:
        title = self.rng.choice(TITLES + [None])
        body_of = (lambda s: {"user_id": self.user}) if title is None else (lambda s: {"user_id": self.user,
                                                                                      "title": title})
        answers = self.both(f"create {title!r}", lambda s: s.request("POST", "/api/conversations", self.user,
                                                                      json=body_of(s)))
        if answers[0][0] == 201 and answers[1][0] == 201:
            for side in self.sides:
                side.conversations.append(side.ids[answers[0][1]["id"]] if side is self.sides[0]
                                          else side.ids[answers[1][1]["id"]])

    def rename(self) -> None:
        handle, title = self.handle(), self.rng.choice(TITLES)
        who = self.rng.choice(["own"] * 4 + ["unknown", "other"])
        user = self.other if who == "other" else self.user
        self.both(f"rename #{handle} ({who}) {title!r}", lambda s: s.request(
            "PATCH", f"/api/conversations/{self.conversation_of(s, handle, who)}", user,
            json={"user_id": user, "title": title}))

    def delete(self) -> None:
        handle = self.handle()
        who = self.rng.choice(["own"] * 2 + ["unknown", "other"])
        user = self.other if who == "other" else self.user
        answers = self.both(f"delete #{handle} ({who})", lambda s: s.request(
            "DELETE", f"/api/conversations/{self.conversation_of(s, handle, who)}", user,
            params={"user_id": user}))
        if who == "own" and handle is not None and answers[0][0] == answers[1][0] == 200:
            for side in self.sides:
                del side.conversations[handle]

    def turn(self) -> None:
        new = self.handle() is None or self.rng.random() < 0.4
        message = self.rng.choice(MESSAGES)
        if new:
            conversation = new_id()
            self.shared.add(conversation)
            for side in self.sides:
                side.conversations.append(conversation)
            handle = len(self.sides[0].conversations) - 1
        else:
            handle = self.handle()
        self.both(f"turn #{handle} {message[:40]!r}", lambda s: s.request(
            "POST", "/api/chat/stream", self.user,
            json={"user_id": self.user, "conversation_id": s.conversations[handle], "message": message}))

    def branch(self) -> None:
        """A regenerate, an edit, a reply after an answer or a switch, on a message of the conversation's last read
        page (the same place on both sides)."""
        handle = self.handle()
        if handle is None:
            return
        known = [s.messages.get(s.conversations[handle], []) for s in self.sides]
        if not known[0] or len(known[0]) != len(known[1]):
            return self.read(handle)
        index = self.rng.randrange(len(known[0]))
        kind = self.rng.choice(["regenerate", "edit", "parent", "switch", "switch"])
        message = self.rng.choice(MESSAGES)

        def send(side: Side) -> httpx.Response:
            target = side.messages[side.conversations[handle]][index]
            path = f"/api/conversations/{side.conversations[handle]}"
            if kind == "switch":
                return side.request("PUT", f"{path}/active-leaf", self.user,
                                    json={"user_id": self.user, "message_id": target})
            body = {"user_id": self.user, "conversation_id": side.conversations[handle],
                    f"{kind}_message_id": target}
            if kind != "regenerate":
                body["message"] = message
            return side.request("POST", "/api/chat/stream", self.user, json=body)

        self.both(f"{kind} #{handle} message {index}", send)

    def read(self, handle: int | None = None) -> None:
        handle = self.handle() if handle is None else handle
        who = self.rng.choice(["own"] * 8 + ["unknown", "other"])
        user = self.other if who == "other" else self.user
        params: dict[str, Any] = {"user_id": user}
        if self.rng.random() < 0.5:
            params["message_limit"] = self.rng.randint(1, 4)
        if self.rng.random() < 0.4:
            params["message_order"] = self.rng.choice(["asc", "desc"])
        seek = self.rng.choice([None, None, "message_before", "message_after", "message_offset", "bad"])
        if seek == "message_offset":
            params["message_offset"] = self.rng.randint(0, 3)
        bad = self.rng.choice(bad_cursors())

        def send(side: Side) -> httpx.Response:
            sent = dict(params)
            if seek in ("message_before", "message_after"):
                cursor = side.cursors.get(f"{seek}_cursor")
                if cursor is None:
                    return side.request("GET", "/", user)
                sent[seek] = cursor
            elif seek == "bad":
                sent["message_before"] = bad
            return side.request("GET", f"/api/conversations/{self.conversation_of(side, handle, who)}", user,
                                params=sent)

        answers = self.both(f"read #{handle} ({who}) {params} {seek}", send)
        if who == "own" and handle is not None:
            for side, (status, body) in zip(self.sides, answers):
                if status == 200 and "messages" in body:
                    side.messages[side.conversations[handle]] = [side.ids[m["id"]] for m in body["messages"]]

    def listing(self) -> None:
        params: dict[str, Any] = {"user_id": self.user, "limit": self.rng.randint(1, 5)}
        if self.rng.random() < 0.4:
            params["q"] = self.rng.choice(QUERIES)
        seek = self.rng.choice([None, None, "before", "after", "offset", "bad", "message"])
        if seek == "offset":
            params["offset"] = self.rng.randint(0, 4)
        bad = self.rng.choice(bad_cursors())

        def send(side: Side) -> httpx.Response:
            sent = dict(params)
            if seek in ("before", "after"):
                cursor = side.cursors.get(f"{seek}_cursor")
                if cursor is None:
                    return side.request("GET", "/", self.user)
                sent[seek] = cursor
            elif seek == "bad":
                sent["before"] = bad
            elif seek == "message":
                cursor = side.cursors.get("message_before_cursor")
                if cursor is None:
                    return side.request("GET", "/", self.user)
                sent["after"] = cursor
            return side.request("GET", "/api/conversations", self.user, params=sent)

        self.both(f"list {params} {seek}", send)

    def usage(self) -> None:
        period = self.rng.choice(["day", "month", "week"])
        self.both(f"usage {period}", lambda s: s.request("GET", "/api/usage", self.user,
                                                         params={"user_id": self.user, "period": period}))

    def action(self) -> None:
        """A change the assistant prepares (on the sample data), read back, confirmed (or not), read again."""
        message = self.rng.choice(["Mark invoice INV-1043 as paid", "Delete the contact Summit Paint Supply",
                                   "Pause the Spring exterior special campaign"])
        conversation = new_id()
        self.shared.add(conversation)
        for side in self.sides:
            side.conversations.append(conversation)
        answers = self.both(f"prepare {message!r}", lambda s: s.request(
            "POST", "/api/chat/stream", self.user,
            json={"user_id": self.user, "conversation_id": conversation, "message": message}))
        labels = [c["tool_call"]["action_id"] for c in answers[0][1] if isinstance(c, dict)
                  and isinstance(c.get("tool_call"), dict) and "action_id" in c["tool_call"]]
        for label in labels[:1]:
            who = self.rng.choice(["own", "own", "other"])
            user = self.other if who == "other" else self.user
            path = lambda s: f"/api/actions/{s.ids[label]}"  # noqa: E731
            self.both(f"action {label} ({who})", lambda s: s.request("GET", path(s), user,
                                                                     params={"user_id": user}))
            if self.rng.random() < 0.7:
                self.both(f"confirm {label} ({who})", lambda s: s.request("POST", f"{path(s)}/confirm", user,
                                                                          json={"user_id": user}))
                self.both(f"confirm again {label}", lambda s: s.request("POST", f"{path(s)}/confirm", self.user,
                                                                        json={"user_id": self.user}))
            self.both(f"action {label} after", lambda s: s.request("GET", path(s), self.user,
                                                                   params={"user_id": self.user}))

    def turn_into(self, handle: int, message: str) -> None:
        self.both(f"turn #{handle} {message!r}", lambda s: s.request(
            "POST", "/api/chat/stream", self.user,
            json={"user_id": self.user, "conversation_id": s.conversations[handle], "message": message}))

    def read_all(self, handle: int) -> None:
        answers = self.both(f"read #{handle}", lambda s: s.request(
            "GET", f"/api/conversations/{s.conversations[handle]}", self.user, params={"user_id": self.user}))
        for side, (status, body) in zip(self.sides, answers):
            assert status == 200, body
            side.messages[side.conversations[handle]] = [side.ids[m["id"]] for m in body["messages"]]

    def run(self, count: int) -> None:
        operations = [self.create] * 3 + [self.rename] * 2 + [self.delete] + [self.turn] * 4 + [self.branch] * 3 \
            + [self.read] * 3 + [self.listing] * 5 + [self.usage] + [self.action]
        for _ in range(count):
            self.rng.choice(operations)()
            if len(self.divergences) >= 3:
                break


def bad_cursors() -> list[str]:
    def encode(parts: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(parts).encode()).rstrip(b"=").decode()

    return ["nope", "", "%%%", encode(["c", "2026-01-01T00:00:00.000000Z", "not-a-uuid"]),
            encode(["m", "2026-01-01T00:00:00.000000Z", 0]), encode(["x", 1, 2]), encode("c"),
            encode(["c", "2026-02-30T00:00:00.000000Z", str(uuid.uuid4())])]


# -- the two services ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sides(postgrest_server: tuple[Any, LiveServer], register_user: Callable[[str], None],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side]]:
    url = postgrest_server[1].url
    common = {"SUPABASE_JWT_SECRET": TEST_JWT_SECRET, "LOCAL_TOKEN_DELAY": "0", "BUDGET_DAY_TOKENS": "10000000",
              "BUDGET_MONTH_COST": "1000"}
    supabase = {**common, "STORE": "supabase", "SUPABASE_URL": url, "SUPABASE_PUBLISHABLE_KEY": TEST_PUBLISHABLE_KEY,
                "SUPABASE_RUN_SECRET": RUN_SECRET, "RETRY_BASE_DELAY": "0.01", "RETRY_MAX_DELAY": "0.05"}
    issuer = f"{url.rstrip('/')}/auth/v1"

    def supabase_auth(user: str) -> dict[str, str]:
        register_user(user)
        return bearer(mint(user, TEST_JWT_SECRET, issuer=issuer))

    with serve(create_app(make_settings(tmp_path_factory.mktemp("sqlite"), **common))) as lite, \
            serve(create_app(make_settings(tmp_path_factory.mktemp("supabase"), **supabase))) as base:
        yield (Side("sqlite", lite, lambda user: bearer(mint(user, TEST_JWT_SECRET))),
               Side("supabase", base, supabase_auth))


def fresh(sides: tuple[Side, Side]) -> tuple[Side, Side]:
    return tuple(Side(s.name, s.live, s.auth) for s in sides)  # type: ignore[return-value]


@pytest.mark.parametrize("seed", SEEDS)
def test_both_stores_answer_a_random_sequence_alike(sides: tuple[Side, Side], seed: int) -> None:
    rng = random.Random(seed)
    user, other = new_id(), new_id()
    run = Sequence(rng, fresh(sides), user, other, {user, other})
    if rng.random() < 0.5:
        run.both("sample data", lambda s: s.request("POST", "/api/dev/sample-data", user, json={"user_id": user}))
        run.both("sample data, other", lambda s: s.request("POST", "/api/dev/sample-data", other,
                                                           json={"user_id": other}))
    run.run(rng.randint(*OPERATIONS))
    assert not run.divergences, f"seed {seed}\n" + "\n".join(run.log) + "\n\n" + "\n".join(run.divergences)


# -- targeted comparisons -----------------------------------------------------------------------------------------


def probe(sides: tuple[Side, Side]) -> Sequence:
    user, other = new_id(), new_id()
    return Sequence(random.Random(0), fresh(sides), user, other, {user, other})


SEARCHED = ["नमस्ते दुनिया", "สวัสดี ครับ", "ᛮᛯ runes", "snake_case word", "x²y", "½ coat", "①② steps",
            "Ⅻ roman", "ß straße", "ǅungla", "ﬁne print", "İstanbul", "e\u0301clair", "東京の塗装", "٣ coats",
            "don't", "a\u0301\u0301b", "\u0301alone", "x" * 98 + " " + "y" * 101, "𝐁𝐨𝐥𝐝", "ＦＵＬＬ"]
PROBES = ["ते", "नमस्ते", "नम", "दुनिया", "สวัสดี", "ดี", "สว", "ᛮ", "ᛯ", "snake", "case", "x2", "2", "x", "y",
          "1", "coat", "steps", "xii", "straße", "strasse", "ǆ", "dž", "fine", "fi", "i̇stanbul", "istanbul",
          "éclair", "東京", "塗装", "3", "٣", "don", "t", "áb", "a", "b", "\u0301", "alone", "x" * 98, "y" * 100,
          "y" * 101, "bold", "full"]


def test_every_word_is_found_alike(sides: tuple[Side, Side]) -> None:
    run = probe(sides)
    for text in SEARCHED:
        handle_title = run.both(f"create {text!r}", lambda s: s.request(
            "POST", "/api/conversations", run.user, json={"user_id": run.user, "title": text}))
        assert handle_title[0][0] == 201
    for query in PROBES:
        run.both(f"search {query!r}", lambda s: s.request(
            "GET", "/api/conversations", run.user, params={"user_id": run.user, "q": query, "limit": 100}))
    assert not run.divergences, "\n".join(run.divergences)


def test_a_branch_point_of_the_wrong_role_is_refused_alike(sides: tuple[Side, Side]) -> None:
    """Each store named the field sent and what it must name (SQLite), or all three at once (Supabase)."""
    run = probe(sides)
    conversation = new_id()
    run.shared.add(conversation)
    for side in run.sides:
        side.conversations.append(conversation)
    run.turn_into(0, "hello")
    run.read_all(0)
    for field_name, index in (("parent", 0), ("edit", 1), ("regenerate", 0)):
        body = (lambda s, f=field_name, i=index: {
            "user_id": run.user, "conversation_id": conversation, "message": "again",
            f"{f}_message_id": s.messages[conversation][i]})
        answers = run.both(f"{field_name} on message {index}", lambda s: s.request(
            "POST", "/api/chat/stream", run.user, json=body(s)))
        assert answers[0][0] == 422 and f"'{field_name}_message_id'" in answers[0][1]["error"]["message"]
    assert not run.divergences, "\n".join(run.divergences)


@pytest.mark.parametrize("seed", range(4))
def test_cursor_pages_neither_skip_nor_repeat_while_the_list_changes(sides: tuple[Side, Side], seed: int) -> None:
    """Reading the list page by page (``before``) while conversations are created, renamed (moved to the top) and
    deleted: no conversation shows twice, and every one left untouched all along shows once, in order; both stores
    answer every page alike."""
    rng = random.Random(1000 + seed)
    run = probe(sides)
    run.rng = rng
    for index in range(9):
        run.both(f"create {index}", lambda s, i=index: s.request(
            "POST", "/api/conversations", run.user, json={"user_id": run.user, "title": f"conv {i}"}))
    first = run.both("page 1", lambda s: s.request("GET", "/api/conversations", run.user,
                                                   params={"user_id": run.user, "limit": 2}))
    seen = [[c["title"] for c in first[0][1]["conversations"]], [c["title"] for c in first[1][1]["conversations"]]]
    cursor = {s.name: s.cursors["before_cursor"] for s in run.sides}  # the last page's, not the whole list's
    touched: set[str] = set()
    for page in range(2, 12):
        change = rng.choice(["create", "rename", "delete", "none"])
        listed = run.both(f"all before change {page}", lambda s: s.request(
            "GET", "/api/conversations", run.user, params={"user_id": run.user, "limit": 100}))
        titles = [c["title"] for c in listed[0][1]["conversations"]]
        if change != "none" and titles:
            index = rng.randrange(len(titles))
            victim = titles[index]
            ids = [s.ids[listed[n][1]["conversations"][index]["id"]] for n, s in enumerate(run.sides)]
            touched.add(victim)
            if change == "create":
                touched.add(f"new {page}")
                run.both(f"create new {page}", lambda s: s.request(
                    "POST", "/api/conversations", run.user, json={"user_id": run.user, "title": f"new {page}"}))
            elif change == "rename":
                run.both(f"rename {victim}", lambda s: s.request(
                    "PATCH", f"/api/conversations/{ids[run.sides.index(s)]}", run.user,
                    json={"user_id": run.user, "title": victim}))
            else:
                run.both(f"delete {victim}", lambda s: s.request(
                    "DELETE", f"/api/conversations/{ids[run.sides.index(s)]}", run.user, params={"user_id": run.user}))
        answers = run.both(f"page {page}", lambda s: s.request(
            "GET", "/api/conversations", run.user,
            params={"user_id": run.user, "limit": 2, "before": cursor[s.name]}))
        cursor = {s.name: s.cursors["before_cursor"] for s in run.sides}
        for n in range(2):
            seen[n] += [c["title"] for c in answers[n][1]["conversations"]]
        if not answers[0][1]["has_more"]:
            break
    assert not run.divergences, "\n".join(run.divergences)
    untouched = [f"conv {i}" for i in reversed(range(9)) if f"conv {i}" not in touched]
    for titles in seen:
        assert len(titles) == len(set(titles)), titles
        assert [t for t in titles if t in untouched] == untouched, titles
