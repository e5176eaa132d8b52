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
    # Messages are kept before they are merged: user messages merged across empty answers (turns stopped with nothing
    # shown, or failed before any text) would otherwise make one block as old as the user liked, kept whole.
    kept: list[Message] = []
    spent = 0
    for message in reversed([m for m in history if m.content.strip()]):
        cost = estimate_tokens(message.content)
        if kept and spent + cost > token_budget:
            break
        kept.append(message)
        spent += cost
    kept.reverse()
    merged = _merge_roles(kept)
    while merged and merged[0][0] != "user":
        merged.pop(0)
    return [{"role": role, "content": [{"text": text}]} for role, text in merged]


def _merge_roles(messages: Sequence[Message]) -> list[tuple[str, str]]:
    merged: list[tuple[str, str]] = []
    for message in messages:
        if merged and merged[-1][0] == message.role:
            merged[-1] = (message.role, merged[-1][1] + "\n\n" + message.content)
        else:
            merged.append((message.role, message.content))
    return merged
