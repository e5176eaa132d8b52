"""The built-in local responder: a deterministic stand-in for a language model. It is NOT an LLM.

It lets the whole service run, and be tested, with no cloud account: it answers through the same ``ChatModel``
interface, the same agent loop and the same stream as Bedrock does, following fixed rules (docs/assistant.md): offered
the hand-off tool, it routes by the domains' keywords (one match is handed over, several get a clarifying question,
none a greeting); offered a specialist's tools, it calls the list tool with the vocabulary words it finds as
filters, or, asked for a change, makes the calls ``local_changes.py`` describes; given a tool result, it writes its
answer from the rows (a change waiting for confirmation is said to wait: it never changes anything itself).

Replies go out word by word, ``token_delay`` seconds apart, so streaming is visible.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import date, datetime, timezone
from typing import Any

import anyio

from services.domains import DOMAINS, Domain
from services.model import ModelEvent, ModelRequest, Stop, TextDelta, ToolUse, Usage, estimate_tokens, prompt_tokens
from services.model import local_changes as changes
from services.model import local_reading as reading
from settings import LOCAL_MODEL_ID

DISCLAIMER = "(Canvalo's built-in local responder, not an AI model.)"
HANDOFF_TOOL = "transfer_to_specialist"


class LocalModel:
    provider = "local"
    model_id = LOCAL_MODEL_ID
    is_llm = False
    configured = True

    def __init__(self, token_delay: float) -> None:
        self._token_delay = token_delay
        self._keywords = {domain.agent_type: domain.keywords for domain in DOMAINS}
        self._lists = {f"list_{domain.table}": domain for domain in DOMAINS}

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        last = request.messages[-1] if request.messages else {"content": []}
        tool_names = [t["toolSpec"]["name"] for t in request.tools]
        answer: str | changes.Call
        if HANDOFF_TOOL in tool_names and _tool_result(last) is None:
            agents = self.route(_text_of(last))
            answer = changes.Call(HANDOFF_TOOL, {"agent": agents[0]}) if len(agents) == 1 else (
                clarify(agents) if agents else reply_to(_text_of(last)))
        elif request.tools:
            answer = self._specialist(request)
        else:
            answer = reply_to(_text_of(last))
        events = self._say(answer, request) if isinstance(answer, str) else _call(answer, request)
        async for event in events:
            yield event

    def _specialist(self, request: ModelRequest) -> str | changes.Call:
        """A specialist's next step: a list call, the change the message asks for once the rows are in, or the
        answer written from a tool's result."""
        spec = request.tools[0]["toolSpec"]
        domain = self._lists.get(spec["name"])
        text = _user_text(request.messages)
        wanted = changes.intent(domain, text, _today()) if domain is not None else None
        result = _tool_result(request.messages[-1])
        if result is None:
            if refusal := reading.cannot(domain, text) or reading.cannot_change(domain, text, wanted is not None):
                return f"{refusal} {DISCLAIMER}"
            if wanted is None or domain is None:
                return changes.Call(spec["name"], _list_arguments(spec, domain, text))
            return f"{wanted.question} {DISCLAIMER}" if wanted.question else changes.list_call(domain, text)
        used = _last_use(request.messages)
        found = result.get("rows") if used.get("name") == spec["name"] else None
        if wanted is not None and domain is not None and isinstance(found, list):
            step = changes.change_call(domain, wanted, found, text, _today())
            return step if isinstance(step, changes.Call) else f"{step} {DISCLAIMER}"
        return describe_result(result, used.get("input"), domain, text)

    def route(self, text: str) -> list[str]:
        """The agents whose keywords appear in ``text``, in declaration order; else those a word misspells by one
        letter ("invocies"); an invoice's number ("INV-1042") names invoices."""
        words = {word.rstrip("-") for word in re.findall(r"[a-z][a-z_-]*", text.lower())}
        exact = [agent for agent, keywords in self._keywords.items() if words & set(keywords)]
        if exact:
            return exact
        return [agent for agent, keywords in self._keywords.items()
                if any(_misspells(word, keyword) for word in words for keyword in keywords)]

    async def _say(self, reply: str, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        for index, word in enumerate(re.findall(r"\S+\s*", reply)):
            if index and self._token_delay:
                await anyio.sleep(self._token_delay)
            yield TextDelta(word)
        yield Stop("end_turn")
        yield Usage(prompt_tokens(request), estimate_tokens(reply))


async def _call(call: changes.Call, request: ModelRequest) -> AsyncIterator[ModelEvent]:
    yield ToolUse(tool_use_id=f"local-{len(request.messages)}", name=call.name, input=call.arguments)
    yield Stop("tool_use")
    yield Usage(prompt_tokens(request), estimate_tokens(json.dumps(call.arguments)))


_AREAS = "invoices, appointments, projects, proposals, contacts, reviews, campaigns, tasks and goals"
_WHAT_ARE_YOU = re.compile(r"\b(ai|a\.i|llm|gpt|chatgpt|claude|gemini|model|bot|robot|human|person|real|"
                           r"artificial|intelligence|who are you|what are you)\b")


def reply_to(text: str) -> str:
    """The rule-based answer to a message no specialist owns."""
    lowered = text.lower()
    if _WHAT_ARE_YOU.search(lowered):
        opening = (f"I'm Canvalo's built-in local responder: a fixed set of rules, not an AI model or an LLM. I match "
                   f"words in your message to your {_AREAS}, list them from your own records, and prepare simple "
                   "changes (a status, a date, a delete) for you to confirm.")
    elif refusal := reading.cannot(None, text):
        opening = refusal
    elif re.search(r"\b(hi|hello|hey|good (morning|afternoon|evening))\b", lowered):
        opening = f"Hello! I can help with your {_AREAS}."
    elif re.search(r"\b(thanks|thank you|thx|cheers)\b", lowered):
        opening = f"You're welcome. Ask me about your {_AREAS} any time."
    elif "help" in lowered:
        opening = f"I can look up and update your business records: {_AREAS}."
    else:
        opening = (f"I couldn't tell which of your records that is about. I can help with your {_AREAS}: name the "
                   "kind, for example \"What invoices do I have?\" or \"Show my contacts\".")
    return f"{opening} {DISCLAIMER}"


def clarify(agents: list[str]) -> str:
    """The question asked when several domains match; ``agents`` has at least two."""
    options = ", ".join(agents[:-1]) + f" or {agents[-1]}"
    return f"Do you mean your {options}? {DISCLAIMER}"


def describe_result(result: dict[str, Any], arguments: dict[str, Any] | None = None,
                    domain: Domain | None = None, text: str = "") -> str:
    """Write an answer from a tool result, the way a model would summarise the rows it was given (a list's filters
    are said: "with status overdue"; so is what the question narrowed them by, ``local_reading.py``)."""
    if result.get("status") == "error":
        return f"I couldn't get that information: {result.get('error', 'the lookup failed')} {DISCLAIMER}"
    if result.get("status") == "confirmation_required":
        return f"This needs your confirmation: {result.get('summary', '')} Press Confirm to go ahead. {DISCLAIMER}"
    rows = result.get("rows")
    table = str(result.get("table", "records"))
    if not isinstance(rows, list):
        return f"Done. {DISCLAIMER}"
    filters = [f"with {name.replace('_', ' ')} {value}" for name, value in (arguments or {}).items()
               if name != "limit" and value is not None]
    read = len(rows)
    if domain is not None and text:
        narrowed = reading.narrow(domain, rows, text, _today())
        rows, filters = narrowed.rows, filters + narrowed.said
    which = f" {' and '.join(filters)}" if filters else ""
    cut = (f" (I could read only the first {read} of your {result.get('found')} {table}; ask for fewer or filter "
           "them by status)") if result.get("truncated") and len(rows) != read else ""
    if not rows:
        return f"You don't have any {table}{which or ' yet'}{cut}. {DISCLAIMER}"
    one = domain.singular if domain is not None else table.rstrip("s")
    heading = f"You have {len(rows)} {table if len(rows) != 1 else one}{which}{cut}:"
    if result.get("truncated") and not cut:  # services/agents/results.py cut the list to what a tool result holds
        heading = (f"Here are the first {len(rows)} of the {result.get('found')} {table}{which} I found; the others "
                   "did not fit in one answer, so ask for fewer or filter them:")
    lines = [heading] + [f"- {_summarise_row(row, domain)}" for row in rows]
    together = reading.total(domain, rows, text) if domain is not None else ""
    return "\n".join(lines + [together] * bool(together)) + f"\n{DISCLAIMER}"


def _summarise_row(row: dict[str, Any], domain: Domain | None) -> str:
    """The columns the domain shows, those with a value; money and other amounts with two decimals."""
    names = domain.shown if domain is not None and domain.shown else [k for k in row if k not in _NEVER_SHOWN]
    parts = []
    for name in names:
        value = row.get(name)
        if value in (None, "", []):
            continue
        column = domain.column(name) if domain is not None else None
        if column is not None and column.type == "number" and isinstance(value, (int, float)):
            value = f"{value:.2f}"
        parts.append(f"{name.replace('_', ' ')}: {value}")
    return ", ".join(parts)


_NEVER_SHOWN = frozenset({"id", "user_id", "created_at", "updated_at", "line_items", "notes", "terms", "description"})


def _list_arguments(spec: dict[str, Any], domain: Domain | None, text: str) -> dict[str, Any]:
    """The list call for a question: its filters, and every row the list may give when the question narrows them
    further (``local_reading.py``), so a record past the first page is not missed."""
    arguments = _filters(spec, text)
    if domain is not None and reading.narrows(domain, text, _today()):
        arguments["limit"] = spec["inputSchema"]["json"]["properties"]["limit"]["maximum"]  # the tool's own bound
    return arguments


def _filters(spec: dict[str, Any], text: str) -> dict[str, Any]:
    """Vocabulary words in the message become filters: "my overdue invoices" lists status=overdue, "my suppliers"
    contact_type=supplier, "5 star reviews" rating=5."""
    lowered = text.lower()
    filters: dict[str, Any] = {}
    for name, prop in spec["inputSchema"]["json"].get("properties", {}).items():
        matches = [v for v in prop.get("enum", []) if re.search(rf"\b{re.escape(v.replace('_', ' '))}s?\b", lowered)]
        if len(matches) == 1:
            filters[name] = matches[0]
    stars = re.search(r"\b([1-5])[ -]?stars?\b", lowered)
    if stars and "rating" in spec["inputSchema"]["json"].get("properties", {}):
        filters["rating"] = int(stars.group(1))
    return filters


def _misspells(word: str, keyword: str) -> bool:
    """Whether ``word`` is ``keyword`` with one letter wrong, missing, added or two swapped (five letters or more)."""
    if min(len(word), len(keyword)) < 5 or abs(len(word) - len(keyword)) > 1 or word == keyword:
        return False
    if len(word) == len(keyword):
        wrong = [i for i, (a, b) in enumerate(zip(word, keyword)) if a != b]
        return len(wrong) == 1 or (len(wrong) == 2 and wrong[1] == wrong[0] + 1
                                   and word[wrong[0]] == keyword[wrong[1]] and word[wrong[1]] == keyword[wrong[0]])
    short, long = sorted((word, keyword), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def _text_of(message: dict[str, Any]) -> str:
    return " ".join(block["text"] for block in message.get("content", []) if "text" in block)


def _user_text(messages: list[dict[str, Any]]) -> str:
    """What the user said last: the latest user turn with text (tool results come back as user turns too)."""
    return next((_text_of(m) for m in reversed(messages) if m.get("role") == "user" and _text_of(m)), "")


def _last_use(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest tool call the model made, as the agent loop sent it back: ``{"name", "input", ...}``."""
    for message in reversed(messages):
        uses = [block["toolUse"] for block in message.get("content", []) if "toolUse" in block]
        if uses:
            return dict(uses[-1])
    return {}


def _tool_result(message: dict[str, Any]) -> dict[str, Any] | None:
    for block in message.get("content", []):
        if "toolResult" in block:
            result = block["toolResult"]
            payload: dict[str, Any] = {"status": result.get("status", "success")}
            for item in result.get("content", []):
                payload.update(item.get("json", {}))
            return payload
    return None


def _today() -> date:
    """Today in UTC, as the stores keep dates (a server's local zone would make "today" differ between workers)."""
    return datetime.now(timezone.utc).date()
