"""What a conversation search means, for both stores: the words of the user's text, each matched as a word prefix.

``GET /api/conversations?q=kitch+inv`` finds the caller's conversations whose title, or one of whose messages, holds
a word starting with "kitch" and a word starting with "inv" (case-insensitive; accents count: "Lopez" does not find
"López"). Everything else in the text separates words and is never query syntax: only words reach an engine, each
quoted (SQLite FTS5 ``"word"*``, ``services/store/sqlite/listing.py``; PostgreSQL ``'word':*``,
``migrations/008_search_folding.sql``), which keeps the search safe from injection in both.

A word is found when it is typed as it is stored, in any script, because each store folds the text it indexes and
the words it is asked for with one function: here ``search_words`` (SQLite calls it for its index, through a SQL
function the store registers), and in PostgreSQL ``canvalo_private.search_lexemes``, which folds alike (NFKC, then
lowercase by Unicode's rules, not the database's locale). An engine's own tokenizer, whose idea of a letter and of
case stops at some Unicode version or at the locale, never sees raw text: it found neither "İstanbul" nor a
Cherokee, Adlam or Osage word as typed, nor an accent typed as a combining character.
"""

from __future__ import annotations

import itertools
import unicodedata

# A 200-character query holds at most 100 words; more than this many is no longer a search anyone types.
MAX_TERMS = 32
# Longer "words" (a pasted token, a run of digits) are not searched for; PostgreSQL refuses lexemes over 2 KB.
MAX_WORD_CHARS = 100
# A text's first this many distinct words are indexed, as in PostgreSQL, whose tsvector holds at most 1 MB.
MAX_WORDS = 2000


def search_words(text: str) -> list[str]:
    """The distinct words of ``text`` in order (the first ``MAX_WORDS``), folded: NFKC (a combining accent joins its
    letter, compatibility forms become plain ones), then lowercased by Unicode's rules ("İ" gives "i̇"), then split
    into runs of letters, marks and digits (the underscore and everything else separate words)."""
    words: dict[str, None] = {}
    for word in _runs(unicodedata.normalize("NFKC", text).lower()):
        if len(word) <= MAX_WORD_CHARS:
            words.setdefault(word)
            if len(words) == MAX_WORDS:
                break
    return list(words)


def _runs(text: str) -> list[str]:
    return ["".join(run) for in_word, run in itertools.groupby(text, _in_word) if in_word]


def _in_word(char: str) -> bool:
    return unicodedata.category(char)[0] in "LMN"
