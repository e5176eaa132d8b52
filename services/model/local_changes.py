"""The changes the built-in local responder recognises in a message, and the tool calls it makes for them. Still no
language model: fixed rules over words (``local.py``); docs/assistant.md has the table of what they understand.

A change is two tool calls, as a model makes them: the domain's list tool, to find the record the message names (by
its number, "INV-1043" or "invoice 1043", else by its name, title or client, whole or every word the message names it
by), then ``update_<one>`` or ``delete_<one>`` with that record's id. Those only prepare a pending action
(``services/agents/actions.py``). The intents are tried in this order: delete, a status (a change verb with a
vocabulary word, or a verb that names one), a new date and/or time. A question or a message with a negation ("don't
delete invoice 1042", "mark it as not paid") is never a change: the rules would read it backwards, so they read it
as no change at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Literal

from services.domains import Column, Domain

DELETE_VERBS = frozenset({"delete", "remove", "erase"})
NEGATIONS = frozenset({"not", "don", "dont", "never", "no"})  # "don't" is "don" and "t" to the word pattern
_PREPOSITIONS = frozenset({"from", "in", "on", "of"})
CHANGE_VERBS = frozenset({"mark", "set", "change", "update", "make", "move", "put", "switch"})
DATE_VERBS = frozenset({"reschedule", "postpone", "move"})
STATUS_VERBS = {
    "cancel": "cancelled", "complete": "completed", "finish": "completed", "pause": "paused", "publish": "published",
    "hide": "hidden", "accept": "accepted", "reject": "rejected", "confirm": "confirmed", "abandon": "abandoned",
    "activate": "active",
}
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
# Words that never name a record: they say what to do, or when.
_FILLER = frozenset(
    "the my our this that please can could would you for and with from its all new date time status now next week "
    "today tomorrow due".split()
)
# Said with a change verb, these name a status word: "mark the task as done".
ALIASES = {"done": "completed", "finished": "completed", "canceled": "cancelled"}
QUESTION = re.compile(r"^\s*(what|which|who|when|where|how|do|does|did|is|are|any|have|has)\b.*\?\s*$", re.S)
_ISO_DATE = re.compile(r"\b(\d{4}-\d{2}-\d{2})\b")
_CLOCK = re.compile(r"\b([01]?\d|2[0-3]):([0-5]\d)(?:\s*([ap])\.?m\b\.?)?")
_HOUR = re.compile(r"\b(1[0-2]|0?[1-9])\s*([ap])\.?m\b")
# "June 3", "Jun 3rd, 2027", "3 June", "the 3rd of June": a month's name, or its first three letters or more.
_DAY, _YEAR = r"(?P<day>\d{1,2})(?:st|nd|rd|th)?", r"(?:,?\s+(?P<year>\d{4}))?\b"
_MONTH_DAY = re.compile(rf"\b(?P<month>[a-z]{{3,9}})\.?\s+{_DAY}{_YEAR}")
_DAY_MONTH = re.compile(rf"\b{_DAY}\s+(?:of\s+)?(?P<month>[a-z]{{3,9}}){_YEAR}")
# A record number: INV-1043, inv1043, #1043, 1043 (three digits or more, not inside a date or another word).
_NUMBER = re.compile(r"(?<![\w-])([a-z]+-?)?#?(\d{3,})(?![\w-])")


@dataclass(frozen=True, slots=True)
class Intent:
    kind: Literal["update", "delete"]
    changes: dict[str, Any] = field(default_factory=dict)
    question: str = ""  # what to ask first, when the message lacks something (the new date)


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    arguments: dict[str, Any]


def intent(domain: Domain, text: str, today: date) -> Intent | None:
    """The change ``text`` asks for in ``domain``, or None when it asks for none."""
    lowered = text.lower()
    if QUESTION.match(lowered):
        return None
    words = set(re.findall(r"[a-z]+", lowered))
    if words & NEGATIONS:
        return None  # "don't delete ...", "mark it as not paid": asking for no change, or one these rules cannot read
    if _deletes_record(domain, lowered):
        return Intent("delete")
    if words & DELETE_VERBS:
        return None  # "remove the note from invoice INV-1043" takes something off a record, not the record
    vocabulary = status_column(domain)
    status = _vocabulary_word(vocabulary, lowered) if vocabulary and words & CHANGE_VERBS else None
    if status is None and vocabulary:
        named = [STATUS_VERBS[word] for word in sorted(words & set(STATUS_VERBS))]
        status = next((value for value in named if value in vocabulary.enum), None)
    if status is not None and vocabulary is not None:
        return Intent("update", {vocabulary.name: status})
    if not words & (DATE_VERBS | CHANGE_VERBS):
        return None
    return _new_date(domain, lowered, today)


def _deletes_record(domain: Domain, lowered: str) -> bool:
    """A delete verb whose object is the record itself: its kind or its number within the next four words, with no
    "from", "in", "on" or "of" before it ("delete invoice 1042", "remove the Oakridge project")."""
    words = re.findall(r"[a-z0-9#-]+", lowered)
    for at, word in enumerate(words):
        if word in DELETE_VERBS:
            for following in words[at + 1:at + 5]:
                if following in _PREPOSITIONS:
                    break
                if following in domain.keywords or _NUMBER.fullmatch(following):
                    return True
    return False


def list_call(domain: Domain, text: str) -> Call:
    """The list call that finds the record: by its number where the list filters on it, else the first page."""
    arguments: dict[str, Any] = {"limit": 100}
    prefixed = [written for written, _ in numbers_in(text) if written]
    if len(prefixed) == 1 and domain.label in domain.filters:
        arguments[domain.label] = prefixed[0]
    return Call(f"list_{domain.table}", arguments)


def change_call(domain: Domain, wanted: Intent, rows: list[dict[str, Any]], text: str, today: date) -> Call | str:
    """The update or delete of the one row ``text`` names, or what to tell the user instead (nothing changes)."""
    found = matching(domain, rows, text)
    if len(found) > 1:
        names = " or ".join(_described(domain, row) for row in found[:10])
        return f"Several {domain.table} match: {names}. Which one do you mean? Nothing was changed."
    if not found:
        known = f" among your {domain.table} ({', '.join(_name(domain, r) for r in rows[:10])})" if rows else ""
        return f"I couldn't find {_reference(domain, text)}{known}, so nothing was changed."
    row = found[0]
    if wanted.kind == "delete":
        return Call(f"delete_{domain.singular}", {"id": row["id"]})
    changes = _with_payment(domain, row, wanted.changes, today)
    if all(row.get(name) == value for name, value in changes.items()):
        held = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in wanted.changes.items())
        return f"The {domain.singular} {_name(domain, row)} already has {held}, so nothing needs changing."
    return Call(f"update_{domain.singular}", {"id": row["id"], "changes": changes})


def matching(domain: Domain, rows: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The rows ``text`` names: by number when it gives one; else those whose name, title or client it holds whole;
    else those whose name, title or client holds every distinctive word of it. Sharing only some of those words is
    no match: "Maria Gonzalez" does not name Maria Lopez, and a change is only prepared for the record named."""
    lowered = text.lower()
    names = naming_columns(domain)
    numbers = {digits for _, digits in numbers_in(lowered)}
    if numbers:
        return [r for r in rows if any(re.sub(r"\D", "", str(r.get(n) or "")) in numbers for n in names)]
    whole = [r for r in rows if any(_holds(lowered, r.get(n)) for n in names)]
    if whole:
        return whole
    wanted = distinctive_words(domain, without_times(lowered))
    if not wanted:
        return []
    return [r for r in rows
            if wanted <= set(re.findall(r"[a-z0-9]+", " ".join(str(r.get(n) or "") for n in names).lower()))]


