"""Hostile values in what the service sends PostgREST (a tool's filters, a search's text) mean the same on both
stores: no value changes a request's meaning, matches more than itself, or fails on one store and not the other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from services.agents.tools import run_tool, tools_for
from services.domains import BY_AGENT
from services.store import Caller

pytestmark = pytest.mark.anyio

CONTACTS = {tool.action: tool for tool in tools_for(BY_AGENT["contacts"])}

# Every reserved character of PostgREST's grammar, its wildcards, what a query string splits on, and text that
# normalizes differently (NFC "é" and NFD "e" + U+0301 are different values on both stores).
HOSTILE_NAMES = [
    "a,b", "x.y", "(p)", "p)", 'say "hi"', "back\\slash", '\\"', "50%", "5_%", "a_b", "a*b", "*", "%", "_",
    "John Smith", "a+b", "&x=1", "eq.x", "not.eq.x", "in.(a,b)", "or=(a.eq.1)", "caf\u00e9", "cafe\u0301",
    " padded ", "line\nbreak", "tab\there", "#frag", "?q", "k:v", "{a,b}", "\u202eevil", "\U0001f600" * 3,
]


async def test_a_text_filter_matches_exactly_its_own_value_on_both_stores(
    store: Any, new_caller: Callable[[], Caller]
) -> None:
    caller = new_caller()
    ids = {}
    for name in HOSTILE_NAMES:
        created = await run_tool(store, caller, CONTACTS["create"], {"name": name, "company": name})
        assert created.status == "success", (name, created.content)
        ids[name] = created.content["created"]["id"]
    for name in HOSTILE_NAMES:
        listed = await run_tool(store, caller, CONTACTS["list"], {"name": name, "limit": 100})
        assert listed.status == "success", (name, listed.content)
        assert [row["id"] for row in listed.content["rows"]] == [ids[name]], name
        both = await run_tool(store, caller, CONTACTS["list"], {"name": name, "company": name, "contact_type": "client"})
        assert [row["id"] for row in both.content["rows"]] == [ids[name]], name
    for absent in ("5%", "a%", "a?b", "a.b", "cafe", "padded", "", "x", "a", "\\", '"'):
        listed = await run_tool(store, caller, CONTACTS["list"], {"name": absent})
        assert listed.status == "success" and listed.content["rows"] == [], (absent, listed.content)



# What each search finds of "Kitchen repaint" and "Gazebo stain": its words are its first 32 distinct words, on both
# stores, however many spaces, separators or repeats the text holds.
SEARCHES = {
    "separators-first": ("! " * 32 + "kitchen", ["Kitchen repaint"]),
    "repeats-first": ("kitchen " * 33 + "gazebo", []),
    "spaces-only-between-some": ("kit-" * 40 + "rep", ["Kitchen repaint"]),
    "punctuation-only": ("*%_ \\ \"() ,.:", []),
}


@pytest.mark.parametrize("case", SEARCHES)
async def test_a_search_takes_the_same_words_on_both_stores(
    store: Any, new_caller: Callable[[], Caller], case: str
) -> None:
    text, titles = SEARCHES[case]
    caller = new_caller()
    for title in ("Kitchen repaint", "Gazebo stain"):
        await store.create_conversation(caller, title)
    found = await store.list_conversations(caller, 10, 0, search=text)
    assert ([c.title for c in found.conversations], found.total) == (titles, len(titles))


@pytest.mark.parametrize("char", ["x", "%", "\U0001f600"], ids=["ascii", "percent-encoded", "four-byte"])
async def test_the_longest_filters_a_tool_takes_answer_alike_on_both_stores(
    store: Any, new_caller: Callable[[], Caller], char: str
) -> None:
    """Every text filter at its longest, in the character that percent-encodes longest: the request stays inside a
    gateway's URL bound (the fake refuses what the smallest would), so both stores answer, and alike. A longer value
    is refused to the model on both."""
    caller = new_caller()
    schema = CONTACTS["list"].schema["properties"]
    longest = {name: char * schema[name]["maxLength"] for name in ("name", "company")}
    created = await run_tool(store, caller, CONTACTS["create"], longest)
    assert created.status == "success", created.content
    listed = await run_tool(store, caller, CONTACTS["list"], {**longest, "contact_type": "client", "limit": 100})
    assert listed.status == "success", listed.content
    assert [row["id"] for row in listed.content["rows"]] == [created.content["created"]["id"]]
    too_long = await run_tool(store, caller, CONTACTS["list"], {"name": char * (schema["name"]["maxLength"] + 1)})
    assert too_long.status == "error" and "at most" in too_long.content["error"], too_long.content


def _longest(schema: dict[str, Any]) -> Any:
    """The argument that makes the longest URL a filter of this schema can: its longest, in four-byte characters."""
    if "enum" in schema:
        return max(schema["enum"], key=len)
    kinds = schema["type"]
    if "integer" in kinds:
        return schema["maximum"]
    samples = {"uuid": "0" * 8 + "-0000-4000-8000-" + "0" * 12, "date": "2026-12-31"}
    return samples.get(schema.get("format", ""), "\U0001f600" * schema["maxLength"])


@pytest.mark.parametrize("agent", sorted(BY_AGENT))
async def test_every_list_with_every_filter_at_its_longest_is_answered(
    store: Any, new_caller: Callable[[], Caller], agent: str
) -> None:
    tool = next(t for t in tools_for(BY_AGENT[agent]) if t.action == "list")
    arguments = {name: _longest(schema) for name, schema in tool.schema["properties"].items()}
    listed = await run_tool(store, new_caller(), tool, arguments)
    assert listed.status == "success" and listed.content["rows"] == [], listed.content


@pytest.mark.parametrize("store", ["supabase"], indirect=True)  # SQLite has no such grammar
async def test_a_quoted_logic_tree_value_matches_exactly_itself(
    store: Any, new_caller: Callable[[], Caller]
) -> None:
    """``tree_value`` quotes a value for ``or=(...)`` as PostgREST's grammar reads it back: each hostile name, in a
    tree beside another condition, finds its own contact and nothing else."""
    from services.store.postgrest.params import tree_value

    caller = new_caller()
    ids = {}
    for name in HOSTILE_NAMES:
        created = await run_tool(store, caller, CONTACTS["create"], {"name": name})
        ids[name] = created.content["created"]["id"]
    for name in HOSTILE_NAMES:
        params = {"select": "id", "user_id": f"eq.{caller.user_id}",
                  "or": f"(name.eq.{tree_value(name)},and(name.eq.{tree_value(name + ')')},id.is.null))"}
        rows = (await store._rest.select(caller, "contacts", params)).rows
        assert [row["id"] for row in rows] == [ids[name]], name
