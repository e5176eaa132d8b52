"""A conversation's title from its first message: short, clean, cut at a word boundary, without a model call.

The chat route titles the conversation a first turn creates with ``title_from_message(message)``; a conversation that
already exists keeps its title (``Store.begin_run`` uses ``NewRun.title`` only when it creates one). A message with
nothing printable left is titled ``AUTO_TITLE``.
"""

from __future__ import annotations

import re
import unicodedata

from services.store import AUTO_TITLE

MAX_TITLE_CHARS = 60
ELLIPSIS = "\u2026"
# A cut at a word boundary shorter than this fraction of the limit cuts inside the long word instead: "See" + "…" says
# less than "See https://example.com/invoices/2026…".
_MIN_BOUNDARY_FRACTION = 0.5
# What a cut may leave dangling at the end of the kept words: separators and opening brackets or quotes.
_DANGLING = " ,.;:!?-\u2013\u2014/\\|&+([{<\"'\u201c\u2018\u00ab"
# Unicode's control characters (category Cc): C0, DEL and C1.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
# Zero-width joiner and variation selectors: they bind to a neighbour, so a hard cut never separates them.
_JOINERS = frozenset("\u200d\ufe0e\ufe0f")


def title_from_message(message: str) -> str:
    """The title for a conversation whose first message is ``message`` (at most ``MAX_TITLE_CHARS`` characters)."""
    text = _clean(message)
    if not text:
        return AUTO_TITLE
    if len(text) <= MAX_TITLE_CHARS:
        return text
    return _cut(text, MAX_TITLE_CHARS - len(ELLIPSIS)) + ELLIPSIS


def _clean(message: str) -> str:
    """Control characters (newlines, tabs, NUL, ...) as spaces, whitespace collapsed, trailing stops dropped."""
    collapsed = " ".join(_CONTROLS.sub(" ", message).split())
    # A sentence's full stop or a trailing dash is not part of a title; a question or exclamation mark is
    # ("Any overdue invoices?").
    return collapsed.rstrip(_DANGLING.replace("?", "").replace("!", ""))


def _cut(text: str, room: int) -> str:
    """The longest start of ``text`` of at most ``room`` characters ending at a word boundary, tidied."""
    if text[room] == " ":  # the next word starts right after the room: every kept word is whole
        head = text[:room]
    else:
        boundary = text.rfind(" ", 0, room + 1)
        head = text[:boundary] if boundary >= room * _MIN_BOUNDARY_FRACTION else _hard_cut(text, room)
    tidy = head.rstrip(_DANGLING)
    return tidy or _hard_cut(text, room)


def _hard_cut(text: str, room: int) -> str:
    """``text`` cut to at most ``room`` characters, never between a character and the marks that belong to it."""
    cut = room
    while cut > 0 and (_attaches(text[cut]) or text[cut - 1] == "\u200d"):
        cut -= 1
    return text[:cut].rstrip(" ")


def _attaches(char: str) -> bool:
    """Whether ``char`` belongs to the character before it: a combining mark, a joiner, a skin-tone modifier."""
    return unicodedata.category(char) in ("Mn", "Mc", "Me") or char in _JOINERS or "\U0001f3fb" <= char <= "\U0001f3ff"
