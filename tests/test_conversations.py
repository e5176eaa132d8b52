"""The everyday conversation API of a chat frontend (issue 12), over HTTP, on both stores: rename, titles from the
first message, cursor paging of conversations and messages, and search."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from app import create_app
from services.runs.titles import title_from_message
from settings import Settings
from tests.conftest import AuthHeaders
from tests.scripted_model import ScriptedModel
from tests.support import make_settings, new_id, serve
from tests.test_api import assert_envelope, chat, create

LIST = "/api/conversations"


def listing(client: TestClient, auth: AuthHeaders, user: str, **params: Any) -> dict[str, Any]:
    response = client.get(LIST, params={"user_id": user, **params}, headers=auth(user))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def opened(client: TestClient, auth: AuthHeaders, user: str, conversation: str, **params: Any) -> dict[str, Any]:
    response = client.get(f"{LIST}/{conversation}", params={"user_id": user, **params}, headers=auth(user))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def rename(client: TestClient, auth: AuthHeaders, user: str, conversation: str, body: dict[str, Any]) -> Any:
    return client.patch(f"{LIST}/{conversation}", json={"user_id": user, **body}, headers=auth(user))


def ids(page: dict[str, Any]) -> list[str]:
    return [c["id"] for c in page["conversations"]]


def searched(client: TestClient, auth: AuthHeaders, user: str, q: str) -> list[str]:
    return ids(listing(client, auth, user, q=q))


# -- rename -------------------------------------------------------------------------------------------------------


def test_rename_returns_the_conversation_with_its_new_title_and_counts_as_activity(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    first = create(client, auth_headers, user_id, "Kitchen repaint")
    second = create(client, auth_headers, user_id, "Deck")
    renamed = rename(client, auth_headers, user_id, first["id"], {"title": "  Kitchen and hallway  "})
    assert renamed.status_code == 200, renamed.text
    body = renamed.json()
    assert (body["id"], body["title"]) == (first["id"], "Kitchen and hallway")
    assert body["updated_at"] > first["updated_at"] and body["created_at"] == first["created_at"]
    assert opened(client, auth_headers, user_id, first["id"])["title"] == "Kitchen and hallway"
    assert ids(listing(client, auth_headers, user_id)) == [first["id"], second["id"]]
    again = rename(client, auth_headers, user_id, first["id"], {"title": "Kitchen and hallway"}).json()
    assert again["updated_at"] == body["updated_at"]  # the same title again is no activity


def test_rename_of_someone_elses_or_an_unknown_conversation_is_404(
    client: TestClient, auth_headers: AuthHeaders
) -> None:
    alice, bob = new_id(), new_id()
    conversation = create(client, auth_headers, alice, "Alice's")["id"]
    error = assert_envelope(rename(client, auth_headers, bob, conversation, {"title": "Bob's now"}), 404)
    assert error["code"] == "CONVERSATION_NOT_FOUND"
    assert_envelope(rename(client, auth_headers, bob, new_id(), {"title": "x"}), 404, "CONVERSATION_NOT_FOUND")
    assert opened(client, auth_headers, alice, conversation)["title"] == "Alice's"


@pytest.mark.parametrize(
    "body",
    [{}, {"title": None}, {"title": ""}, {"title": "   "}, {"title": "t" * 201}, {"title": 12}, {"title": ["x"]}],
)
def test_bad_rename_bodies_are_422(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, body: dict[str, Any]
) -> None:
    conversation = create(client, auth_headers, user_id)["id"]
    assert "title" in assert_envelope(rename(client, auth_headers, user_id, conversation, body), 422)["message"]


def test_rename_checks_the_id_and_user_and_takes_200_characters(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    conversation = create(client, auth_headers, user_id)["id"]
    assert_envelope(rename(client, auth_headers, user_id, "not-a-uuid", {"title": "x"}), 422, "VALIDATION_ERROR")
    response = client.patch(f"{LIST}/{conversation}", json={"title": "x"}, headers=auth_headers(user_id))
    assert "user_id" in assert_envelope(response, 422)["message"]
    assert rename(client, auth_headers, user_id, conversation, {"title": "t" * 200}).json()["title"] == "t" * 200


# -- titles -------------------------------------------------------------------------------------------------------


def test_a_first_turn_titles_its_new_conversation_from_the_message_and_later_turns_keep_it(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    conversation = new_id()
    message = "Can you list every overdue invoice\nfor Ben Carter, and then the appointments next week?"
    chat(client, auth_headers, user_id, conversation, message)
    title = opened(client, auth_headers, user_id, conversation)["title"]
    assert title == title_from_message(message) == "Can you list every overdue invoice for Ben Carter, and then\u2026"
    chat(client, auth_headers, user_id, conversation, "And the projects?")
    assert opened(client, auth_headers, user_id, conversation)["title"] == title


def test_a_turn_never_retitles_an_existing_conversation(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    untitled = create(client, auth_headers, user_id, title=None)["id"]
    named = create(client, auth_headers, user_id, "Kitchen repaint")["id"]
    for conversation in (untitled, named):
        chat(client, auth_headers, user_id, conversation, "What invoices do I have?")
    assert opened(client, auth_headers, user_id, untitled)["title"] is None
    assert opened(client, auth_headers, user_id, named)["title"] == "Kitchen repaint"


# -- paging conversations by cursor ---------------------------------------------------------------------------------


def test_conversations_page_by_cursor_in_both_directions_without_gaps_or_repeats(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    for i in range(5):
        create(client, auth_headers, user_id, f"c{i}")
    everything = ids(listing(client, auth_headers, user_id))
    pages, page = [], listing(client, auth_headers, user_id, limit=2)
    pages.append(ids(page))
    while page["has_more"] and len(pages) < 10:  # bounded: a cursor that goes round in circles fails, never hangs
        page = listing(client, auth_headers, user_id, limit=2, before=page["before_cursor"])
        assert page["total"] == 5 and page["offset"] == 0
        pages.append(ids(page))
    assert pages == [everything[0:2], everything[2:4], everything[4:5]]
    # Back up from the last page: the two just newer, still newest first, and one more page above them.
    back = listing(client, auth_headers, user_id, limit=2, after=page["after_cursor"])
    assert ids(back) == everything[2:4] and back["has_more"] is True
    top = listing(client, auth_headers, user_id, limit=2, after=back["after_cursor"])
    assert ids(top) == everything[0:2] and top["has_more"] is False


def test_after_the_newest_cursor_are_the_conversations_with_new_activity(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    older, newer = (create(client, auth_headers, user_id, f"c{i}")["id"] for i in range(2))
    first = listing(client, auth_headers, user_id)
    assert ids(first) == [newer, older]
    assert listing(client, auth_headers, user_id, after=first["after_cursor"])["conversations"] == []
    chat(client, auth_headers, user_id, older, "hello")
    since = listing(client, auth_headers, user_id, after=first["after_cursor"])
    assert ids(since) == [older] and since["has_more"] is False and since["total"] == 2


def test_an_empty_list_has_no_cursors(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    page = listing(client, auth_headers, user_id)
    assert (page["conversations"], page["has_more"]) == ([], False)
    assert page["before_cursor"] is None and page["after_cursor"] is None


def _cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).rstrip(b"=").decode()


BAD_CURSORS = [
    "not a cursor",
    "!!!!",
    "x" * 300,
    _cursor("c", "2026-11-24T01:49:20.911133Z"),
    _cursor("c", "2026-02-30T01:49:20.911133Z", new_id()),
    _cursor("c", "yesterday", new_id()),
    _cursor("c", "2026-11-24T01:49:20.911133Z", "not-a-uuid"),
    _cursor("m", "2026-11-24T01:49:20.911133Z", 7),
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
]


@pytest.mark.parametrize("cursor", BAD_CURSORS)
@pytest.mark.parametrize("name", ["before", "after"])
def test_an_invalid_list_cursor_is_422(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, name: str, cursor: str
) -> None:
    response = client.get(LIST, params={"user_id": user_id, name: cursor}, headers=auth_headers(user_id))
    assert f"'{name}'" in assert_envelope(response, 422, "VALIDATION_ERROR")["message"]


def test_a_cursor_goes_one_way_and_not_with_an_offset(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    create(client, auth_headers, user_id)
    cursor = listing(client, auth_headers, user_id)["before_cursor"]
    both = {"user_id": user_id, "before": cursor, "after": cursor}
    assert_envelope(client.get(LIST, params=both, headers=auth_headers(user_id)), 422)
    with_offset = {"user_id": user_id, "before": cursor, "offset": 1}
    response = client.get(LIST, params=with_offset, headers=auth_headers(user_id))
    assert "offset" in assert_envelope(response, 422)["message"]


# -- paging messages by cursor --------------------------------------------------------------------------------------


def _walk(client: TestClient, auth: AuthHeaders, user: str, conversation: str, order: str) -> list[list[str]]:
    """Every page of two messages in ``order``, following the cursor that reads on in that order."""
    follow = "message_after" if order == "asc" else "message_before"
    page = opened(client, auth, user, conversation, message_limit=2, message_order=order)
    pages = [[m["content"] for m in page["messages"]]]
    while page["message_has_more"] and len(pages) < 10:
        params = {"message_limit": 2, "message_order": order, follow: page[f"{follow}_cursor"]}
        page = opened(client, auth, user, conversation, **params)
        pages.append([m["content"] for m in page["messages"]])
    return pages


def test_messages_page_by_cursor_oldest_or_newest_first(
    settings: Settings, auth_headers: AuthHeaders, user_id: str
) -> None:
    conversation = new_id()
    with TestClient(create_app(settings, model=ScriptedModel(pieces=["answer"]))) as client:
        for question in ("q1", "q2", "q3"):
            chat(client, auth_headers, user_id, conversation, question)
        everything = [m["content"] for m in opened(client, auth_headers, user_id, conversation)["messages"]]
        assert everything == ["q1", "answer", "q2", "answer", "q3", "answer"]
        assert _walk(client, auth_headers, user_id, conversation, "asc") == [
            ["q1", "answer"], ["q2", "answer"], ["q3", "answer"]
        ]
        assert _walk(client, auth_headers, user_id, conversation, "desc") == [
            ["answer", "q3"], ["answer", "q2"], ["answer", "q1"]
        ]


def test_message_cursors_read_the_nearest_messages_on_either_side_in_the_order_asked(
    settings: Settings, auth_headers: AuthHeaders, user_id: str
) -> None:
    conversation = new_id()
    with TestClient(create_app(settings, model=ScriptedModel(pieces=["answer"]))) as client:
        for question in ("q1", "q2", "q3"):
            chat(client, auth_headers, user_id, conversation, question)
        middle = opened(client, auth_headers, user_id, conversation, message_limit=1, message_offset=4)
        assert [m["content"] for m in middle["messages"]] == ["q3"]
        before = {"message_before": middle["message_before_cursor"], "message_limit": 2}
        older = opened(client, auth_headers, user_id, conversation, **before)
        assert [m["content"] for m in older["messages"]] == ["q2", "answer"] and older["message_has_more"]
        newest_first = opened(client, auth_headers, user_id, conversation, **before, message_order="desc")
        assert [m["content"] for m in newest_first["messages"]] == ["answer", "q2"]
        after = {"message_after": middle["message_after_cursor"], "message_limit": 2}
        newer = opened(client, auth_headers, user_id, conversation, **after)
        assert [m["content"] for m in newer["messages"]] == ["answer"] and not newer["message_has_more"]
        # A cursor is a place, not a message: the page after the newest is empty, and so are its cursors.
        end = opened(client, auth_headers, user_id, conversation, message_after=newer["message_after_cursor"])
        assert (end["messages"], end["message_after_cursor"], end["message_has_more"]) == ([], None, False)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"message_order": "sideways"}, "message_order"),
        ({"message_before": _cursor("c", "2026-11-24T01:49:20.911133Z", new_id())}, "message_before"),
        ({"message_after": _cursor("m", "2026-11-24T01:49:20.911133Z", 0)}, "message_after"),
        ({"message_after": _cursor("m", "2026-11-24T01:49:20.911133Z", True)}, "message_after"),
        ({"message_after": _cursor("m", "2026-11-24T01:49:20.911133Z", 2**63)}, "message_after"),
        ({"message_before": "%%%"}, "message_before"),
        ({"message_before": _cursor("m", "2026-11-24T01:49:20.911133Z", 3), "message_offset": 2}, "message_offset"),
    ],
)
def test_bad_message_paging_is_422(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, params: dict[str, Any], field: str
) -> None:
    conversation = create(client, auth_headers, user_id)["id"]
    query = {"user_id": user_id, **params}
    response = client.get(f"{LIST}/{conversation}", params=query, headers=auth_headers(user_id))
    assert f"'{field}'" in assert_envelope(response, 422, "VALIDATION_ERROR")["message"]


def test_an_answer_still_streaming_pages_and_is_found_like_any_message(
    tmp_path: Path, service_env: dict[str, str], auth_headers: AuthHeaders, user_id: str
) -> None:
    model = ScriptedModel(pieces=["quokka ", *(f"w{i} " for i in range(60))], pause=0.05)  # about 3 s
    conversation = new_id()
    headers = auth_headers(user_id)
    with serve(create_app(make_settings(tmp_path, **service_env), model=model)) as server:
        body = {"message": "tell me about the deck", "conversation_id": conversation, "user_id": user_id}
        with httpx.stream("POST", f"{server.url}/api/chat/stream", json=body, headers=headers, timeout=30) as live:
            assert live.status_code == 200
            next(live.iter_text())
            time.sleep(1.2)  # a save of the answer's text has happened since (every second)
            params = {"user_id": user_id, "message_order": "desc", "message_limit": 1}
            page = httpx.get(f"{server.url}{LIST}/{conversation}", params=params, headers=headers).json()
            [streaming] = page["messages"]
            assert streaming["metadata"]["status"] == "streaming" and page["message_has_more"] is True
            older = {**params, "message_before": page["message_before_cursor"]}
            response = httpx.get(f"{server.url}{LIST}/{conversation}", params=older, headers=headers)
            [question] = response.json()["messages"]
            assert question["content"] == "tell me about the deck"
            # The answer so far is searchable while it streams: the index follows the updates of its text.
            found = httpx.get(f"{server.url}{LIST}", params={"user_id": user_id, "q": "quokka"}, headers=headers)
            assert [c["id"] for c in found.json()["conversations"]] == [conversation]


# -- search -------------------------------------------------------------------------------------------------------


def test_search_matches_titles_and_message_text_as_word_prefixes(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    kitchen = create(client, auth_headers, user_id, "Kitchen repaint")["id"]
    misc = create(client, auth_headers, user_id, "Misc")["id"]
    chat(client, auth_headers, user_id, misc, "Send INV-1043 to ben@carter.com please")
    create(client, auth_headers, user_id, "Deck stain")
    assert searched(client, auth_headers, user_id, "kitchen") == [kitchen]
    assert searched(client, auth_headers, user_id, "KITCH rep") == [kitchen]
    assert searched(client, auth_headers, user_id, "carter") == [misc]
    assert searched(client, auth_headers, user_id, "inv 1043") == [misc]
    assert searched(client, auth_headers, user_id, "kitchen carter") == []  # every word, in one title or message
    page = listing(client, auth_headers, user_id, q="zebra")
    assert (page["conversations"], page["total"], page["has_more"]) == ([], 0, False)


def test_search_follows_renames_answers_and_deletes(
    settings: Settings, auth_headers: AuthHeaders, user_id: str
) -> None:
    with TestClient(create_app(settings, model=ScriptedModel(pieces=["Two coats of ", "eggshell."]))) as client:
        conversation = create(client, auth_headers, user_id, "Kitchen repaint")["id"]
        chat(client, auth_headers, user_id, conversation, "Which finish?")
        # The answer was inserted empty and written as it streamed: its words are found all the same.
        assert searched(client, auth_headers, user_id, "eggshell") == [conversation]
        rename(client, auth_headers, user_id, conversation, {"title": "Hallway"})
        assert searched(client, auth_headers, user_id, "kitchen") == []
        assert searched(client, auth_headers, user_id, "hallway") == [conversation]
        client.delete(f"{LIST}/{conversation}", params={"user_id": user_id}, headers=auth_headers(user_id))
        assert searched(client, auth_headers, user_id, "eggshell") == []
        assert searched(client, auth_headers, user_id, "hallway") == []


def test_search_never_returns_another_users_conversation(client: TestClient, auth_headers: AuthHeaders) -> None:
    alice, bob = new_id(), new_id()
    alices = create(client, auth_headers, alice, "Kitchen for Alice")["id"]
    chat(client, auth_headers, alice, alices, "my secret gazebo plans")
    bobs = create(client, auth_headers, bob, "Kitchen for Bob")["id"]
    assert searched(client, auth_headers, bob, "gazebo") == []
    assert searched(client, auth_headers, bob, "alice") == []
    assert searched(client, auth_headers, bob, "kitchen") == [bobs]
    assert listing(client, auth_headers, bob, q="kitchen")["total"] == 1
    assert searched(client, auth_headers, alice, "kitchen") == [alices]


@pytest.mark.parametrize(
    ("q", "finds"),
    [
        ('"kitchen"', True),
        ("kitchen*", True),
        ("repaint -kitchen", True),  # no NOT: both are words to find
        ("kitchen OR zebra", False),  # no OR: "or" and "zebra" are words too, and neither is there
        ("NOT zebra kitchen", False),
        ("title:kitchen", False),  # no column filter: "title" is a word
        ("NEAR(kitchen repaint)", False),
        ("kitchen'; drop table agent_messages; --", False),
        ("kitchen & !repaint | x:*", False),
        ("*", False),
        (')("^:', False),
        ("kitchen\\", True),
        ("kitchen\x00", True),
    ],
)
def test_search_reads_no_query_syntax(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, q: str, finds: bool
) -> None:
    kitchen = create(client, auth_headers, user_id, "Kitchen repaint")["id"]
    assert searched(client, auth_headers, user_id, q) == ([kitchen] if finds else [])


# Words typed exactly as stored, and in the other case or form a user may type: each store folds its index and the
# search with one function (services/store/search.py; PostgreSQL's search_lexemes), so no engine's own idea of a letter
# or of case stands between them.
FOLDED_WORDS = [
    ("Trip to İstanbul", ["İstanbul", "i\u0307stanbul", "İST"]),  # Turkish dotted capital I
    ("Cafe\u0301 repaint", ["Cafe\u0301", "Café", "CAFÉ"]),  # an accent typed as a combining character
    ("ᏣᎳᎩ porch", ["ᏣᎳᎩ", "ꮳꮃꭹ"]),  # Cherokee capitals, and their small letters
    ("𞤀𞤣𞤤𞤢𞤥 deck", ["𞤀𞤣𞤤𞤢𞤥", "𞤢𞤣𞤤𞤢𞤥", "𞤀𞤣"]),  # Adlam
    ("𐒰𐓏𐓘𐓀𐓐𐓊 fence", ["𐒰𐓏𐓘𐓀𐓐𐓊", "𐓘𐓏𐓘𐓀𐓐𐓊"]),  # Osage
    ("ᲡᲐᲥᲐᲠᲗᲕᲔᲚᲝ trim", ["ᲡᲐᲥᲐᲠᲗᲕᲔᲚᲝ", "საქართველო"]),  # Georgian capitals (Mtavruli) and Mkhedruli
    ("नमस्ते siding", ["नमस्ते"]),  # vowel signs and a virama inside a word
    ("ｋｉｔｃｈｅｎ ﬁnish", ["kitchen", "finish"]),  # full-width letters and a ligature
]


@pytest.mark.parametrize(("stored", "typed"), FOLDED_WORDS, ids=[words[0] for _, words in FOLDED_WORDS])
def test_search_finds_a_word_typed_as_it_is_stored_in_any_script(
    client: TestClient, auth_headers: AuthHeaders, user_id: str, stored: str, typed: list[str]
) -> None:
    titled = create(client, auth_headers, user_id, stored)["id"]
    said = create(client, auth_headers, user_id, "Misc")["id"]
    chat(client, auth_headers, user_id, said, f"note: {stored}")
    create(client, auth_headers, user_id, "Unrelated")
    for words in typed:
        assert sorted(searched(client, auth_headers, user_id, words)) == sorted([titled, said]), words


def test_search_results_page_by_cursor_and_by_offset(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    matching = [create(client, auth_headers, user_id, f"Kitchen {i}")["id"] for i in range(3)][::-1]
    create(client, auth_headers, user_id, "Deck")
    page = listing(client, auth_headers, user_id, q="kitchen", limit=2)
    assert (ids(page), page["total"], page["has_more"]) == (matching[:2], 3, True)
    rest = listing(client, auth_headers, user_id, q="kitchen", limit=2, before=page["before_cursor"])
    assert (ids(rest), rest["total"], rest["has_more"]) == (matching[2:], 3, False)
    back = listing(client, auth_headers, user_id, q="kitchen", limit=1, after=rest["after_cursor"])
    assert (ids(back), back["has_more"]) == (matching[1:2], True)
    assert ids(listing(client, auth_headers, user_id, q="kitchen", limit=2, offset=1)) == matching[1:]


def test_search_text_is_checked(client: TestClient, auth_headers: AuthHeaders, user_id: str) -> None:
    create(client, auth_headers, user_id, "Kitchen")
    too_long = client.get(LIST, params={"user_id": user_id, "q": "k" * 201}, headers=auth_headers(user_id))
    assert "'q'" in assert_envelope(too_long, 422, "VALIDATION_ERROR")["message"]
    assert len(searched(client, auth_headers, user_id, "k" * 200)) == 0
    for blank in ("", "   "):  # an empty search box lists everything, as no q does
        assert listing(client, auth_headers, user_id, q=blank)["total"] == 1
