"""The load generator: raw asyncio sockets and HTTP/1.1 written by hand, cheap enough not to be the bottleneck.

What: ``open_clients`` opens N keep-alive connections before any clock starts; ``run_streams`` then writes one chat
request on each, all at once, and records per stream the time the request was written, the arrival time of every
token and whether the stream ended with a ``complete`` event; ``run_arrivals`` writes them on a schedule instead
(``rate`` new streams a second, each on a connection of its own opened just before); ``run_requests`` drives GET requests over keep-alive
connections for a fixed time. Responses are parsed incrementally (status line, headers, chunked or Content-Length
body, SSE events split on blank lines); only events with a ``data:`` line are JSON-decoded.

Why by hand: an HTTP client library (httpx, aiohttp) costs tens of microseconds per event in the client, which at
5,000 streams would make the load generator, not the server, the thing being measured.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

CONNECT_CONCURRENCY = 200
ARRIVAL_CONNECT_LEAD = 0.5  # seconds: how long before its request an arriving turn's connection opens
TOKEN = " token"


@dataclass
class StreamResult:
    status: int = 0
    sent: float = 0.0
    first_token: float | None = None
    token_events: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in it) per token event
    events: int = 0
    complete: bool = False
    error: str | None = None
    finished: float | None = None

    @property
    def tokens(self) -> int:
        return sum(count for _, count in self.token_events)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.complete and self.error is None


class Client(asyncio.Protocol):
    """One HTTP/1.1 connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._reset(None)

    def _reset(self, waiter: asyncio.Future[None] | None) -> None:
        self.waiter = waiter
        self.buffer = b""
        self.head_done = False
        self.status = 0
        self.chunked = False
        self.length = -1
        self.chunk_left = -1  # -1: expecting a size line
        self.body = bytearray()
        self.sse = b""
        self.result: StreamResult | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._finish("connection closed")

    def request(self, raw: bytes, result: StreamResult | None = None) -> asyncio.Future[None]:
        """Write one request; the future resolves when the whole response has arrived (or the connection died)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reset(waiter)
        self.result = result
        assert self.transport is not None
        if result is not None:
            result.sent = time.perf_counter()
        self.transport.write(raw)
        return waiter

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        if not self.head_done and not self._head():
            return
        if self.chunked:
            self._dechunk(now)
        else:
            self.body += self.buffer
            self.buffer = b""
            if 0 <= self.length <= len(self.body):
                self._finish(None)

    def _head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = self.buffer[:end].decode("latin-1").split("\r\n")
        self.buffer = self.buffer[end + 4 :]
        self.status = int(lines[0].split(" ")[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "transfer-encoding" and "chunked" in value.lower():
                self.chunked = True
            elif name == "content-length":
                self.length = int(value.strip())
        self.head_done = True
        if self.result is not None:
            self.result.status = self.status
        return True

    def _dechunk(self, now: float) -> None:
        """chunk_left: -1 expecting a size line, 0 expecting the CRLF after chunk data, >0 data bytes to go."""
        buffer, pos, size_of = self.buffer, 0, len(self.buffer)
        while pos < size_of:
            if self.chunk_left == -1:
                eol = buffer.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buffer[pos:eol].split(b";")[0], 16)
                if size == 0:
                    if size_of - eol < 4:  # wait for the final CRLF, so none of it leaks into the next response
                        break
                    self.buffer = b""
                    self._finish(None)
                    return
                pos, self.chunk_left = eol + 2, size
            elif self.chunk_left == 0:
                if size_of - pos < 2:
                    break
                pos, self.chunk_left = pos + 2, -1
            else:
                take = min(self.chunk_left, size_of - pos)
                self._sse(buffer[pos : pos + take], now)
                pos += take
                self.chunk_left -= take
        self.buffer = buffer[pos:]

    def _sse(self, data: bytes, now: float) -> None:
        result = self.result
        if result is None:
            self.body += data
            return
        self.sse += data
        *events, self.sse = self.sse.split(b"\n\n")
        for event in events:
            data_at = event.find(b"data:")  # after the event's "id:" line, if it has one
            if data_at < 0:
                continue  # a ": ping" comment
            item = json.loads(event[data_at + 5 :])
            result.events += 1
            kind = item.get("type")
            if kind == "token":
                count = max(1, len(item.get("content") or "") // len(TOKEN))
                if result.first_token is None:
                    result.first_token = now
                result.token_events.append((now, count))
            elif kind == "complete":
                result.complete = True
            elif kind == "error":
                result.error = str(item.get("code") or item.get("error") or "error")

    def _finish(self, error: str | None) -> None:
        if self.result is not None and self.result.finished is None:
            self.result.finished = time.perf_counter()
            if error and not self.result.complete:
                self.result.error = self.result.error or error
            elif self.status != 200 and self.result.error is None:
                self.result.error = f"HTTP {self.status} {_error_code(self.body)}".rstrip()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


async def open_clients(port: int, count: int) -> list[Client]:
    """``count`` connections to 127.0.0.1:port, opened at most CONNECT_CONCURRENCY at a time."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one() -> Client:
        async with gate:
            _, protocol = await loop.create_connection(Client, "127.0.0.1", port)
            return protocol

    return list(await asyncio.gather(*(one() for _ in range(count))))


