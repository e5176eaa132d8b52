"""Stored history to model turns: alternation, no empty blocks, the current message once, the budget."""

from __future__ import annotations

from services.runs.prompt import build_turns
from services.store import Message


def message(role: str, content: str, index: int = 0) -> Message:
    return Message(f"m{index}", "c", role, content, None, {}, f"2026-01-01T00:00:{index:02d}.000000Z")  # type: ignore[arg-type]


def texts(turns: list[dict]) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return [(t["role"], t["content"][0]["text"]) for t in turns]


def test_alternating_history_is_kept_in_order() -> None:
    history = [message("user", "a"), message("assistant", "b"), message("user", "c")]
    assert texts(build_turns(history, 1000)) == [("user", "a"), ("assistant", "b"), ("user", "c")]


def test_empty_answers_are_dropped_and_neighbours_merged() -> None:
    history = [message("user", "a"), message("assistant", ""), message("user", "again"), message("user", "c")]
    assert texts(build_turns(history, 1000)) == [("user", "a\n\nagain\n\nc")]


def test_history_never_starts_with_the_assistant() -> None:
    history = [message("assistant", "orphan"), message("user", "q")]
    assert texts(build_turns(history, 1000)) == [("user", "q")]


def test_budget_keeps_the_newest_turns_and_always_the_current_message() -> None:
    history = [message("user", "x" * 400), message("assistant", "y" * 400), message("user", "z" * 40)]
    assert texts(build_turns(history, 120)) == [("user", "z" * 40)]
    huge = [message("user", "q" * 100_000)]
    assert texts(build_turns(huge, 10)) == [("user", "q" * 100_000)]


def test_user_messages_merged_across_empty_answers_still_keep_to_the_budget() -> None:
    """Turns stopped with nothing shown (seen_chars 0) or failed before any text leave empty answers, so their user
    messages merge into one block: that block is cut to the budget like any other history, not kept whole as the
    current message is (else 49 messages of 10,000 characters made a 120,000-token prompt that one turn's budget
    reservation, HISTORY_TOKEN_BUDGET, never counted)."""
    history = []
    for i in range(24):
        history += [message("user", f"{i}" + "q" * 9_999, 2 * i), message("assistant", "", 2 * i + 1)]
    history.append(message("user", "now", 48))
    turns = build_turns(history, 12_000)
    sent = "".join(text for _, text in texts(turns))
    assert len(sent) // 4 <= 12_000
    assert sent.endswith("now") and turns[-1]["role"] == "user" and len(turns) == 1