def _new_date(domain: Domain, lowered: str, today: date) -> Intent | None:
    """A move of the domain's date (the one the message names, "end date", "due"; else its first required one, else
    its first) and time to those ``lowered`` gives; a question when it asks to reschedule without saying when; None
    when it asks for no new date."""
    words = set(re.findall(r"[a-z]+", lowered))
    dates = [c for c in domain.columns if c.type == "date"]
    named = [c for c in dates if words & (set(c.name.split("_")) - {"date"})]
    day_column = next(iter(named), next((c for c in dates if c.required), next(iter(dates), None)))
    if day_column is None:
        return None
    time_column = next((c for c in domain.columns if c.type == "time"), None)
    changes: dict[str, Any] = {}
    day = find_date(lowered, today)
    if day is not None:
        changes[day_column.name] = day.isoformat()
    clock = find_time(lowered)
    if clock is not None and time_column is not None:
        changes[time_column.name] = clock
    if changes:
        return Intent("update", changes)
    if not words & DATE_VERBS:
        return None
    ask = (f"Which date should the {domain.singular} move to? For example: tomorrow, Friday, June 3 or "
           f"{(today + timedelta(days=7)).isoformat()}.")
    return Intent("update", question=ask)


def find_date(lowered: str, today: date) -> date | None:
    """The first date ``lowered`` gives: YYYY-MM-DD, today, tomorrow, a weekday (the next one) or a month and day
    (this year's, or next year's once it has passed)."""
    if match := _ISO_DATE.search(lowered):
        try:
            return date.fromisoformat(match.group(1))
        except ValueError:
            return None
    words = re.findall(r"[a-z]+", lowered)
    if "today" in words:
        return today
    if "tomorrow" in words:
        return today + timedelta(days=1)
    for index, name in enumerate(WEEKDAYS):
        if name in words:
            return today + timedelta(days=(index - today.weekday() - 1) % 7 + 1)
    return next((day for match in _month_days(lowered) if (day := _calendar_day(match, today))), None)


