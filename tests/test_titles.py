"""The title a first chat turn gives its new conversation (``services/runs/titles.py``): pure function, no model
call."""

from __future__ import annotations

import pytest

from services.runs.titles import ELLIPSIS, MAX_TITLE_CHARS, title_from_message


@pytest.mark.parametrize(
    ("message", "title"),
    [
        ("What invoices do I have?", "What invoices do I have?"),
        ("Show my projects.", "Show my projects"),
        ("  hello\n\n\tworld  ", "hello world"),
        ("line one\r\nline two\x00three", "line one line two three"),
        ("Repaint the kitchen -", "Repaint the kitchen"),
        ("Any overdue invoices!", "Any overdue invoices!"),
        ("x" * MAX_TITLE_CHARS, "x" * MAX_TITLE_CHARS),
    ],
)
def test_a_short_message_is_its_own_title_cleaned(message: str, title: str) -> None:
    assert title_from_message(message) == title


def test_a_long_message_is_cut_at_a_word_boundary_with_an_ellipsis() -> None:
    message = "Can you list every overdue invoice for Ben Carter, and then the appointments next week?"
    title = title_from_message(message)
    assert title == f"Can you list every overdue invoice for Ben Carter, and then{ELLIPSIS}"
    assert len(title) <= MAX_TITLE_CHARS


def test_a_cut_leaves_no_dangling_punctuation() -> None:
    message = "Schedule: paint the kitchen walls with two coats, then (trim) and the hallway ceiling too"
    title = title_from_message(message)
    assert title == f"Schedule: paint the kitchen walls with two coats, then{ELLIPSIS}"
    message = "Schedule: paint the kitchen walls with two coats and some (trim and the hallway ceiling"
    assert title_from_message(message) == f"Schedule: paint the kitchen walls with two coats and some{ELLIPSIS}"


def test_a_word_too_long_for_a_boundary_is_cut_inside() -> None:
    url = "https://example.com/invoices/2026-11-24/INV-1043-final-version.pdf"
    title = title_from_message(f"See {url}")
    assert title.startswith("See https://example.com/invoices/") and title.endswith(ELLIPSIS)
    assert len(title) <= MAX_TITLE_CHARS and not title.removesuffix(ELLIPSIS).endswith("-")
    assert len(title_from_message("x" * 500)) == MAX_TITLE_CHARS


def test_a_hard_cut_never_splits_a_character_from_its_marks() -> None:
    accented = "e\u0301" * 70  # "é" as a letter and a combining accent
    title = title_from_message(accented)
    assert title.removesuffix(ELLIPSIS) == "e\u0301" * (len(title.removesuffix(ELLIPSIS)) // 2)
    cook = "\U0001f469\u200d\U0001f373"  # one emoji of three code points
    body = title_from_message(cook * 40).removesuffix(ELLIPSIS)
    assert body == cook * (len(body) // 3)


@pytest.mark.parametrize("message", ["\x00\x01", "...", "   ", "\n-\n"])
def test_a_message_with_nothing_printable_keeps_the_default_title(message: str) -> None:
    assert title_from_message(message) == "AI Chat"
