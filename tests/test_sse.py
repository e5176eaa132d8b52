"""The SSE encoder and token merging, byte for byte."""

from __future__ import annotations

import pytest

from services.chat import chunk
from web.sse import encode, merge_tokens


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"type": "token", "content": "Hi"}, b'data: {"type":"token","content":"Hi"}\n\n'),
        ({"content": "two\nlines"}, b'data: {"content":"two\\nlines"}\n\n'),
        ({"content": "caf\u00e9 \u2713"}, 'data: {"content":"caf\u00e9 \u2713"}\n\n'.encode()),
    ],
)
def test_encode_writes_one_data_line_of_compact_json(data: dict, expected: bytes) -> None:  # type: ignore[type-arg]
    assert encode(data) == expected


def test_adjacent_tokens_of_one_agent_merge_and_others_stay() -> None:
    items = [
        chunk("token", "supervisor", content="a"),
        chunk("token", "supervisor", content="b"),
        chunk("tool_call", "invoices", tool_name="list_invoices"),
        chunk("token", "invoices", content="c"),
        chunk("token", "supervisor", content="d"),
    ]
    merged = merge_tokens(items)
    assert [(m["type"], m["agent_type"], m["content"]) for m in merged] == [
        ("token", "supervisor", "ab"),
        ("tool_call", "invoices", None),
        ("token", "invoices", "c"),
        ("token", "supervisor", "d"),
    ]
