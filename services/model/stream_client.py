"""A small HTTP/1.1 client for one origin on asyncio Protocols: the transport of the Bedrock stream.

Why not httpx here: every open chat stream is one long POST to Bedrock, and at thousands of streams per worker the
per-request and per-chunk costs of a general client are most of what the relay spends. httpx builds a URL, cookie
jar, header and request objects per request and hands each chunk up through httpcore, h11 and anyio layers; py-spy
put the Bedrock request at about a fifth of a chat turn's CPU (bench/RESULTS.md). Here a request is one socket
write (head and body together) and each network read is parsed once, in ``data_received``. httpx stays for
everything else (PostgREST, Supabase Auth), where its generality costs nothing noticeable.

What it does: POST a body of known length to one origin (http or https), read the body as it arrives, with
back-pressure, and keep connections alive between responses. What it does not: redirects, proxies, compression, 1xx
responses, HTTP/2, request bodies of unknown length. Bedrock needs none of them. Deadlines are the caller's
(``asyncio.timeout_at`` around ``post`` and ``read``), except connecting, which is bounded here by ``connect_timeout``.

Every failure is a ``StreamClientError``; ``services/model/bedrock.py`` translates it once, at its boundary.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from urllib.parse import urlsplit

HEAD_LIMIT = 64 * 1024  # status line and headers; a real head is under 1 KB
LINE_LIMIT = 1024  # a chunk-size line (size and extensions) or a trailer line
HIGH_WATER = 256 * 1024  # unread body bytes before the socket is paused
DEFAULT_PORTS = {"http": 80, "https": 443}


def set_nodelay(sock: socket.socket | None) -> None:
    """Turn Nagle's algorithm off on a TCP socket (asyncio does so only for sockets made with ``IPPROTO_TCP``): a
    request or response written in two segments would otherwise wait for the first one's delayed acknowledgement.
    Shared with the service's HTTP protocol (``web/tcp.py``)."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StreamClientError(Exception):
    """A connection that could not be opened, broke, or carried something that is not HTTP/1.1."""


class ConnectTimeout(StreamClientError):
    """No connection within ``connect_timeout``."""


class ReadInterrupted(StreamClientError):
    """``StreamResponse.interrupt`` ended a read: the caller's own deadline passed."""


class _Chunked:
    """The chunked transfer coding, decoded incrementally; ``done`` after the last chunk and its trailers."""

    __slots__ = ("_buffer", "_left", "done", "overrun")

    def __init__(self) -> None:
        self._buffer = b""
        self._left = -1  # > 0: data bytes to go; 0: the CRLF after data; -1: a size line; -2: trailer lines
        self.done = False
        self.overrun = False  # bytes came after the end

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
            eol = buffer.find(b"\r\n", pos, pos + LINE_LIMIT)
            if eol < 0:
                if end - pos >= LINE_LIMIT:
                    raise StreamClientError("chunked body: a line longer than allowed")
                break
            if self._left == 0:
                if eol != pos:
                    raise StreamClientError("chunked body: no line break after a chunk")
                self._left = -1
            elif self._left == -1:
                self._left = _chunk_size(buffer[pos:eol]) or -2
            elif eol == pos:  # the blank line that ends the (usually absent) trailers
                self.done = True
            pos = eol + 2
        self.overrun = self.done and pos < end
        self._buffer = buffer[pos:] if not self.done else b""
        return b"".join(out) if len(out) != 1 else out[0]