def close_all(clients: Sequence[Client]) -> None:
    for client in clients:
        if client.transport is not None:
            client.transport.close()


def post(port: int, path: str, body: dict[str, object], token: str | None) -> bytes:
    raw = json.dumps(body).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{auth}"
        f"Accept: text/event-stream\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    return head.encode() + raw


def get(port: int, path: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n".encode()


async def run_streams(clients: Sequence[Client], requests: Sequence[bytes], timeout: float) -> list[StreamResult]:
    """Write every request at once (one per client) and wait for all responses, at most ``timeout`` seconds."""
    results = [StreamResult() for _ in requests]
    waiters = [client.request(raw, result) for client, raw, result in zip(clients, requests, results)]
    await asyncio.wait(waiters, timeout=timeout)
    return _settled(results)


async def run_arrivals(port: int, requests: Sequence[bytes], rate: float, timeout: float) -> list[StreamResult]:
    """Write request ``i`` on a connection of its own ``i / rate`` seconds after the first, whatever the earlier ones
    are doing (an open arrival process, as new users arrive), then wait for every response, at most ``timeout``
    seconds after the last was written. Each result's ``sent`` is when it was actually written, so a late schedule
    shows.

    Each connection opens ``ARRIVAL_CONNECT_LEAD`` seconds before its request is due, as a browser opens one just
    before it sends: a connection opened at the start and left silent until its turn 10 s later would be closed by
    the service's ``HEADER_READ_TIMEOUT`` (web/tcp.py), a failure no real client meets."""
    loop = asyncio.get_running_loop()
    results = [StreamResult() for _ in requests]
    start = time.perf_counter() + ARRIVAL_CONNECT_LEAD

    async def arrive(index: int, raw: bytes, result: StreamResult) -> None:
        await asyncio.sleep(max(0.0, start + index / rate - ARRIVAL_CONNECT_LEAD - time.perf_counter()))
        try:
            _, client = await loop.create_connection(Client, "127.0.0.1", port)
        except OSError as exc:
            result.error = f"connect: {type(exc).__name__}"
            return
        try:
            await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
            await client.request(raw, result)
        finally:
            if client.transport is not None:
                client.transport.close()

    tasks = [asyncio.ensure_future(arrive(i, raw, result)) for i, (raw, result) in enumerate(zip(requests, results))]
    if tasks:
        await asyncio.wait(tasks, timeout=len(requests) / rate + ARRIVAL_CONNECT_LEAD + timeout)
    for task in tasks:
        task.cancel()
    return _settled(results)


def _settled(results: list[StreamResult]) -> list[StreamResult]:
    """Name why each stream that did not complete failed, once the waiting is over: an answer that was no stream at
    all (a JSON error) by its status."""
    for result in results:
        if not result.ok and result.error is None:
            if result.finished is None:
                result.error = "timeout"
            else:
                result.error = "incomplete" if result.status in (0, 200) else f"HTTP {result.status}"
    return results


async def one_stream(client: Client, raw: bytes, timeout: float) -> StreamResult:
    result = StreamResult()
    try:
        await asyncio.wait_for(client.request(raw, result), timeout)
    except asyncio.TimeoutError:
        result.error = "timeout"
    return result


@dataclass
class RequestStats:
    ok: int = 0
    failed: int = 0
    elapsed: float = 0.0

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


async def run_requests(
    clients: Sequence[Client], make: Callable[[int], bytes], seconds: float, max_requests: int
) -> RequestStats:
    """Each client sends requests back to back (keep-alive) until ``seconds`` pass or ``max_requests`` are sent."""
    stats = RequestStats()
    deadline = time.perf_counter() + seconds
    counter = iter(range(max_requests))

    async def worker(client: Client) -> None:
        for index in counter:
            if time.perf_counter() >= deadline:
                return
            try:
                await asyncio.wait_for(client.request(make(index)), timeout=10)
            except asyncio.TimeoutError:
                stats.failed += 1
                return
            if client.status == 200:
                stats.ok += 1
            else:
                stats.failed += 1
            if client.closed.done():
                return

    started = time.perf_counter()
    await asyncio.gather(*(worker(client) for client in clients))
    stats.elapsed = time.perf_counter() - started
    return stats


def _error_code(body: bytes) -> str:
    """The ``code`` of an error envelope (which 503 it was: STORE_BUSY, STORE_UNAVAILABLE, ...), or ""."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""
