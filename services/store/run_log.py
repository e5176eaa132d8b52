"""What a chat run's event log holds, in the form both stores write and every viewer reads.

An event is one SSE frame, ``id: <seq>\\ndata: <chunk JSON>\\n\\n``, encoded once when the run emits it (``frame``,
the only encoder): live viewers, the store and replays all send those same characters. Compact JSON never holds a
raw newline, so a frame has exactly one ``data:`` line and frames split on blank lines. Nor does it hold the
characters other line readers break on (U+2028, U+2029 and the C1 controls, NEL U+0085 among them): ``frame``
writes them as JSON escapes, which every JSON parser reads back as the same text.

Chunks keep the earlier service's six keys (``type, content, tool_name, tool_call, error, agent_type``) so an
existing frontend keeps working, and add ``run_id`` everywhere, ``message_id``/``usage``/``status`` on ``complete``
and ``code``/``retryable`` on ``error``. Every run ends with exactly one ``complete`` or ``error`` chunk.
"""

from __future__ import annotations

import json
import re
from typing import Any

from errors import AppError
from services.store import EventBatch

SUPERVISOR = "supervisor"  # the assistant's first agent, and the agent_type of chunks no specialist wrote

# A worker shows viewers at most this many events past the last one it saved (services/runs/ holds the rest back
# until a flush saves them). A run whose worker died therefore ends at the last saved id + this + 1 (``reaped_seq``):
# an id no viewer can have been shown, so an id a client holds never names other content, and its resume from any
# id it holds reaches the end. migrations/007_checked_writes.sql writes the same number.
UNSAVED_EVENTS_MAX = 1000


def reaped_seq(saved: int) -> int:
    """The id of the terminal event of a run whose worker died, ``saved`` being its last saved event."""
    return saved + UNSAVED_EVENTS_MAX + 1


# The terminal chunk of a run whose worker stopped heartbeating (crashed, killed, lost its store).
INTERRUPTED_MESSAGE = (
    "The answer was interrupted because the server generating it stopped. Please send your message again."
)


def chunk(kind: str, agent_type: str | None, **fields: Any) -> dict[str, Any]:
    """A chunk with the six keys the earlier service always sent, plus any extra ``fields``."""
    return {"type": kind, "content": None, "tool_name": None, "tool_call": None, "error": None,
            "agent_type": agent_type, **fields}


def error_chunk(error: AppError, agent_type: str | None, **fields: Any) -> dict[str, Any]:
    return chunk("error", agent_type, error=error.user_message, code=error.code, retryable=error.retryable, **fields)


def interrupted_chunk(run_id: str) -> dict[str, Any]:
    return chunk("error", SUPERVISOR, error=INTERRUPTED_MESSAGE, code="RUN_INTERRUPTED", retryable=True, run_id=run_id)


def complete_chunk(
    run_id: str, message_id: str, conversation_id: str, agent_type: str | None, *, status: str = "complete",
    usage: dict[str, Any] | None = None, stop_reason: str | None = None,
) -> dict[str, Any]:
    return chunk("complete", agent_type, run_id=run_id, message_id=message_id, conversation_id=conversation_id,
                 usage=usage, stop_reason=stop_reason, status=status)


# Characters json.dumps(ensure_ascii=False) leaves raw that some readers of the stream take as a line break: U+2028
# and U+2029 (JavaScript before ES2019, and Python's str.splitlines) and NEL U+0085 (str.splitlines, XML 1.1, some
# log and terminal tools), which is a C1 control; the other C1 controls go too, since no text needs them raw and
# terminals act on some (U+009B starts an escape sequence). Below U+0020 json.dumps escapes everything already.
_LINE_BREAKING = re.compile("[\u0080-\u009f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def frame(seq: int | None, item: dict[str, Any]) -> str:
    """One SSE event. ``seq`` None: a frame outside the run's log (the shutdown notice), so it carries no id and a
    client's ``Last-Event-ID`` stays at the last event it really got."""
    data = _LINE_BREAKING.sub(_escape, json.dumps(item, separators=(",", ":"), ensure_ascii=False, allow_nan=False))
    return f"data: {data}\n\n" if seq is None else f"id: {seq}\ndata: {data}\n\n"


def frames_after(batch: EventBatch, after: int) -> str:
    """The frames of ``batch`` whose id is above ``after``."""
    if batch.first_seq > after:
        return batch.frames
    kept = [f"{text}\n\n" for text in batch.frames.split("\n\n") if text and _frame_id(text) > after]
    return "".join(kept)


def streamed_text(frames: str) -> str:
    """The answer the frames stream: the content of their token chunks, in order (what a replay shows)."""
    text = []
    for part in frames.split("\n\n"):
        data = _frame_data(part) if part else ""
        if data.startswith('{"type":"token"'):  # compact JSON, "type" first: chunk() builds it so
            text.append(json.loads(data)["content"])
    return "".join(text)


def stopped_replay(frames: list[str], kept_chars: int) -> list[str]:
    """The frames of a run stopped with its answer cut to ``kept_chars`` characters, the last one being its terminal
    frame, as a replay shows them: the log as it stood when its viewer had seen that much text, then the end. The
    token frame that crosses the cut keeps its id and loses only the text past it; the frames after it but the
    terminal one become empty strings, so ``frames[seq - 1]`` still names event ``seq``. The stored answer and the
    replay then say the same text, under the ids the run's viewers were given."""
    shown: list[str] = []
    left, past = kept_chars, False
    for text in frames[:-1]:
        data = _frame_data(text)
        if past or not data.startswith('{"type":"token"'):
            shown.append("" if past else text)
            continue
        item = json.loads(data)
        if len(item["content"]) <= left:
            shown.append(text)
            left -= len(item["content"])
            continue
        past = True
        shown.append(frame(_frame_id(text), {**item, "content": item["content"][:left]}) if left else "")
    return shown + frames[-1:]


def cut(text: str, seen_chars: int | None) -> str:
    """The answer as the user saw it: its first ``seen_chars`` characters (Unicode code points)."""
    return text if seen_chars is None else text[:seen_chars]


def _frame_id(text: str) -> int:
    return int(text[4 : text.index("\n")])


def _frame_data(text: str) -> str:
    """The chunk JSON of one frame (``text`` with or without its closing blank line)."""
    return text[text.find("data: ") + 6:].rstrip("\n")
