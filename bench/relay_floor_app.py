"""The relay floor: the least any relay built the way the service is built can do per chat turn.

What: ``POST /api/chat/stream`` reads the JSON body and, per request, builds the ConverseStream request the service
builds (the same model id, path and body shape), signs it with botocore's ``SigV4Auth``, writes it on a keep-alive
connection to ``--endpoint`` (the fake Bedrock) taken from a small pool of ``asyncio.open_connection`` streams, and
reads the answer (Content-Length or chunked) into botocore's ``EventStreamBuffer``. Each network read becomes at most
one SSE token event holding every text delta of that read (the six-key chunk shape of ``floor_app.py``); the stream
ends with a ``complete`` event after ``messageStop``/``metadata``, or with an ``error`` event if the upstream fails
(refused connection, HTTP error, exception frame, corrupt frame, a body that ends early). ``GET /`` and the two
conversation reads answer like ``floor_app.py`` (its routes, imported).

Why: the floor (``floor_app.py``) has no upstream at all, so the service's distance to it includes costs the design
cannot avoid: signing, an upstream socket per stream and botocore's pure-Python frame decoder. What the service spends
beyond this app is its own (auth, store, runs, middleware, httpx, retries, timeouts). No auth, no store, no httpx, no
timeouts, no retries. Run by ``bench/run.py`` as ``python bench/relay_floor_app.py --port N --endpoint URL`` (AWS
credentials and region from the environment), pinned to the server core, under uvicorn with asyncio and h11.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import uvicorn
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer, ParserError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.floor_app import api_routes, chunk, sse  # noqa: E402
from web.gc_tuning import tune_gc  # noqa: E402

# The service's defaults (settings.py): BEDROCK_MODEL_ID, BEDROCK_MAX_TOKENS, BEDROCK_TEMPERATURE.
MODEL_ID = "amazon.nova-lite-v1:0"
MAX_TOKENS = 2048
TEMPERATURE = 0.3
SYSTEM = "You are Canvalo's assistant. Answer briefly."
READ_SIZE = 64 * 1024
HEAD_LIMIT = 64 * 1024


class UpstreamError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @property
    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Idle keep-alive connections to one host, last in first out; a connection is in it only between responses."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._idle: list[Connection] = []

    async def take(self) -> tuple[Connection, bool]:
        """(connection, whether it was reused)."""
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn, True
            conn.close()
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=READ_SIZE)
        return Connection(reader, writer), False

    def give_back(self, conn: Connection) -> None:
        if conn.usable:
            self._idle.append(conn)
        else:
            conn.close()


class Dechunker:
    """HTTP/1.1 chunked transfer coding, decoded incrementally; ``done`` once the last chunk and trailers are read."""

    __slots__ = ("_buffer", "_left", "done")

    def __init__(self) -> None:
        self._buffer = b""
        self._left = -1  # > 0: data bytes to go; 0: the CRLF after data; -1: a size line; -2: trailers
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        pos, end = 0, len(buffer)
        while pos < end and not self.done:
            if self._left > 0:
                take = min(self._left, end - pos)
                out.append(buffer[pos : pos + take])
                pos += take
                self._left -= take
                continue
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                break
            if self._left == 0:
                if eol != pos:
                    raise UpstreamError("MODEL_STREAM_ERROR", "bad chunked framing")
                self._left = -1
            elif self._left == -1:
                size = int(buffer[pos:eol].split(b";")[0], 16)
                self._left = size if size else -2
            elif eol == pos:  # the blank line after the (usually absent) trailers
                self.done = True
            pos = eol + 2
        if self.done and pos < end:
            raise UpstreamError("MODEL_STREAM_ERROR", "bytes after the end of the response")
        self._buffer = buffer[pos:]
        return b"".join(out)


class Relay:
    """Signs, sends and decodes one ConverseStream call per chat turn."""

    def __init__(self, endpoint: str, credentials: Credentials, region: str) -> None:
        parts = urlsplit(endpoint.rstrip("/"))
        self.path = f"/model/{quote(MODEL_ID, safe='')}/converse-stream"  # as services/model/converse.model_path
        self.url = f"{parts.scheme}://{parts.netloc}{self.path}"
        self.netloc = parts.netloc
        self.pool = Pool(parts.hostname or "127.0.0.1", parts.port or 80)
        self.signer = SigV4Auth(credentials.get_frozen_credentials(), "bedrock", region)

    def request(self, message: str, history: list[dict[str, Any]]) -> bytes:
        """The HTTP/1.1 request: the service's body shape (services/model/converse.request_body), signed per request."""
        turns = [{"role": h["role"], "content": [{"text": h["content"]}]} for h in history]
        body = {
            "messages": [*turns, {"role": "user", "content": [{"text": message}]}],
            "inferenceConfig": {"maxTokens": MAX_TOKENS, "temperature": TEMPERATURE},
            "system": [{"text": SYSTEM}],
        }
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        signed = AWSRequest(method="POST", url=self.url, data=data, headers={"Content-Type": "application/json"})
        self.signer.add_auth(signed)
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.netloc}"]
        head += [f"{name}: {value}" for name, value in signed.headers.items()]
        head += ["Accept-Encoding: identity", f"Content-Length: {len(data)}", "", ""]
        return "\r\n".join(head).encode("latin-1") + data

    async def send(self, raw: bytes) -> tuple[Connection, int, dict[str, str]]:
        """Write the request and read the response head; once more on a new connection if a reused one had died."""
        for attempt in (1, 2):
            try:
                conn, reused = await self.pool.take()
            except OSError as exc:
                raise UpstreamError("MODEL_UNAVAILABLE", f"cannot connect to the upstream: {exc}") from exc
            try:
                conn.writer.write(raw)
                status, headers = parse_head(await conn.reader.readuntil(b"\r\n\r\n"))
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                conn.close()
                if reused and attempt == 1:
                    continue
                raise UpstreamError("MODEL_UNAVAILABLE", f"upstream connection failed: {exc!r}") from exc
            except BaseException:  # a bad head, a head too long, or cancelled: never back into the pool
                conn.close()
                raise
            return conn, status, headers
        raise AssertionError("unreachable")

    async def events(self, message: str, history: list[dict[str, Any]], conversation_id: str) -> AsyncIterator[bytes]:
        conn: Connection | None = None
        try:
            try:
                conn, status, headers = await self.send(self.request(message, history))
                if status != 200:
                    raise await http_error(conn, status, headers)
                async for text in self.texts(conn, headers):
                    yield sse(chunk("token", content=text))
                self.pool.give_back(conn)
                conn = None
            except (UpstreamError, OSError, asyncio.LimitOverrunError, ValueError, LookupError, TypeError) as exc:
                code = exc.code if isinstance(exc, UpstreamError) else "MODEL_STREAM_ERROR"
                yield sse(chunk("error", error=str(exc), code=code, retryable=True))
                return
            yield sse(chunk("complete", message_id=str(uuid.uuid4()), conversation_id=conversation_id))
        finally:
            if conn is not None:  # failed or cancelled (the client left): the connection's state is unknown
                conn.close()

    async def texts(self, conn: Connection, headers: dict[str, str]) -> AsyncIterator[str]:
        """Per network read, the text of every delta in it joined; returns after messageStop and the body's end."""
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        dechunker = Dechunker() if chunked else None
        length = None if chunked or "content-length" not in headers else int(headers["content-length"])
        frames = EventStreamBuffer()
        stopped = False
        reader = conn.reader
        if length == 0:
            raise UpstreamError("MODEL_STREAM_ERROR", "an empty event stream")
        while True:
            data = await reader.read(READ_SIZE)
            eof = not data
            if dechunker is not None:
                data = dechunker.feed(data)
                done = dechunker.done
            elif length is not None:
                length -= len(data)
                done = length <= 0
                if length < 0:
                    raise UpstreamError("MODEL_STREAM_ERROR", "more body than Content-Length")
            else:
                done = eof  # neither chunked nor a length: the body ends with the connection
            if eof and not done:
                raise UpstreamError("MODEL_STREAM_ERROR", "the upstream closed the connection mid-stream")
            frames.add_data(data)
            text, stop, failure = read_frames(frames)
            stopped = stopped or stop
            if text:
                yield text
            if failure is not None:
                raise failure
            if done:
                if not stopped:
                    raise UpstreamError("MODEL_STREAM_ERROR", "the stream ended without messageStop")
                return


