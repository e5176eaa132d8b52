"""The Bedrock stream's HTTP/1.1 client against raw servers on 127.0.0.1 that write exactly the bytes a test scripts.

The bytes are cut at every position where it matters, because a network read can end anywhere: inside the head,
inside a chunk-size line, between a chunk and its CRLF.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
import trustme

from services.model.stream_client import HIGH_WATER, ConnectTimeout, StreamClient, StreamClientError

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback server running ``handler`` per connection; counts the connections it accepted."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0  # connections the client has not closed yet
        self.requests: list[bytes] = []
        self.closed_by_client = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_client.set()
        finally:
            self.open -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    async def wait_for_close(self, reader: asyncio.StreamReader) -> None:
        if await reader.read(1) == b"":  # (a reset raises, which _serve counts as a close too)
            self.closed_by_client.set()


@asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[Server, int]]:
    server = Server(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=tls)
    try:
        yield server, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()


def client(port: int, scheme: str = "http", ssl_context: ssl.SSLContext | None = None, **options: float) -> StreamClient:
    settings = {"connect_timeout": 2.0, "keepalive_expiry": 30.0, **options}
    return StreamClient(f"{scheme}://127.0.0.1:{port}", ssl_context=ssl_context, **settings)


async def read_all(client_: StreamClient, body: bytes = b"{}") -> tuple[int, dict[str, str], bytes]:
    response = await client_.post("/model/m/converse-stream", {"Content-Type": "application/json"}, body)
    data = b""
    try:
        while chunk := await response.read():
            data += chunk
    finally:
        response.close()
    return response.status, response.headers, data


async def write_in_pieces(writer: asyncio.StreamWriter, data: bytes, cut: int) -> None:
    """Two writes cut at ``cut``, each flushed with a pause, so the client sees two network reads."""
    for piece in (data[:cut], data[cut:]):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.002)


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.amazon.eventstream\r\nTransfer-Encoding: chunked\r\n"
    b"X-Amzn-RequestId: one\r\nX-Amzn-RequestId: two\r\n\r\n"
    b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nTrailer: x\r\n\r\n"
)


async def test_a_chunked_body_cut_anywhere_is_read_whole_and_the_connection_is_reused() -> None:
    cuts = range(1, len(CHUNKED))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for cut in cuts:
            await server.read_request(reader)
            await write_in_pieces(writer, CHUNKED, cut)

    async with serving(handler) as (server, port):
        stream_client = client(port)
        for _ in cuts:
            status, headers, body = await read_all(stream_client, b'{"a":1}')
            assert (status, body) == (200, b"hello world!")
            assert headers["x-amzn-requestid"] == "one, two"
        stream_client.close()
    assert server.connections == 1
    request = server.requests[0]
    assert request.startswith(b"POST /model/m/converse-stream HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n" in request
    assert request.endswith(b'{"a":1}')


async def test_content_length_and_close_delimited_bodies() -> None:
    replies = [
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\n{\"x\":\"bad\"}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            reply = replies[len(server.requests) - 1]
            await write_in_pieces(writer, reply, len(reply) - 3)
            if b"close" in reply or b"HTTP/1.0" in reply:
                return

    async with serving(handler) as (server, port):
        stream_client = client(port)
        assert await read_all(stream_client) == (400, {"content-length": "11"}, b'{"x":"bad"}')
        assert (await read_all(stream_client))[2] == b""
        assert (await read_all(stream_client))[2] == b"ok"  # asks to close: not reused
        assert (await read_all(stream_client))[2] == b"until the end"  # HTTP/1.0, no length: ends with the connection
    assert server.connections == 2  # the first three on one connection


MALFORMED = {
    "http2": b"HTTP/2 200 OK\r\n\r\n",
    "status": b"HTTP/1.1 2000 OK\r\n\r\n",
    "informational": b"HTTP/1.1 100 Continue\r\n\r\n",
    "header": b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    "folded": b"HTTP/1.1 200 OK\r\n Folded: x\r\n\r\n",
    "length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "chunk-end": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n",
    "chunk-line": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000,
    "head-size": b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    "cut": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # and the server closes
    "non-ascii-length": "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"),
    "non-ascii-status": "HTTP/1.1 \u00b200 OK\r\n\r\n".encode("latin-1"),
}


@pytest.mark.parametrize("reply", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_or_cut_response_is_an_error_and_the_connection_is_not_reused(reply: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(reply)
        await writer.drain()
        if reply.endswith(b"short"):
            server.closed_by_client.set()  # here the server hangs up
            return
        await server.wait_for_close(reader)  # the client must hang up on a broken exchange

    async with serving(handler) as (server, port):
        stream_client = client(port)
        with pytest.raises(StreamClientError):
            await read_all(stream_client)
        await asyncio.wait_for(server.closed_by_client.wait(), 2)
        assert server.connections == 1


@pytest.mark.parametrize(
    ("reply", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nSTALE", b""),  # in the same read as the head
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSTALE", b"ok"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nSTALE", b"ok"),
    ],
    ids=["empty", "length", "chunked"],
)
async def test_bytes_after_a_complete_response_never_reach_the_next_request(reply: bytes, body: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(reply if server.connections == 1 else b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
            await writer.drain()

    async with serving(handler) as (server, port):
        stream_client = client(port)
        assert (await read_all(stream_client))[2] == body  # the response keeps its body
        assert (await read_all(stream_client))[2] == b"fresh"
        assert server.connections == 2  # the connection that carried the stray bytes was dropped
        stream_client.close()


@pytest.mark.parametrize("size", [10, HIGH_WATER + 1000], ids=["small", "over-high-water"])
async def test_a_body_not_read_to_its_end_is_never_handed_to_the_next_request(size: int) -> None:
    """The user pressed Stop after Bedrock had sent everything: the rest of that answer belongs to no one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await server.read_request(reader)
            body = (b"first:" + b"x" * size) if len(server.requests) == 1 else request[-6:]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async with serving(handler) as (server, port):
        stream_client = client(port)
        response = await stream_client.post("/", {}, b"")
        await asyncio.sleep(0.1)  # the whole body (or up to the high-water mark) has arrived, unread
        response.close()  # before reading it
        assert (await read_all(stream_client, b"second"))[2] == b"second"
        assert server.connections == 2
        stream_client.close()


