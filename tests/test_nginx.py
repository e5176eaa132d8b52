"""The shipped nginx site config (deploy/nginx/canvalo.conf), run by a real nginx on 127.0.0.1 in front of the service.

The config file is used as shipped; only its two addresses (listen and upstream) are substituted. A negative
control runs the same file with its two safeguards undone (buffering forced on despite X-Accel-Buffering, and gzip
applied to text/event-stream) and shows the test would notice: tokens then arrive in one burst at the end. On
nginx 1.22 either safeguard alone is enough to keep this stream incremental, so the control undoes both.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app import create_app
from settings import Settings
from tests.scripted_model import ScriptedModel
from tests.support import LiveServer, free_port, make_settings, new_id, serve

SITE = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "canvalo.conf"
PIECES, PAUSE = 12, 0.1  # the answer takes about 1.1 s to produce

MAIN = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/canvalo.conf;
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    assert found, "nginx is not installed: apt-get install -y nginx (.ci/run installs it)"
    return found


def render_site(upstream_port: int, listen_port: int, *, undo: tuple[tuple[str, str], ...] = ()) -> str:
    """The shipped file with only its addresses changed (and every ``undo`` pair replaced wherever it occurs); fails if
    the file no longer has exactly one upstream and one listen, or lacks something to undo."""
    site = SITE.read_text()
    assert site.count("server 127.0.0.1:8000;") == 1 and site.count("listen 80;") == 1
    site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{listen_port};")
    for shipped, replacement in undo:
        assert site.count(shipped) >= 1, shipped
        site = site.replace(shipped, replacement)
    return site


@contextlib.contextmanager
def run_nginx(tmp_path: Path, upstream_port: int, *, undo: tuple[tuple[str, str], ...] = ()) -> Iterator[str]:
    port = free_port()
    (tmp_path / "canvalo.conf").write_text(render_site(upstream_port, port, undo=undo))
    (tmp_path / "nginx.conf").write_text(MAIN.format(tmp=tmp_path))
    process = subprocess.Popen(
        [nginx_binary(), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else "nginx exited"
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LiveServer]:
    model = ScriptedModel(pieces=[f"w{i} " for i in range(PIECES)], pause=PAUSE)
    with serve(create_app(make_settings(tmp_path), model=model)) as live:
        yield live


def timed_stream(url: str, headers: dict[str, str] | None = None) -> tuple[httpx.Response, list[tuple[float, bytes]]]:
    """POST a chat turn; every (decoded) read with its time since the request was sent."""
    user = new_id()
    body = {"message": "hello", "conversation_id": new_id(), "user_id": user, "history": []}
    reads: list[tuple[float, bytes]] = []
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/api/chat/stream", json=body, headers=headers, timeout=20) as response:
        for data in response.iter_bytes():
            reads.append((time.perf_counter() - started, data))
    return response, reads


def first_token_and_end(reads: list[tuple[float, bytes]]) -> tuple[float, float]:
    first = next(at for at, data in reads if b'"type":"token"' in data)
    return first, reads[-1][0]


def test_tokens_arrive_through_nginx_as_they_are_produced(tmp_path: Path, backend: LiveServer) -> None:
    upstream = int(backend.url.rsplit(":", 1)[1])
    with run_nginx(tmp_path, upstream) as proxy:
        response, reads = timed_stream(proxy, headers={"X-Request-ID": "trace-abc-123"})
    first, end = first_token_and_end(reads)
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-abc-123"  # passed through nginx to the service and back
    assert "content-encoding" not in response.headers  # not gzipped
    assert b'"type":"complete"' in reads[-1][1]
    assert end >= (PIECES - 1) * PAUSE * 0.9  # the stream really took its time
    assert first < 0.5 and end - first > 0.6  # the first token came long before the end
    token_reads = [at for at, data in reads if b'"type":"token"' in data]
    assert len(token_reads) >= PIECES // 2  # many separate deliveries, not one burst


def test_a_resumed_run_streams_through_nginx_as_it_is_produced(tmp_path: Path, backend: LiveServer) -> None:
    user = new_id()
    body = {"message": "hello", "conversation_id": new_id(), "user_id": user}
    with httpx.stream("POST", f"{backend.url}/api/chat/stream", json=body, timeout=20) as started:
        run_id = started.headers["x-run-id"]
        next(started.iter_bytes())  # leave after the first event: the run goes on
    upstream = int(backend.url.rsplit(":", 1)[1])
    reads: list[tuple[float, bytes]] = []
    with run_nginx(tmp_path, upstream) as proxy:
        began = time.perf_counter()
        url = f"{proxy}/api/chat/runs/{run_id}/events"
        with httpx.stream("GET", url, params={"user_id": user}, headers={"Last-Event-ID": "1"}, timeout=20) as resumed:
            for data in resumed.iter_bytes():
                reads.append((time.perf_counter() - began, data))
    assert resumed.status_code == 200 and "content-encoding" not in resumed.headers
    assert b'"type":"complete"' in reads[-1][1]
    token_reads = [at for at, data in reads if b'"type":"token"' in data]
    assert len(token_reads) >= PIECES // 3 and reads[-1][0] - token_reads[0] > 0.4  # live, not one burst


def test_negative_control_buffering_nginx_delivers_one_burst(tmp_path: Path, backend: LiveServer) -> None:
    upstream = int(backend.url.rsplit(":", 1)[1])
    undo = (
        ("proxy_buffering off;", "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;"),
        ("gzip off;", "gzip on; gzip_types text/event-stream;"),
    )
    with run_nginx(tmp_path, upstream, undo=undo) as proxy:
        response, reads = timed_stream(proxy)
    assert response.headers.get("content-encoding") == "gzip"
    first, end = first_token_and_end(reads)
    assert end - first < 0.1  # everything at once: what the live test above rules out


def test_shipped_config_keeps_sse_unbuffered_uncompressed_and_alive() -> None:
    site = SITE.read_text()
    for location in (r"location = /api/chat/stream", r"location ~ \^/api/chat/runs/\[\^/\]\+/events\$"):
        stream = re.search(location + r" \{(.*?)\}", site, re.S)
        assert stream is not None, location
        block = stream.group(1)
        assert "proxy_buffering off;" in block and "gzip off;" in block
        read_timeout = re.search(r"proxy_read_timeout (\d+)s;", block)
        assert read_timeout is not None and int(read_timeout.group(1)) > Settings().heartbeat_seconds * 2
    assert "client_header_timeout" in site and "client_body_timeout" in site
    assert "text/event-stream" not in " ".join(re.findall(r"gzip_types ([^;]*);", site))
    assert "proxy_set_header X-Request-ID $canvalo_request_id;" in site


def test_nginx_accepts_the_shipped_config(tmp_path: Path) -> None:
    (tmp_path / "canvalo.conf").write_text(render_site(free_port(), free_port()))
    (tmp_path / "nginx.conf").write_text(MAIN.format(tmp=tmp_path))
    result = subprocess.run(
        [nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 0, result.stderr


def test_refusals_made_by_nginx_use_the_error_envelope(tmp_path: Path, backend: LiveServer) -> None:
    upstream = int(backend.url.rsplit(":", 1)[1])
    with run_nginx(tmp_path, upstream) as url:
        too_large = httpx.post(f"{url}/api/chat/stream", content=b"x" * 300_000,
                               headers={"content-type": "application/json"}, timeout=10)
        # Burst 40 at 20 r/s: 200 requests are refused in part unless they take over 8 s, even on a busy machine.
        with httpx.Client(timeout=10) as client:
            statuses = [client.get(f"{url}/") for _ in range(200)]
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    refused = [r for r in statuses if r.status_code == 429]
    assert refused, "the edge limit never refused"
    assert refused[0].json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert refused[0].headers["retry-after"] == "1"
