"""The run log's SSE frames, byte for byte, and how a resume picks frames out of a stored batch."""

from __future__ import annotations

from typing import Any

import pytest

from services.run_log import chunk, cut, frame, frames_after
from services.store import EventBatch


@pytest.mark.parametrize(
    ("seq", "data", "expected"),
    [
        (1, {"type": "token", "content": "Hi"}, 'id: 1\ndata: {"type":"token","content":"Hi"}\n\n'),
        (12, {"content": "two\nlines"}, 'id: 12\ndata: {"content":"two\\nlines"}\n\n'),
        (3, {"content": "caf\u00e9 \u2713"}, 'id: 3\ndata: {"content":"caf\u00e9 \u2713"}\n\n'),
        (None, {"type": "error"}, 'data: {"type":"error"}\n\n'),  # outside the run's log: no id
    ],
)
def test_a_frame_is_an_id_and_one_data_line_of_compact_json(seq: int | None, data: dict[str, Any], expected: str) -> None:
    assert frame(seq, data) == expected


def test_a_resume_takes_only_the_frames_after_its_cursor() -> None:
    frames = "".join(frame(seq, chunk("token", "supervisor", content=f"t{seq}")) for seq in range(4, 8))
    batch = EventBatch(4, 7, frames)
    assert frames_after(batch, 3) == frames
    assert frames_after(batch, 5) == frames[frames.index("id: 6\n"):]
    assert frames_after(batch, 7) == ""


def test_what_the_user_saw_is_cut_in_characters_not_bytes_or_utf16_units() -> None:
    text = "caf\u00e9 \U0001f3a8 done"
    assert cut(text, 6) == "caf\u00e9 \U0001f3a8"
    assert cut(text, None) == text
    assert cut(text, 1000) == text