def _chunk_size(line: bytes) -> int:
    size = line.split(b";", 1)[0].strip()
    if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
        raise StreamClientError("chunked body: a bad chunk size")
    return int(size, 16)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: parses the response of the request in flight as bytes arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._head = b""
        self._reading_head = False
        self._head_ready: asyncio.Future[tuple[int, dict[str, str]]] | None = None
        self._body: _Chunked | int | None = None  # chunked decoder, bytes left by Content-Length, or None: to close
        self._unread: list[bytes] = []
        self._unread_size = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: StreamClientError | None = None
        self.complete = True  # the whole response body has arrived (True between requests)
        self.keep_alive = False

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        try:
            if self._reading_head:
                self._receive_head(data)
            else:
                self._receive_body(data)
        except StreamClientError as exc:
            self._fail(exc)
            self._close()

    def eof_received(self) -> bool:
        self.closed = True  # never reused, even before connection_lost arrives (TLS waits for close_notify)
        if self._body is None and not self._reading_head and not self.complete:
            self.complete = True  # a body delimited by the end of the connection ends here
            self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._reading_head or not self.complete:
            why = type(exc).__name__ if exc is not None else "end of stream"
            self._fail(StreamClientError(f"the connection closed mid-response ({why})"))

    # -- one exchange --------------------------------------------------------------------------------------------

    def send(self, request: bytes) -> asyncio.Future[tuple[int, dict[str, str]]]:
        assert self.transport is not None
        self._head, self._reading_head, self._body, self.complete = b"", True, None, False
        self._head_ready = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._head_ready

    async def read(self) -> bytes:
        """The body bytes that arrived since the last read (waiting for some), or b"" at the end of the body."""
        while not self._unread:
            if self.complete:
                return b""  # (a later error, such as bytes after the end, only keeps the connection from reuse)
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._unread[0] if len(self._unread) == 1 else b"".join(self._unread)
        self._unread.clear()
        self._unread_size = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def _receive_head(self, data: bytes) -> None:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 and len(self._head) <= HEAD_LIMIT:
            return
        if end < 0 or end > HEAD_LIMIT:
            raise StreamClientError("a response head longer than allowed")
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head, self._reading_head = b"", False
        status, headers, http10 = _parse_head(head)
        self._body = 0 if status in (204, 304) else _body_framing(headers)
        self.keep_alive = not http10 and self._body is not None and "close" not in headers.get("connection", "").lower()
        if self._body == 0:
            self._body, self.complete = None, True
        if self._head_ready is not None and not self._head_ready.done():
            self._head_ready.set_result((status, headers))
        if rest:
            self._receive_body(rest)

    def _receive_body(self, data: bytes) -> None:
        """Body bytes for the caller; bytes after the body's end are the server's error: the response keeps its
        body, the connection is dropped (they must never be read as the next response)."""
        body = self._body
        overrun = False
        if body is None and self.complete:
            overrun, data = True, b""
        elif isinstance(body, _Chunked):
            data = body.feed(data)
            overrun = body.overrun
            if body.done:
                self._body, self.complete = None, True
        elif isinstance(body, int):
            overrun, data = len(data) > body, data[:body]
            self._body = body - len(data) or None
            self.complete = self._body is None
        if data:
            self._unread.append(data)
            self._unread_size += len(data)
            if self._unread_size > HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
        self._wake()
        if overrun:
            raise StreamClientError("bytes after the end of the response, or with no request in flight")

    @property
    def ready(self) -> bool:
        """Whether a read would return (or raise) without waiting for the network."""
        return bool(self._unread) or self.complete or self._error is not None

    def interrupt(self, error: StreamClientError) -> None:
        """End a read that is waiting, with ``error``; a read that is not waiting is not affected."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    def _fail(self, error: StreamClientError) -> None:
        if self._error is None:
            self._error = error
        if self._head_ready is not None and not self._head_ready.done():
            self._head_ready.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _close(self) -> None:
        """Drop the connection at once. ``abort``, not ``close``: on TLS, ``close`` sends close_notify and keeps the
        socket open until the peer answers (up to 30 s), so a stopped stream would not reach Bedrock as a hang-up."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        self.closed = True

    @property
    def reusable(self) -> bool:
        """Only a connection whose exchange ended cleanly: its whole body read by the caller, nothing unsent."""
        transport = self.transport
        return (
            self.complete
            and self.keep_alive
            and not self.closed
            and self._error is None
            and not self._unread  # the caller stopped before reading it all: these bytes belong to no one else
            and not self._paused
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0  # the server answered before reading the whole request
        )


