"""Turn stored history into the alternating user/assistant turns a model accepts, within a token budget.

Bedrock's Converse rules: the first and last turns are the user's, roles alternate, and no text block is empty.
Stored history can break all three (a failed turn leaves an empty assistant row; a retried send leaves two user
rows in a row), so empty messages are dropped and neighbours with the same role are merged. The newest turns are
kept first until the budget is spent; the current message is always kept, and it is included exactly once because
it is already the newest stored row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.model import estimate_tokens
from services.store import Message


def build_turns(history: Sequence[Message], token_budget: int) -> list[dict[str, Any]]:
    """Converse ``messages`` from stored history (oldest first, ending with the current user message)."""
    merged = _merge_roles([m for m in history if m.content.strip()])
    kept: list[tuple[str, str]] = []
    spent = 0
    for role, text in reversed(merged):
        cost = estimate_tokens(text)
        if kept and spent + cost > token_budget:
            break
        kept.append((role, text))
        spent += cost
    kept.reverse()
    while kept and kept[0][0] != "user":
        kept.pop(0)
    return [{"role": role, "content": [{"text": text}]} for role, text in kept]


def _merge_roles(messages: Sequence[Message]) -> list[tuple[str, str]]:
    merged: list[tuple[str, str]] = []
    for message in messages:
        if merged and merged[-1][0] == message.role:
            merged[-1] = (message.role, merged[-1][1] + "\n\n" + message.content)
        else:
            merged.append((message.role, message.content))
    return merged