def _month_days(lowered: str) -> list[re.Match[str]]:
    """Each "June 3" or "3 June" in ``lowered`` whose word is a month's name."""
    found = [*_MONTH_DAY.finditer(lowered), *_DAY_MONTH.finditer(lowered)]
    return sorted((m for m in found if _month(m["month"])), key=lambda m: m.start())


def _month(word: str) -> int | None:
    if len(word) < 3:
        return None
    return next((number for number, name in enumerate(MONTHS, 1) if name.startswith(word)), None)


def _calendar_day(match: re.Match[str], today: date) -> date | None:
    """The day a month-and-day names: in its year if given, else the next one (this year's, or next year's)."""
    month, day = _month(match["month"]), int(match["day"])
    assert month is not None
    try:
        if match["year"]:
            return date(int(match["year"]), month, day)
        found = date(today.year, month, day)
        return found if found >= today else date(today.year + 1, month, day)
    except ValueError:  # June 31
        return None


def find_time(lowered: str) -> str | None:
    """The first time ``lowered`` gives, as HH:MM: 14:30, 2:30 pm, 2pm."""
    hour, minute, half = None, 0, None
    if match := _CLOCK.search(lowered):
        hour, minute, half = int(match.group(1)), int(match.group(2)), match.group(3)
    elif match := _HOUR.search(lowered):
        hour, half = int(match.group(1)), match.group(2)
    if hour is None or (half and hour > 12):
        return None
    if half:
        hour = hour % 12 + (12 if half == "p" else 0)
    return f"{hour:02d}:{minute:02d}"


def status_column(domain: Domain) -> Column | None:
    """The column a status word sets: ``status``, or a domain's only vocabulary (a contact's type)."""
    return domain.column("status") or next((c for c in domain.columns if c.enum), None)