def read_frames(frames: EventStreamBuffer) -> tuple[str, bool, UpstreamError | None]:
    """The frames complete in ``frames``: their text deltas joined, whether ``messageStop`` was among them, and the
    failure that ended them (an exception or error frame, a corrupt frame); the text before a failure still counts."""
    text: list[str] = []
    stopped = False
    try:
        for frame in frames:
            meta = frame.headers
            if meta.get(":message-type") != "event":
                kind = meta.get(":exception-type") or meta.get(":error-code") or "error"
                return "".join(text), stopped, UpstreamError("MODEL_ERROR", f"upstream {kind}: {frame.payload[:200]!r}")
            name = meta.get(":event-type")
            if name == "contentBlockDelta":
                piece = json.loads(frame.payload)["delta"].get("text")
                if piece:
                    text.append(piece)
            elif name == "messageStop":
                stopped = True
    except (ParserError, ValueError, LookupError, TypeError, AttributeError) as exc:
        return "".join(text), stopped, UpstreamError("MODEL_STREAM_ERROR", f"unreadable event-stream frame: {exc!r}")
    return "".join(text), stopped, None


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError("MODEL_STREAM_ERROR", f"bad status line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def http_error(conn: Connection, status: int, headers: dict[str, str]) -> UpstreamError:
    """An answer other than 200: its error type and (Content-Length) body, read so the message can say why."""
    body = b""
    length = int(headers.get("content-length", "0") or 0)
    if 0 < length <= HEAD_LIMIT:
        body = await conn.reader.readexactly(length)
    kind = headers.get("x-amzn-errortype", "").split(":")[0]
    return UpstreamError(f"UPSTREAM_HTTP_{status}", f"upstream HTTP {status} {kind}: {body[:200]!r}")


def build_app(relay: Relay) -> Starlette:
    async def chat_stream(request: Request) -> Response:
        data = await request.json()
        conversation_id = str(data.get("conversation_id") or uuid.uuid4())
        events = relay.events(str(data["message"]), list(data.get("history") or ()), conversation_id)
        return StreamingResponse(events, media_type="text/event-stream")

    return Starlette(routes=[Route("/api/chat/stream", chat_stream, methods=["POST"]), *api_routes()])


def credentials_from_env() -> Credentials:
    """Static keys from the environment, as botocore's env provider reads them; no other source is consulted."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise SystemExit("relay floor: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set")
    return Credentials(key, secret, os.environ.get("AWS_SESSION_TOKEN"))


def main() -> None:
    parser = argparse.ArgumentParser(description="The benchmark's relay floor app.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--endpoint", required=True, help="the fake Bedrock, e.g. http://127.0.0.1:8001")
    args = parser.parse_args()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    app = build_app(Relay(args.endpoint, credentials_from_env(), region))
    tune_gc()  # the service's collector settings, so the comparison measures the relay, not the collector
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="asyncio", http="h11", log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