def _parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    """(status, headers with lower-case names and repeats joined by ", ", whether the server speaks HTTP/1.0)."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not _digits(status) or rest[3:4] not in ("", " "):
        raise StreamClientError("a response that is not HTTP/1.1")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise StreamClientError("a malformed response header")
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if int(status) < 200:  # 1xx: never asked for (no Expect, no Upgrade)
        raise StreamClientError("an informational response")
    return int(status), headers, version == "HTTP/1.0"


def _body_framing(headers: dict[str, str]) -> _Chunked | int | None:
    """How the body ends (RFC 9112, 6.3): chunked coding, a Content-Length, or the connection closing (None)."""
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if coding.lower().rsplit(",", 1)[-1].strip() != "chunked":
            return None  # an unknown final coding: the body runs to the end of the connection
        return _Chunked()
    length = headers.get("content-length")
    if length is None:
        return None
    if not _digits(length) or len(length) > 18:
        raise StreamClientError("a bad Content-Length")
    return int(length)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit alone accepts "²", which int() refuses


class StreamResponse:
    """A response whose body is read as it arrives; ``close`` gives the connection back or closes it."""

    __slots__ = ("_client", "_connection", "headers", "status")

    def __init__(self, client: StreamClient, connection: _Connection, status: int, headers: dict[str, str]) -> None:
        self._client = client
        self._connection: _Connection | None = connection
        self.status = status
        self.headers = headers

    async def read(self) -> bytes:
        """The next bytes of the body, b"" once it has all been read."""
        if self._connection is None:
            return b""
        return await self._connection.read()

    @property
    def ready(self) -> bool:
        """Whether ``read`` would return without waiting: bytes have arrived that the caller has not read yet."""
        return self._connection is None or self._connection.ready

    def interrupt(self, error: ReadInterrupted) -> None:
        """Make a ``read`` that is waiting raise ``error``: how a caller with its own clock enforces a deadline
        without arming a timer per read."""
        if self._connection is not None:
            self._connection.interrupt(error)

    def close(self) -> None:
        """Back to the pool when the body was read to its end, else closed (which tells the server to stop)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._client._release(connection)


class StreamClient:
    """Keep-alive connections to one origin; one request at a time on each, no cap on how many are open."""

    def __init__(
        self, url: str, *, connect_timeout: float, keepalive_expiry: float, ssl_context: ssl.SSLContext | None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError("the URL must be http:// or https:// with a host")
        if parts.scheme == "https" and ssl_context is None:
            raise ValueError("https needs an ssl_context")
        self._host = parts.hostname
        self._port = parts.port or DEFAULT_PORTS[parts.scheme]
        self._ssl = ssl_context if parts.scheme == "https" else None
        # The Host header as botocore signs it (SigV4 covers it): the port only when it is not the scheme's default.
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.host_header = host if self._port == DEFAULT_PORTS[parts.scheme] else f"{host}:{self._port}"
        self._connect_timeout = connect_timeout
        self._keepalive_expiry = keepalive_expiry
        self._idle: list[_Connection] = []

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> StreamResponse:
        """Send one POST and wait for the response head. Raises ``StreamClientError``; cancellation closes it."""
        connection = self._take() or await self._connect()
        head = [f"POST {path} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers.items()]
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        try:
            status, response_headers = await connection.send("".join(head).encode("latin-1") + body)
        except BaseException:
            connection._close()
            raise
        return StreamResponse(self, connection, status, response_headers)

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely to have been closed
            if connection.reusable and now - connection.idle_since < self._keepalive_expiry:
                return connection
            connection._close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        server_hostname = self._host if self._ssl is not None else None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=self._ssl, server_hostname=server_hostname
                )
        except TimeoutError:
            raise ConnectTimeout("connecting timed out") from None
        except (OSError, ssl.SSLError) as exc:  # refused, unreachable, DNS (socket.gaierror), certificate
            raise StreamClientError(f"cannot connect ({type(exc).__name__})") from exc
        return connection

    def _release(self, connection: _Connection) -> None:
        if not connection.reusable:
            connection._close()
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)
        expired = connection.idle_since - self._keepalive_expiry
        while self._idle and self._idle[0].idle_since < expired:  # the oldest idle connections sit at the bottom
            self._idle.pop(0)._close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop()._close()
