"""The run log's SSE frames, byte for byte, how a resume picks frames out of a stored batch, and the response's HEAD."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from services.store import EventBatch
from services.store.run_log import chunk, cut, frame, frames_after, stopped_replay
from web.sse import SSE_HEADERS, EventStreamResponse


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


# Every character some line reader breaks a line on: the SSE ones (CR, LF), the other C0 ones str.splitlines knows
# (VT, FF, FS, GS, RS), NEL and the other C1 controls, and the Unicode line and paragraph separators.
LINE_BREAKERS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029" + "".join(map(chr, range(0x80, 0xA0)))


@pytest.mark.parametrize("character", sorted(set(LINE_BREAKERS)))
def test_no_character_a_line_reader_breaks_on_goes_out_raw(character: str) -> None:
    item = chunk("token", "supervisor", content=f"a{character}b")
    encoded = frame(7, item)
    id_line, data_line, _, _ = encoded.split("\n")
    assert character not in data_line
    assert encoded.splitlines() == [id_line, data_line, ""]  # Python's line splitting too sees one data line
    assert json.loads(data_line.removeprefix("data: ")) == item  # the same text, read back by any JSON parser


def test_a_stopped_replay_encodes_the_frame_it_cuts_as_a_live_frame_is_encoded() -> None:
    token = chunk("token", "supervisor", content="one\u2028two\x85three")
    frames = [frame(1, token), frame(2, chunk("complete", "supervisor"))]
    cut_frame = stopped_replay(frames, len("one\u2028tw"))[0]
    assert cut_frame == frame(1, {**token, "content": "one\u2028tw"})
    assert "\u2028" not in cut_frame and "\\u2028" in cut_frame


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


class Endless:
    """A run that never sends anything: a viewer that follows it never ends."""

    outcome = "disconnected"

    async def next_frames(self, after: int, timeout: float) -> tuple[str, int, bool]:
        await asyncio.sleep(3600)
        return "", after, False


@pytest.mark.parametrize(("method", "completes"), [("HEAD", True), ("GET", False)])
def test_a_head_is_answered_with_the_streams_headers_alone_without_following_the_run(
    method: str, completes: bool
) -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        await asyncio.sleep(3600)  # the client stays

    async def scenario() -> bool:
        response = EventStreamResponse(Endless(), after=0, ping_interval=30, shutdown_frame="",
                                       headers=[(b"x-run-id", b"r")])
        viewing = asyncio.ensure_future(response({"type": "http", "method": method}, receive, send))
        done, _ = await asyncio.wait([viewing], timeout=0.5)
        viewing.cancel()
        return bool(done)

    assert asyncio.run(scenario()) is completes
    assert sent[0] == {"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, (b"x-run-id", b"r")]}
    if completes:
        assert sent[1:] == [{"type": "http.response.body", "body": b"", "more_body": False}]


class _Frames:
    """A run's feed that has every frame ready: one ``next_frames`` each, then the end."""

    outcome = "complete"

    def __init__(self, *frames: str) -> None:
        self._frames = list(frames)

    async def next_frames(self, after: int, timeout: float) -> tuple[str, int, bool]:
        return self._frames.pop(0), after + 1, not self._frames


def test_a_frame_no_utf8_encoder_can_write_goes_out_with_u_fffd_and_the_stream_goes_on() -> None:
    """No frame should hold a lone surrogate (the model's text is made storable where it is read), but one that does
    must not cut the viewer's stream in the middle: UTF-8 cannot encode it, so it goes as U+FFFD."""
    frames = [frame(1, chunk("token", "supervisor", content="half \ud83d")), frame(2, chunk("complete", "supervisor"))]
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message.get("body", b""))

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    response = EventStreamResponse(_Frames(*frames), after=0, ping_interval=30, shutdown_frame="")
    asyncio.run(response({"type": "http"}, receive, send))
    body = b"".join(sent).decode()  # strict UTF-8, as a browser's EventSource decodes it
    assert body == frames[0].replace("\ud83d", "\ufffd") + frames[1]
