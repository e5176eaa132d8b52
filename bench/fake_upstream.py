"""A fake Bedrock ConverseStream endpoint cheap enough to drive 5,000 concurrent streams from one core.

What: ``python -m bench.fake_upstream --ttft 0.2 --tokens 20 --interval 0.1`` serves
``POST /model/{id}/converse-stream`` on 127.0.0.1 and prints ``PORT <n>`` once it listens. Every answer is real AWS
event-stream frames (``tests/fake_bedrock.py``'s encoder): ``messageStart`` and the first ``contentBlockDelta`` after
``--ttft`` seconds, one more delta every ``--interval`` seconds, and ``contentBlockStop``/``messageStop``/``metadata``
with the last delta. ``--interval 0`` is unpaced: every open stream gets its next frame each round of the event loop,
as fast as TCP back-pressure allows.

Why not ``tests/fake_bedrock.FakeBedrock`` under uvicorn: that runs one task per stream that sleeps between frames and
re-checks SigV4 on every request, which at 5,000 streams would cost the benchmark's own core more than the server
under test spends. Here:

- all frames are encoded once, already wrapped in HTTP/1.1 chunked framing, at startup;
- one shared ticker (a ``call_at`` callback every ``TICK`` seconds) writes the frames that are due to every open
  stream; streams wait in per-tick buckets, so a tick touches only the streams due in it;
- HTTP/1.1 is parsed by hand on an ``asyncio.Protocol`` (keep-alive supported, since clients reuse connections);
- credentials are not verified: the request must only carry a SigV4 ``Authorization`` header (dummy keys pass).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fake_bedrock import block_stop, message_start, message_stop, metadata, text_delta  # noqa: E402

TOKEN = " token"  # every delta carries this text, so a client can count tokens in merged events
TICK = 0.005  # ticker resolution: a frame leaves at most this late
HEAD_LIMIT = 64 * 1024

RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: application/vnd.amazon.eventstream\r\n"
    b"x-amzn-requestid: bench-fake\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
FORBIDDEN = (
    b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\n"
    b"x-amzn-errortype: MissingAuthenticationTokenException:http://internal.amazon.com/coral/com.amazon.bedrock/\r\n"
    b"content-length: 46\r\n\r\n"
    b'{"message":"Missing Authentication Token abc"}'
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass(frozen=True)
class Script:
    """The pre-encoded answer: ``frames[i]`` is written for token ``i`` (the first and last carry the extra events)."""

    ttft: float
    interval: float
    frames: tuple[bytes, ...]

    @classmethod
    def build(cls, ttft: float, tokens: int, interval: float) -> Script:
        delta = text_delta(TOKEN)
        end = block_stop() + message_stop() + metadata(input_tokens=25, output_tokens=tokens)
        frames = [chunked(delta) for _ in range(tokens)]
        frames[0] = chunked(message_start() + delta)
        frames[-1] = chunked(delta + end) + b"0\r\n\r\n"
        if tokens == 1:
            frames[0] = chunked(message_start() + delta + end) + b"0\r\n\r\n"
        return cls(ttft, interval, tuple(frames))


class Stream:
    __slots__ = ("conn", "next")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.next = 0


class Ticker:
    """One callback for every paced stream: writes each due stream's next frame, then re-buckets it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, script: Script) -> None:
        self.loop = loop
        self.script = script
        self.origin = loop.time()
        self.done_tick = 0
        self.buckets: dict[int, list[Stream]] = {}
        self.unpaced: set[Stream] = set()
        self.pumping = False
        self._schedule()

    def start(self, conn: Connection) -> None:
        stream = Stream(conn)
        if self.script.ttft <= 0 and self.script.interval <= 0:
            self.unpaced.add(stream)
            self._pump_soon()
        else:
            self._bucket(stream, self.loop.time() + self.script.ttft)

    def _bucket(self, stream: Stream, due: float) -> None:
        tick = max(self.done_tick + 1, math.ceil((due - self.origin) / TICK))
        self.buckets.setdefault(tick, []).append(stream)

    def _schedule(self) -> None:
        self.loop.call_at(self.origin + (self.done_tick + 1) * TICK, self._tick)

    def _tick(self) -> None:
        now_tick = int((self.loop.time() - self.origin) / TICK)
        for tick in range(self.done_tick + 1, now_tick + 1):
            for stream in self.buckets.pop(tick, ()):
                if self._write_next(stream) and self.script.interval > 0:
                    self._bucket(stream, self.origin + tick * TICK + self.script.interval)
                elif not stream.conn.finished(stream):
                    self.unpaced.add(stream)  # paced first token, then unpaced
                    self._pump_soon()
        self.done_tick = max(self.done_tick, now_tick)
        self._schedule()

    def _write_next(self, stream: Stream) -> bool:
        """Write the stream's next frame; False when it has no more (or its client left)."""
        conn = stream.conn
        if conn.closed:
            return False
        frames = self.script.frames
        conn.transport.write(frames[stream.next])
        stream.next += 1
        if stream.next == len(frames):
            conn.response_done()
            return False
        return True

    def _pump_soon(self) -> None:
        if not self.pumping and self.unpaced:
            self.pumping = True
            self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Unpaced: one frame to every stream whose socket is not full, then yield to the loop and go again."""
        self.pumping = False
        for stream in list(self.unpaced):
            if stream.conn.paused:
                continue
            if not self._write_next(stream):
                self.unpaced.discard(stream)
        if any(not s.conn.paused for s in self.unpaced):
            self._pump_soon()

    def resumed(self) -> None:
        self._pump_soon()


class Connection(asyncio.Protocol):
    """One client connection: reads a request head and body, answers it, then waits for the next request."""

    def __init__(self, ticker: Ticker) -> None:
        self.ticker = ticker
        self.buffer = b""
        self.need: int | None = None  # body bytes still to read for the current request
        self.busy = False
        self.closed = False
        self.paused = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.ticker.resumed()

    def finished(self, stream: Stream) -> bool:
        return self.closed or stream.next >= len(self.ticker.script.frames)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._parse()

    def _parse(self) -> None:
        if self.need is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > HEAD_LIMIT:
                    self.transport.close()
                return
            head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
            self._head(head)
        if self.need is not None and len(self.buffer) >= self.need:
            self.buffer = self.buffer[self.need :]
            self.need = None
            self._respond()

    def _head(self, head: str) -> None:
        lines = head.split("\r\n")
        self.request_line = lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.headers = headers
        self.close_after = headers.get("connection", "").lower() == "close"
        self.need = int(headers.get("content-length", "0"))

    def _respond(self) -> None:
        method, path, _ = (self.request_line.split(" ") + ["", ""])[:3]
        if method != "POST" or not path.startswith("/model/") or not path.endswith("/converse-stream"):
            self.transport.write(NOT_FOUND)
            self._after_response()
            return
        if not self.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 Credential="):
            self.transport.write(FORBIDDEN)
            self._after_response()
            return
        self.busy = True
        self.transport.write(RESPONSE_HEAD)
        self.ticker.start(self)

    def response_done(self) -> None:
        self.busy = False
        self._after_response()

    def _after_response(self) -> None:
        if self.close_after:
            self.transport.close()
        elif self.buffer:
            self._parse()


async def serve(host: str, port: int, script: Script) -> None:
    loop = asyncio.get_running_loop()
    ticker = Ticker(loop, script)
    server = await loop.create_server(lambda: Connection(ticker), host, port, backlog=4096, reuse_address=True)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft", type=float, default=0.2, help="seconds to the first text delta")
    parser.add_argument("--tokens", type=int, default=20, help="text deltas per answer")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between deltas; 0 = unpaced")
    args = parser.parse_args()
    raise_fd_limit()
    try:
        asyncio.run(serve("127.0.0.1", args.port, Script.build(args.ttft, args.tokens, args.interval)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
