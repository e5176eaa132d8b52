"""Text every encoder can write and both stores keep alike: what a string from outside (the model) is made into.

Python's ``str`` can hold what UTF-8 cannot: a surrogate (U+D800..U+DFFF) on its own, which ``json.loads`` makes of a
``\\ud83d`` escape. Encoding one raises ``UnicodeEncodeError`` in SQLite's binding, httpx's JSON body and our SSE
writer alike. A NUL (U+0000) encodes, but no PostgreSQL text or jsonb can hold it. Both are shown as U+FFFD, as a
UTF-8 decoder shows bytes it cannot read; a pair spelt as two halves (``"\\ud83d" + "\\ude00"``) is one character.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")
UNSTORABLE = re.compile("[\ud800-\udfff\x00]")  # what no store keeps: a surrogate on its own, or NUL


def encodable(text: str) -> str:
    """``text`` with its surrogate pairs joined and every lone surrogate as U+FFFD."""
    if text.isascii() or not _SURROGATE.search(text):  # the usual case: no copy (isascii reads a flag)
        return text
    # UTF-16 is where surrogates mean something: its decoder joins the pairs and replaces the halves left alone.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def storable(text: str) -> str:
    """``encodable`` text with every NUL as U+FFFD."""
    if (text.isascii() and "\x00" not in text) or not UNSTORABLE.search(text):
        return text
    return encodable(text.replace("\x00", "\ufffd"))


def is_high_surrogate(char: str) -> bool:
    """The first half of a pair: a delta ending with one may have the other half at the start of the next."""
    return "\ud800" <= char <= "\udbff"
