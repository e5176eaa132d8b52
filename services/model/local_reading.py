"""What the built-in local responder reads in a question besides a status word, and what it says it cannot do. Still
no language model: fixed rules over words (``local.py``); docs/assistant.md has the list.

A question narrows the rows the list tool returned, and the answer says by what: a record's number ("invoice 1043",
"INV-1043"), who or what it is for ("projects for Maria", "appointments with Ben Carter", "Maria's invoices": every
word must be in the record's name, client or other text it shows), a day ("appointments tomorrow", "tasks due
Friday", "on 2026-06-03"; the domain's own date, or the one the message names), "unpaid" or "owed" for invoices
(neither paid nor cancelled). "total", "how much" or "owed" add up the amounts of the rows shown. A narrowing that
keeps nothing says so ("You don't have any projects for maria"): the rows are never shown as matching when they do
not. What the rules cannot do is said, never guessed at: adding a record, and a follow-up that names no record ("mark
it as paid", "the second one"), since the responder does not read earlier messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from services.domains import DOMAINS, Domain
from services.model import local_changes as changes

CREATE_VERBS = re.compile(r"\b(add|create|book|schedule an?)\b")
# Words that point back at an earlier answer instead of naming a record.
REFERENCES = re.compile(r"\b(it|them|those|these|that one|this one|the (first|second|third|fourth|fifth|last|other) "
                        r"(one|ones)?)\b")
ORDINALS = re.compile(r"^\s*(the\s+)?(first|second|third|fourth|fifth|last|other)(\s+one)?\s*[.!?]*\s*$")
UNPAID = frozenset({"unpaid", "outstanding", "owed", "owing", "open"})
SETTLED = ("paid", "cancelled")
TOTALS = frozenset({"total", "totals", "sum", "owed", "owing", "outstanding", "altogether"})
# Words after "for", "with", ... that name no record: time, quantity and question words.
_NOT_NAMES = frozenset(
    "the my our me a an this that these those next last week weeks month months year years day days today tomorrow "
    "yesterday now all any every each and or is are was were do does did have has due it them one ones please "
    "soon upcoming coming time what which who how many much".split()
)
_REPLIES = frozenset({"reply", "respond"})
_MANY = re.compile(r"\b(?:all|every|each)\s+(?:of\s+)?(?:my\s+|the\s+|your\s+)?(?P<what>[a-z]+)|\beverything\b")
_ASKING = frozenset(
    "show list give tell find see view get display when where status details detail info information about "
    "there have got open".split()
)
_NAMED_BY = re.compile(r"\b(?:for|with|from|by|named|called|about)\s+([^?.!,;]+)")


@dataclass(frozen=True, slots=True)
class Narrowed:
    rows: list[dict[str, Any]]
    said: list[str]  # how the rows were narrowed, in words: "for ben carter", "on 2026-06-03"


def narrows(domain: Domain, text: str, today: date) -> bool:
    """Whether ``text`` asks for only some rows (so the list must be read whole, 100 rows, not the first page)."""
    probe = narrow(domain, [], text, today)
    return bool(probe.said or _named_plainly(domain, text.lower()))


def narrow(domain: Domain, rows: list[dict[str, Any]], text: str, today: date) -> Narrowed:
    """The rows ``text`` asks about, and what it asked in words; all of them when it asks nothing more."""
    lowered, said = text.lower(), []
    numbers = {digits for _, digits in changes.numbers_in(lowered)}
    if numbers:
        names = changes.naming_columns(domain)
        rows = [r for r in rows if any(re.sub(r"\D", "", str(r.get(n) or "")) in numbers for n in names)]
        said.append(f"numbered {', '.join(sorted(numbers))}")
    if domain.agent_type == "invoices" and set(re.findall(r"[a-z]+", lowered)) & UNPAID:
        rows = [r for r in rows if r.get("status") not in SETTLED]
        said.append("unpaid (not paid or cancelled)")
    if (days := _days_asked(domain, lowered, today)) is not None:
        column, first, last = days
        rows = [r for r in rows if first.isoformat() <= str(r.get(column) or "") <= last.isoformat()]
        span = first.isoformat() if first == last else f"from {first.isoformat()} to {last.isoformat()}"
        said.append(f"with {column.replace('_', ' ')} {span}")
    if words := _named(domain, lowered):
        rows = [r for r in rows if words <= _words_of(domain, r)]
        said.append(f"for {' '.join(sorted(words, key=lowered.find))}")
    elif (words := _named_plainly(domain, lowered)) and (kept := [r for r in rows if words <= _words_of(domain, r)]):
        rows = kept  # "the Oakridge project": only when some record has every such word, since any word may be one
        said.append(f"named {' '.join(sorted(words, key=lowered.find))}")
    return Narrowed(rows, said)


def total(domain: Domain, rows: list[dict[str, Any]], text: str) -> str:
    """"Together: ..." for the amounts of ``rows`` when ``text`` asks for a total; else ""."""
    if not set(re.findall(r"[a-z]+", text.lower())) & TOTALS and "how much" not in text.lower():
        return ""
    amounts = [c.name for c in domain.columns if c.type == "number" and c.name in domain.shown]
    sums = {name: sum(float(r.get(name) or 0) for r in rows) for name in amounts}
    parts = [f"{name.replace('_', ' ')} {value:.2f}" for name, value in sums.items()]
    if {"total_amount", "amount_paid"} <= sums.keys():
        parts.append(f"still owed {sums['total_amount'] - sums['amount_paid']:.2f}")
    return f"Together: {', '.join(parts)}." if parts else ""


def cannot(domain: Domain | None, text: str) -> str:
    """What to say instead of acting, when ``text`` asks what these rules cannot do; "" when they can try."""
    lowered = text.lower()
    kind = domain.singular if domain is not None else "record"
    if CREATE_VERBS.search(lowered) and not changes.QUESTION.match(lowered):
        table = domain.table if domain is not None else "records"
        return (f"I can't add anything yet: the built-in responder only lists your {table} and prepares a new "
                f"status, a new date or a delete of a {kind} that exists, for you to confirm. Add it in the app.")
    if refers_back(domain, text):
        example = example_for(domain)
        return (f"Which {kind} do you mean? I don't read earlier messages, so \"it\" or \"the second one\" tells me "
                f"nothing; name it by its number or name, for example: \"{example}\".")
    return ""


def cannot_change(domain: Domain | None, text: str, understood: bool) -> str:
    """What to say when ``text`` asks for a change these rules do not make: to many records at once ("mark all
    invoices as paid"), or one they did not understand (``understood`` false: "set the priority to urgent", "mark
    it as payed", "reply to the review"); "" otherwise."""
    lowered = text.lower()
    if domain is None or changes.QUESTION.match(lowered):
        return ""
    opening = set(re.findall(r"[a-z]+", lowered)[:3])  # an order starts with its verb: "mark ...", "can you mark ..."
    verbs = changes.CHANGE_VERBS | changes.DELETE_VERBS | changes.DATE_VERBS | set(changes.STATUS_VERBS) | _REPLIES
    if not opening & verbs:
        return ""
    many = _MANY.search(lowered)
    if many and (many["what"] in domain.keywords or many["what"] in ("them", "records", "of")):
        return (f"I change one record at a time, so each change can be checked before you confirm it: name the "
                f"{domain.singular}, for example \"{example_for(domain)}\". Nothing was changed.")
    if understood:
        return ""
    vocabulary = changes.status_column(domain)
    statuses = f" ({', '.join(vocabulary.enum)})" if vocabulary is not None else ""
    article = "an" if domain.singular[0] in "aeiou" else "a"
    return (f"I can't make that change: for {article} {domain.singular} I can only prepare a new "
            f"{vocabulary.name.replace('_', ' ') if vocabulary else 'status'}{statuses}, a new date or a delete, "
            f"for you to confirm, for example \"{example_for(domain)}\". Nothing was changed.")


def refers_back(domain: Domain | None, text: str) -> bool:
    """Whether ``text`` points back at an earlier answer ("mark it as paid", "the second one") and names no record."""
    lowered = text.lower()
    if ORDINALS.match(lowered):
        return True
    if not REFERENCES.search(lowered) or changes.numbers_in(lowered):
        return False
    return domain is None or not changes.distinctive_words(domain, changes.without_times(lowered)) - {"one", "ones"}


def example_for(domain: Domain | None) -> str:
    examples = {"invoices": "Mark invoice INV-1043 as paid", "appointments": "Cancel Ben Carter's appointment",
                "projects": "Set the Oakridge project to on hold", "proposals": "Accept the deck staining proposal",
                "contacts": "Delete the contact Summit Paint Supply", "reviews": "Hide the review from Maria Lopez",
                "campaigns": "Pause the Spring exterior special campaign",
                "tasks": "Mark the task Order primer for Oakridge as done",
                "settings": "Mark my revenue goal as completed"}
    return examples.get(domain.agent_type if domain is not None else "invoices", examples["invoices"])


def _days_asked(domain: Domain, lowered: str, today: date) -> tuple[str, date, date] | None:
    """The date column and days a question asks about: "tomorrow", "Friday", "on 2026-06-03", "due June 3", "this
    week" (today to Sunday), "next week" (Monday to Sunday)."""
    week = re.search(r"\b(this|next) week\b", lowered)
    sunday = today + timedelta(days=6 - today.weekday())
    first, last = ((today, sunday) if week[1] == "this" else (sunday + timedelta(days=1), sunday + timedelta(days=7))
                   ) if week else (changes.find_date(lowered, today),) * 2
    dates = [c for c in domain.columns if c.type == "date"]
    if first is None or last is None or not dates:
        return None
    words = set(re.findall(r"[a-z]+", lowered))
    named = [c for c in dates if words & (set(c.name.split("_")) - {"date"})]
    column = next(iter(named), next((c for c in dates if c.required), dates[0]))
    return column.name, first, last


def _named(domain: Domain, lowered: str) -> set[str]:
    """The words that say who or what the question is about: after "for", "with", "from", ..., or before "'s"."""
    phrases = [m.group(1) for m in _NAMED_BY.finditer(changes.without_times(lowered))]
    phrases += re.findall(r"\b([a-z]+)['\u2019]s\b", lowered)
    common = _NOT_NAMES | {k for d in DOMAINS for k in d.keywords} | set(changes.WEEKDAYS) | set(changes.MONTHS)
    vocabulary = {part for c in domain.columns for value in c.enum for part in value.split("_")}
    words = {w for phrase in phrases for w in re.findall(r"[a-z0-9]+", phrase)}
    return {w for w in words - common - vocabulary - set(changes.STATUS_VERBS) if len(w) >= 2 and not w.isdigit()}


def _named_plainly(domain: Domain, lowered: str) -> set[str]:
    """The words of a question that are not a question word, a routing word, a status, a date or a time."""
    words = changes.distinctive_words(domain, changes.without_times(lowered))
    return {w for w in words - _NOT_NAMES - _ASKING if not w.isdigit()}


def _words_of(domain: Domain, row: dict[str, Any]) -> set[str]:
    """The words of what names a row and the other plain text it shows (a client, a company, a review's source)."""
    shown = [c.name for c in domain.columns if c.name in domain.shown and c.type in ("text", "email") and not c.enum]
    texts = [str(row.get(name) or "") for name in {*changes.naming_columns(domain), *shown}]
    return set(re.findall(r"[a-z0-9]+", " ".join(texts).lower()))