async def test_bytes_read_before_a_broken_connection_are_delivered_first() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npart\r\n")
        await writer.drain()

    async with serving(handler) as (server, port):
        response = await client(port).post("/", {}, b"")
        await asyncio.sleep(0.05)  # the data and the close have both arrived
        assert await response.read() == b"part"
        with pytest.raises(StreamClientError, match="closed mid-response"):
            await response.read()
        response.close()


async def test_closing_mid_body_hangs_up_and_a_dead_idle_connection_is_replaced() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await server.wait_for_close(reader)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()  # then closes the idle keep-alive connection, as servers do

    async with serving(handler) as (server, port):
        stream_client = client(port)
        response = await stream_client.post("/", {}, b"")
        assert await response.read() == b"abc"
        response.close()  # the user stopped: this is what tells Bedrock to stop generating
        await asyncio.wait_for(server.closed_by_client.wait(), 2)
        assert (await read_all(stream_client))[2] == b"ok"
        await asyncio.sleep(0.05)  # the server's close of the idle connection arrives
        assert (await read_all(stream_client))[2] == b"ok"  # on a new connection, no error
    assert server.connections == 3


async def test_idle_connections_expire() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with serving(handler) as (server, port):
        stream_client = client(port, keepalive_expiry=0.05)
        await read_all(stream_client)
        await read_all(stream_client)
        assert server.connections == 1
        await asyncio.sleep(0.1)
        await read_all(stream_client)
        assert server.connections == 2
        stream_client.close()


async def test_an_unread_body_pauses_the_socket_instead_of_filling_memory() -> None:
    drained = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 16777216\r\n\r\n")
        for _ in range(256):
            writer.write(b"x" * 65536)
            await writer.drain()
        drained.set()

    async with serving(handler) as (server, port):
        response = await client(port).post("/", {}, b"")
        await asyncio.sleep(0.3)
        assert not drained.is_set()  # the server is blocked: the client stopped reading at its high-water mark
        first = await response.read()
        assert HIGH_WATER <= len(first) < HIGH_WATER + 512 * 1024
        total = len(first)
        while chunk := await response.read():
            total += len(chunk)
        assert total == 16777216 and drained.is_set()
        response.close()