def _vocabulary_word(column: Column, lowered: str) -> str | None:
    """The one word of ``column``'s vocabulary (or an alias of one) in ``lowered``; of several, the one after "as" or
    "to"."""
    words = {value: value for value in column.enum} | {a: v for a, v in ALIASES.items() if v in column.enum}
    found = {value for word, value in words.items() if re.search(rf"\b{_phrase(word)}\b", lowered)}
    if len(found) > 1:
        found = {value for word, value in words.items()
                 if re.search(rf"\b(as|to)\s+(an?\s+)?{_phrase(word)}\b", lowered)}
    return found.pop() if len(found) == 1 else None


def _phrase(value: str) -> str:
    return re.escape(value).replace("_", "[ _-]")  # in_progress: "in progress" too


def _with_payment(domain: Domain, row: dict[str, Any], changes: dict[str, Any], today: date) -> dict[str, Any]:
    """Marking an invoice paid settles it, as a bookkeeper would: paid in full, today unless a date is recorded."""
    if changes.get("status") != "paid" or not all(domain.column(c) for c in ("paid_date", "amount_paid")):
        return changes
    return {**changes, "paid_date": row.get("paid_date") or today.isoformat(), "amount_paid": row.get("total_amount")}


def naming_columns(domain: Domain) -> list[str]:
    """The columns a user names a record by: its required text columns (number, name, client) and its title."""
    names = [c.name for c in domain.columns if c.required and c.type == "text"]
    return names + ["title"] * (domain.column("title") is not None and "title" not in names)


def _name(domain: Domain, row: dict[str, Any]) -> str:
    return str(row.get(domain.label) or row.get("id"))


def _described(domain: Domain, row: dict[str, Any]) -> str:
    """A record's name and what tells it apart from its namesakes: "Ben Carter (Exterior estimate, scheduled)"."""
    more = [str(row[c]) for c in domain.shown if c != domain.label and row.get(c) not in (None, "")][:3]
    return f"{_name(domain, row)} ({', '.join(more)})" if more else _name(domain, row)


def _reference(domain: Domain, text: str) -> str:
    """How the user named the record they meant, for "I couldn't find ...": its number, or "that invoice"."""
    numbers = numbers_in(text)
    return f"{domain.singular} {numbers[0][0] or numbers[0][1]}" if numbers else f"that {domain.singular}"


def _holds(lowered: str, value: Any) -> bool:
    if not isinstance(value, str) or len(value) < 3:
        return False
    return re.search(rf"\b{re.escape(value.lower())}\b", lowered) is not None


def distinctive_words(domain: Domain, lowered: str) -> set[str]:
    """The words of ``lowered`` that can only name a record: not a verb, a routing word, a status or a date."""
    vocabulary = status_column(domain)
    common = (_FILLER | DELETE_VERBS | CHANGE_VERBS | DATE_VERBS | set(STATUS_VERBS) | set(WEEKDAYS) | set(MONTHS)
              | set(domain.keywords))
    if vocabulary is not None:
        common |= {part for value in vocabulary.enum for part in value.split("_")}
    words = re.findall(r"[a-z0-9]+", re.sub(r"['\u2019]s\b", "", lowered))
    return {w for w in words if len(w) >= 3 and w not in common}


def numbers_in(text: str) -> list[tuple[str, str]]:
    """The record numbers ``text`` gives: each as written with its prefix ("INV-1043", or "" when bare) and its
    digits."""
    return [(f"{p.rstrip('-').upper()}-{d}" if p else "", d) for p, d in _NUMBER.findall(without_times(text))]


def without_times(text: str) -> str:
    """``text``, lowered, without its dates and times, whose digits are no record number and whose words name no
    record."""
    lowered = _HOUR.sub(" ", _CLOCK.sub(" ", _ISO_DATE.sub(" ", text.lower())))
    for match in reversed(_month_days(lowered)):
        lowered = lowered[:match.start()] + " " + lowered[match.end():]
    return lowered
