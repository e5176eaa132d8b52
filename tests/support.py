"""Test helpers shared by every suite: settings, a real uvicorn server on loopback, and an SSE parser."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from settings import Settings
from web.tcp import NoDelayH11Protocol


def new_id() -> str:
    return str(uuid.uuid4())


def make_settings(tmp_path: Any, **overrides: str) -> Settings:
    """Settings from an environment dict, as the service reads them; tests never patch os.environ."""
    environ = {
        "SQLITE_PATH": str(tmp_path / "canvalo.db"),
        "LOCAL_TOKEN_DELAY": "0",
        "LOG_LEVEL": "WARNING",
        # Suites send many turns as one user; the limit tests set their own, small limits.
        "RATE_LIMIT_CHAT_PER_MINUTE": "1000",
        "RATE_LIMIT_API_PER_MINUTE": "10000",
    }
    environ.update(overrides)
    return Settings.from_environ(environ)


@dataclass
class LiveServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread = field(repr=False)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, for a server the test starts as a process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(url: str, process: subprocess.Popen[Any], timeout: float = 20) -> None:
    """Poll ``url``/health until it answers 200; fail if ``process`` exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, f"the server exited with status {process.returncode}"
        assert time.monotonic() < deadline, f"no healthy answer from {url} within {timeout} s"
        time.sleep(0.1)


@contextlib.contextmanager
def serve(
    app: Any, *, graceful_timeout: int | None = None, limit_concurrency: int | None = None
) -> Iterator[LiveServer]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a thread (the pattern of httpx's and uvicorn's own suites);
    ``limit_concurrency`` is what ``python app.py`` passes from MAX_CONNECTIONS."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The socket is made like uvicorn's own multi-worker bind (proto 0, so asyncio leaves Nagle on), and served with
    # the protocol production uses, which turns Nagle off per connection (web/tcp.py says why).
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout,
        limit_concurrency=limit_concurrency,
        http=NoDelayH11Protocol,
    )
    server = uvicorn.Server(config)
    # Signals belong to the main thread; the test drives shutdown through should_exit instead.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@dataclass
class SSEEvent:
    data: str | None = None
    id: str | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        assert self.data is not None
        return json.loads(self.data)  # type: ignore[no-any-return]


def parse_sse(text: str) -> list[SSEEvent]:
    """Events in the order sent, following the WHATWG rules we rely on (modelled on httpx-sse's decoder).

    A comment-only block (``: ping``) becomes an event with ``data is None``, so tests can see heartbeats.
    """
    events: list[SSEEvent] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        event = SSEEvent()
        data_lines = []
        for line in block.split("\n"):
            if line.startswith(":"):
                event.comments.append(line[1:].strip())
            elif line.startswith("data:"):
                data_lines.append(line[5:].removeprefix(" "))
            elif line.startswith("id:"):
                event.id = line[3:].removeprefix(" ")
        event.data = "\n".join(data_lines) if data_lines else None
        events.append(event)
    return events


def chunks(text: str) -> list[dict[str, Any]]:
    """Only the data events, decoded."""
    return [event.json() for event in parse_sse(text) if event.data is not None]


def event_ids(text: str) -> list[int]:
    """The ids of the data events, in order (a frame without one, such as the shutdown notice, is left out)."""
    return [int(event.id) for event in parse_sse(text) if event.data is not None and event.id is not None]


def streamed_text(items: list[dict[str, Any]]) -> str:
    return "".join(item["content"] for item in items if item["type"] == "token")


def window_room(window: float, needed: float) -> float:
    """Seconds to wait so that the next ``needed`` seconds fall inside one fixed window of ``window`` seconds, as the
    rate limits count (0 when they already do): a burst straddling a window's end would be counted in two."""
    left = window - time.time() % window
    return 0.0 if left >= needed else left + 0.02
