"""What a conversation search means, for both stores: the words of the user's text, each matched as a word prefix.

``GET /api/conversations?q=kitch+inv`` finds the caller's conversations whose title, or one of whose messages, holds
a word starting with "kitch" and a word starting with "inv" (case-insensitive; accents count: "Lopez" does not find
"López"). A word is a run of letters and digits; everything else in the text separates words and is never query
syntax. That is what keeps the search safe from injection in both engines: only these words reach them, each quoted
(SQLite FTS5 ``"word"*``, ``services/sqlite_listing.py``; PostgreSQL ``'word':*`` in ``to_tsquery('simple', ...)``,
``migrations/006_search_and_paging.sql``), and the text they search is split into words the same way (FTS5's
``unicode61`` tokenizer; PostgreSQL's parser after ASCII punctuation is turned into spaces).
"""

from __future__ import annotations

import re

# Letters and digits in any script (Python's \\w without the underscore, which both engines treat as a separator).
_WORD = re.compile(r"[^\W_]+")
# A 200-character query holds at most 100 words; more than this many is no longer a search anyone types.
MAX_TERMS = 32


def search_terms(text: str) -> list[str]:
    """The distinct words of ``text``, lowercased, in order, at most ``MAX_TERMS``; empty when it has none."""
    terms: list[str] = []
    for word in _WORD.findall(text.lower()):
        if word not in terms:
            terms.append(word)
    return terms[:MAX_TERMS]
