"""The store calls a chat turn makes before its first token, on both stores: ``Store.begin_turn`` (ensure the
conversation, save the user's message, read the history) and ``LimitStore.admit_chat`` (count the chat turn, take a
stream slot). Each must answer exactly as the separate calls it replaces, and write nothing it should not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from errors import NotFound
from services.postgrest import PostgrestStore
from services.postgrest_client import PostgrestClient
from services.retry import RetryPolicy
from services.sqlite_store import SQLiteStore
from services.store import Caller, NewMessage
from tests.support import new_id
from tests.tokens import TEST_PUBLISHABLE_KEY, mint

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(attempts=3, base_delay=0, max_delay=0, max_total=5)
Store = SQLiteStore | PostgrestStore


@pytest.fixture(params=["sqlite", "supabase"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    made: Store
    if request.param == "sqlite":
        made = SQLiteStore(str(tmp_path / "turns.db"))
    else:
        request.getfixturevalue("fake_postgrest")
        url = request.getfixturevalue("supabase_url")
        made = PostgrestStore(PostgrestClient(url, "api", TEST_PUBLISHABLE_KEY, retry=FAST, timeout=10))
    await made.open()
    yield made
    await made.aclose()


@pytest.fixture
def new_caller(store: Store, request: pytest.FixtureRequest) -> Callable[[], Caller]:
    """A fresh user; on Supabase registered in auth.users and carrying their own access token."""
    register = request.getfixturevalue("register_user") if isinstance(store, PostgrestStore) else None

    def make() -> Caller:
        user = new_id()
        if register is None:
            return Caller(user)
        register(user)
        return Caller(user, mint(user))

    return make


async def test_begin_turn_creates_the_conversation_saves_the_message_and_returns_the_history(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    conversation_id = new_id()
    message = NewMessage(conversation_id, "user", "first question")
    saved, history = await store.begin_turn(caller, "AI Chat", message, 50)
    assert (saved.id, saved.role, saved.content, saved.conversation_id) == (message.id, "user", "first question", conversation_id)
    assert [m.id for m in history] == [saved.id] and history[0] == saved
    conversation = await store.get_conversation(caller, conversation_id)
    assert (conversation.title, conversation.user_id, conversation.message_count) == ("AI Chat", caller.user_id, 1)


async def test_begin_turn_on_an_existing_conversation_returns_the_newest_messages_oldest_first(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    conversation = await store.create_conversation(caller, "Mine")
    for i in range(4):
        await store.add_message(caller, NewMessage(conversation.id, "user" if i % 2 == 0 else "assistant", f"m{i}"))
    saved, history = await store.begin_turn(caller, "AI Chat", NewMessage(conversation.id, "user", "m4"), 3)
    assert [m.content for m in history] == ["m2", "m3", "m4"] and history[-1] == saved
    # The same answer as the three calls it replaces; the existing title is kept.
    assert history == await store.recent_messages(caller, conversation.id, 3)
    assert (await store.get_conversation(caller, conversation.id)).title == "Mine"


async def test_begin_turn_is_idempotent_by_the_message_id(store: Store, new_caller: Callable[[], Caller]) -> None:
    caller = new_caller()
    message = NewMessage(new_id(), "user", "once")
    first, _ = await store.begin_turn(caller, "AI Chat", message, 50)
    again, history = await store.begin_turn(caller, "AI Chat", message, 50)
    assert again == first and [m.id for m in history] == [first.id]


async def test_begin_turn_on_another_users_conversation_is_not_found_and_writes_nothing(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    alice, bob = new_caller(), new_caller()
    conversation = await store.create_conversation(alice, "Alice's")
    with pytest.raises(NotFound) as caught:
        await store.begin_turn(bob, "AI Chat", NewMessage(conversation.id, "user", "sneaky"), 50)
    assert caught.value.code == "CONVERSATION_NOT_FOUND"
    assert await store.list_messages(alice, conversation.id, 10, 0) == []
    assert (await store.list_conversations(bob, 10, 0)).total == 0


async def test_admit_chat_counts_the_turn_and_takes_a_slot_until_a_limit_refuses(
    store: Store, new_caller: Callable[[], Caller]
) -> None:
    caller, other = new_caller(), new_caller()

    async def admit(who: Caller, lease_id: str, chat_limit: int = 100, stream_limit: int = 1) -> tuple[bool, float, bool]:
        return await store.admit_chat(
            who, lease_id, window_seconds=3600, chat_limit=chat_limit, stream_limit=stream_limit, ttl_seconds=60
        )

    first, second = new_id(), new_id()
    allowed, retry_after, taken = await admit(caller, first)
    assert allowed and taken and 0 < retry_after <= 3600
    assert (await admit(caller, second))[::2] == (True, False)  # counted, but no slot: the stream cap
    assert (await admit(other, new_id()))[::2] == (True, True)  # another user's slots are their own
    await store.stream_lease_release(caller, first)
    assert (await admit(caller, second))[::2] == (True, True)
    await store.stream_lease_release(caller, second)
    # Three hits so far; with a chat limit of 3 the fourth is refused, still counted, and takes no slot.
    refused = await admit(caller, new_id(), chat_limit=3, stream_limit=5)
    assert refused[0] is False and refused[2] is False and refused[1] > 0
    assert (await store.rate_limit_hit(caller, "chat", 3600, 4))[0] is False  # the 5th hit: the refusal counted
    assert await store.stream_lease_acquire(caller, new_id(), 1, 60) is True  # and it held no slot
