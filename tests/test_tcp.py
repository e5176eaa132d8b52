"""Nagle's algorithm is off on every connection, even on a socket bound the way uvicorn binds for several workers."""

from __future__ import annotations

import pathlib
import socket
from typing import Any

import httpx

from services.model.stream_client import set_nodelay
from tests.support import serve

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_set_nodelay_turns_nagle_off_on_a_socket_asyncio_would_leave_alone() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # proto 0, like uvicorn's bind_socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener, socket.create_connection(listener.getsockname()) as client:
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.proto == 0 and client.proto != 0
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            set_nodelay(accepted)
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_connections_served_by_the_protocol_have_nagle_off() -> None:
    async def app(scope: dict, receive: Any, send: Any) -> None:  # type: ignore[type-arg]
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve(app) as live, httpx.Client() as client:  # serve() binds with proto 0, as uvicorn's workers do
        assert client.get(live.url).text == "ok"  # the keep-alive connection stays open while we look at it
        connections = list(live.server.server_state.connections)
        assert len(connections) == 1
        sock = connections[0].transport.get_extra_info("socket")  # type: ignore[attr-defined]
        assert sock.proto == 0
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_every_way_of_running_the_service_uses_the_protocol() -> None:
    assert "--http web.tcp:NoDelayH11Protocol" in (ROOT / "Dockerfile").read_text()
    assert "http=NoDelayH11Protocol" in (ROOT / "app.py").read_text()