async def test_cancelled_while_waiting_for_the_head_closes_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await server.wait_for_close(reader)

    async with serving(handler) as (server, port):
        stream_client = client(port)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await stream_client.post("/", {}, b"")
        await asyncio.wait_for(server.closed_by_client.wait(), 2)


@pytest.mark.parametrize("cancel", ["task", "scope"])
async def test_a_request_cancelled_at_any_point_leaves_no_connection_held(cancel: str) -> None:
    """Cancelled after each number of event-loop turns, so at every point of its life (connecting, sending, waiting
    for the head, reading, closing), as ``asyncio.timeout`` cancels (Task.cancel) or as Starlette does when the client
    leaves (an anyio scope): each connection ends closed, or idle and reusable; none is held or lost."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(3):
                writer.write(b"3\r\nabc\r\n")
                await writer.drain()
                await asyncio.sleep(0)
            writer.write(b"0\r\n\r\n")

    async def cancelled_after(turns: int) -> None:
        scope = anyio.CancelScope()

        async def request() -> None:
            with scope:
                await read_all(stream_client)

        task = asyncio.ensure_future(request())
        for _ in range(turns):
            await asyncio.sleep(0)
        if cancel == "task":
            task.cancel()
        else:
            scope.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async with serving(handler) as (server, port):
        stream_client = client(port)
        for turns in range(60):
            await cancelled_after(turns)
            with anyio.fail_after(2):
                while server.open != len(stream_client._idle):  # the hang-up of a cancelled exchange arrives
                    await asyncio.sleep(0.001)
            assert len(stream_client._idle) <= 1 and all(c.reusable for c in stream_client._idle)
        assert (await read_all(stream_client))[2] == b"abcabcabc"
        stream_client.close()
    assert 1 < server.connections < 60  # some were cancelled mid-exchange (hung up), others after it (kept)


async def test_connection_failures() -> None:
    async with serving(lambda reader, writer: asyncio.sleep(0)) as (_, port):
        pass  # the port is closed again: connecting is refused
    with pytest.raises(StreamClientError, match="cannot connect"):
        await client(port).post("/", {}, b"")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)  # accepts TCP, never answers the TLS handshake

    async with serving(silent) as (_, port):
        with pytest.raises(ConnectTimeout):
            await client(port, "https", ssl.create_default_context(), connect_timeout=0.2).post("/", {}, b"")


async def test_https_verifies_the_server_certificate() -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(CHUNKED)
        await writer.drain()
        await server.read_request(reader)
        writer.write(CHUNKED[: CHUNKED.index(b"1;ext")])  # then silence, like a model thinking
        await writer.drain()
        await server.wait_for_close(reader)

    async with serving(handler, tls=server_context) as (server, port):
        trusting = ssl.create_default_context()
        authority.configure_trust(trusting)
        stream_client = client(port, "https", trusting)
        assert (await read_all(stream_client))[2] == b"hello world!"
        response = await stream_client.post("/", {}, b"")
        assert await response.read() == b"hello"
        assert server.connections == 1
        response.close()  # Stop mid-answer: the server sees the hang-up at once, not after a TLS shutdown
        await asyncio.wait_for(server.closed_by_client.wait(), 1)
        with pytest.raises(StreamClientError, match="SSLCertVerificationError"):
            await client(port, "https", ssl.create_default_context()).post("/", {}, b"")


def test_the_host_header_is_the_one_sigv4_signs() -> None:
    def host(url: str, context: ssl.SSLContext | None = None) -> str:
        return StreamClient(url, connect_timeout=1, keepalive_expiry=1, ssl_context=context).host_header

    tls = ssl.create_default_context()
    assert host("https://bedrock-runtime.us-east-1.amazonaws.com", tls) == "bedrock-runtime.us-east-1.amazonaws.com"
    assert host("https://Example.com:443", tls) == "example.com"
    assert host("http://127.0.0.1:8001") == "127.0.0.1:8001"
    assert host("http://[::1]:80") == "[::1]"
    with pytest.raises(ValueError):
        host("ftp://example.com")
    with pytest.raises(ValueError, match="ssl_context"):
        host("https://example.com")
