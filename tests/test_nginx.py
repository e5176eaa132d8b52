"""The shipped nginx site config (deploy/nginx/canvalo.conf), run by a real nginx on 127.0.0.1 in front of the service.

The config file is used as shipped; only its two addresses (listen and upstream) are substituted (and, for its HTTPS
variant, the certificate's directory, with its "#tls " lines uncommented). A negative
control runs the same file with its two safeguards undone (buffering forced on despite X-Accel-Buffering, and gzip
applied to text/event-stream) and shows the test would notice: tokens then arrive in one burst at the end. On
nginx 1.22 either safeguard alone is enough to keep this stream incremental, so the control undoes both.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.responses import JSONResponse

from app import create_app
from settings import Settings
from tests.scripted_model import ScriptedModel
from tests.support import LiveServer, free_port, make_settings, new_id, serve

pytestmark = pytest.mark.system  # a real nginx

SITE = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "canvalo.conf"
PIECES, PAUSE = 12, 0.1  # the answer takes about 1.1 s to produce

MAIN = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections {connections}; }}
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


def render_site(
    upstream_port: int, listen_port: int, *, undo: tuple[tuple[str, str], ...] = (), tls: Path | None = None
) -> str:
    """The shipped file with only its addresses changed (and every ``undo`` pair replaced wherever it occurs); fails if
    the file no longer has exactly one upstream and one listen, or lacks something to undo.

    ``tls``: the HTTPS variant the file describes, its "#tls " lines uncommented (with the certificate and key in
    that directory): the server on ``listen_port`` + 1 over TLS, the redirect on ``listen_port``."""
    site = SITE.read_text()
    listen = "\n    listen 80;\n"
    assert site.count("server 127.0.0.1:8000;") == 1 and site.count(listen) == 1
    site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
    if tls is None:
        site = site.replace(listen, f"\n    listen 127.0.0.1:{listen_port};\n")
    else:
        site = site.replace(listen, "\n").replace("#tls ", "")
        assert site.count("listen 443 ssl http2;") == 1 and site.count(listen) == 1  # the redirect's
        site = site.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{listen_port + 1} ssl http2;")
        site = site.replace(listen, f"\n    listen 127.0.0.1:{listen_port};\n")
        site = site.replace("/etc/letsencrypt/live/chat.example.com", str(tls))
    for shipped, replacement in undo:
        assert site.count(shipped) >= 1, shipped
        site = site.replace(shipped, replacement)
    return site


@contextlib.contextmanager
def run_nginx(
    tmp_path: Path,
    upstream_port: int,
    *,
    undo: tuple[tuple[str, str], ...] = (),
    connections: int = 64,
    tls: Path | None = None,
) -> Iterator[str]:
    port = free_port_pair() if tls is not None else free_port()
    (tmp_path / "canvalo.conf").write_text(render_site(upstream_port, port, undo=undo, tls=tls))
    (tmp_path / "nginx.conf").write_text(MAIN.format(tmp=tmp_path, connections=connections))
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


def free_port_pair() -> int:
    """A port on 127.0.0.1 such that it and the next one are free now (plain HTTP and HTTPS)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise AssertionError("no two free adjacent ports")


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
    assert "limit_conn canvalo_conn_per_address" in site and "\n    server_tokens off;" in site
    assert "text/event-stream" not in " ".join(re.findall(r"gzip_types ([^;]*);", site))
    assert "proxy_set_header X-Request-ID $canvalo_request_id;" in site


def test_nginx_accepts_the_shipped_config(tmp_path: Path) -> None:
    (tmp_path / "canvalo.conf").write_text(render_site(free_port(), free_port()))
    (tmp_path / "nginx.conf").write_text(MAIN.format(tmp=tmp_path, connections=64))
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


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/conversations?user_id=x"), ("POST", "/api/chat/stream")])
def test_an_unreachable_service_is_answered_in_the_envelope_with_retry_after(
    tmp_path: Path, method: str, path: str
) -> None:
    """Every restart closes the service's port for a moment: nginx's own 502 must be a retryable envelope too."""
    with run_nginx(tmp_path, free_port()) as url:  # nothing listens on the upstream port
        response = httpx.request(method, url + path, json={} if method == "POST" else None, timeout=10)
    assert response.status_code == 503 and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "SERVICE_UNAVAILABLE" and error["retryable"] is True
    assert response.headers["retry-after"] == str(error["retryAfter"])


def test_the_services_own_5xx_pass_through_nginx_unchanged(tmp_path: Path) -> None:
    """Only nginx's own 5xx are replaced: the service's 503 keeps its code and Retry-After."""
    envelope = {"error": {"code": "STORE_UNAVAILABLE", "retryable": True, "retryAfter": 2}}

    async def unavailable(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await JSONResponse(envelope, status_code=503, headers={"Retry-After": "2"})(scope, receive, send)

    with serve(unavailable) as live, run_nginx(tmp_path, int(live.url.rsplit(":", 1)[1])) as url:
        response = httpx.get(f"{url}/api/conversations", timeout=10)
    assert response.status_code == 503 and response.json() == envelope and response.headers["retry-after"] == "2"


# -- README's steps on Debian's stock nginx ----------------------------------------------------------------------------

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
STOCK = Path("/etc/nginx")  # the nginx package's own configuration (tests/install-system-packages.sh installs it)


def stock_debian_nginx(root: Path, port: int) -> Path:
    """Debian's stock configuration copied under ``root``: its nginx.conf (which includes conf.d/*.conf, then
    sites-enabled/*) and its default site, enabled. Only what cannot be used here is moved: paths under /etc/nginx,
    the pid and log files, and port 80 (to 127.0.0.1:``port``; the IPv6 listen is dropped). Fails if a line to move
    is not there: then this is not Debian's layout."""
    etc = root / "etc" / "nginx"
    etc.mkdir(parents=True)
    shutil.copy(STOCK / "mime.types", etc)
    shutil.copytree(STOCK / "modules-enabled", etc / "modules-enabled", symlinks=True)
    for empty in ("conf.d", "sites-available", "sites-enabled"):
        (etc / empty).mkdir()
    (etc / "sites-enabled" / "default").symlink_to(etc / "sites-available" / "default")
    moved = {
        "nginx.conf": [("/etc/nginx/", f"{etc}/"), ("pid /run/nginx.pid;", f"pid {root}/nginx.pid;"),
                       ("/var/log/nginx/", f"{root}/"),
                       # Temporary files where this user can write them (the package's are root's).
                       ("http {", f"http {{ client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;")],
        "sites-available/default": [("listen 80 default_server;", f"listen 127.0.0.1:{port} default_server;"),
                                    ("listen [::]:80 default_server;", "")],
    }
    for name, replacements in moved.items():
        text = (STOCK / name).read_text()
        for stock, here in replacements:
            assert stock in text, f"{STOCK / name} has no {stock!r}: not Debian's stock nginx"
            text = text.replace(stock, here)
        (etc / name).write_text(text)
    return etc


def nginx_steps(etc: Path, site: Path) -> str:
    """README's steps, with /etc/nginx at ``etc``, the shipped file as ``site`` (its addresses set), no sudo, and no
    systemctl: the test starts nginx itself once the steps have run."""
    steps = README.split("**nginx.**", 1)[1]
    found = re.search(r"```bash\n(.*?)```", steps, re.S)
    assert found is not None
    script = found.group(1).replace("/etc/nginx", str(etc)).replace("deploy/nginx/canvalo.conf", str(site))
    script = script.replace("nginx -t", f"{nginx_binary()} -e {etc.parent.parent}/error.log -c {etc}/nginx.conf -t")
    assert "systemctl reload nginx" in script
    return script.replace("systemctl reload nginx", "true").replace("sudo ", "")


def health_through(etc: Path, port: int) -> tuple[httpx.Response, httpx.Response]:
    """nginx started on ``etc``'s configuration: /health asked as 127.0.0.1 and as the API's host name."""
    process = subprocess.Popen([nginx_binary(), "-e", f"{etc.parent.parent}/error.log", "-c", str(etc / "nginx.conf"),
                                "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            assert process.poll() is None and time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/health"
        return httpx.get(url, timeout=10), httpx.get(url, headers={"Host": "chat.example.com"}, timeout=10)
    finally:
        process.send_signal(signal.SIGQUIT)
        process.wait(timeout=10)


def test_readmes_steps_on_stock_debian_nginx_serve_the_api(tmp_path: Path, backend: LiveServer) -> None:
    port = free_port()
    etc = stock_debian_nginx(tmp_path, port)
    site = tmp_path / "canvalo.conf"
    site.write_text(render_site(int(backend.url.rsplit(":", 1)[1]), port))
    steps = subprocess.run(["bash", "-euo", "pipefail", "-c", nginx_steps(etc, site)], capture_output=True, text=True,
                           timeout=30)
    assert steps.returncode == 0, steps.stderr
    assert "test is successful" in steps.stderr and "conflicting server name" not in steps.stderr, steps.stderr
    for answer in health_through(etc, port):
        assert answer.status_code == 200 and answer.json()["status"] in ("healthy", "degraded"), answer.text


def test_negative_control_the_site_in_conf_d_loses_to_debians_default_site(tmp_path: Path, backend: LiveServer) -> None:
    """What README said before: the file in conf.d/, the default site left enabled. nginx's welcome site answers."""
    port = free_port()
    etc = stock_debian_nginx(tmp_path, port)
    (etc / "conf.d" / "canvalo.conf").write_text(render_site(int(backend.url.rsplit(":", 1)[1]), port))
    checked = subprocess.run([nginx_binary(), "-e", f"{tmp_path}/error.log", "-c", str(etc / "nginx.conf"), "-t"],
                             capture_output=True, text=True, timeout=30)
    assert "conflicting server name" in checked.stderr
    for answer in health_through(etc, port):
        assert answer.status_code == 404 and "nginx" in answer.text


# -- one client cannot hold the edge ---------------------------------------------------------------------------------

ATTACKER = "127.0.0.2"  # one client address; the well-behaved client connects from 127.0.0.1


def half_sent_request(url: str) -> socket.socket:
    """From ATTACKER: a whole head promising a 1000-byte body, and one byte of it."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.bind((ATTACKER, 0))
    sock.connect((host, int(port)))
    sock.sendall(b"POST /api/conversations HTTP/1.1\r\nHost: canvalo\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{")
    return sock


def answer_now(sock: socket.socket) -> bytes | None:
    """How nginx has answered ``sock`` so far: None (not yet), a status line, b"" (closed) or b"reset" (reset, as
    nginx does to a connection it has no room for); waits for nothing."""
    if not select.select([sock], [], [], 0)[0]:
        return None
    try:
        return sock.recv(12, socket.MSG_PEEK)
    except OSError:
        return b"reset"


def keep_sending(held: list[socket.socket]) -> None:
    """One more body byte on each held request, so client_body_timeout (between two reads) never ends it."""
    for sock in held:
        with contextlib.suppress(OSError):
            sock.sendall(b" ")


def test_one_address_holding_half_sent_requests_does_not_lock_out_another_client(
    tmp_path: Path, backend: LiveServer
) -> None:
    limit_match = re.search(r"limit_conn canvalo_conn_per_address (\d+);", SITE.read_text())
    assert limit_match is not None
    limit = int(limit_match.group(1))
    extra = 18
    upstream = int(backend.url.rsplit(":", 1)[1])
    # nginx here has room for the limit and a few more connections, not for everything the one address attempts.
    held: list[socket.socket] = []
    answers: list[bytes] = []
    served = 0

    def drop_answered() -> None:
        # A client whose request was answered goes away (nginx would otherwise linger on it up to lingering_timeout,
        # 5 s, for the rest of the body).
        for sock in list(held):
            answer = answer_now(sock)
            if answer is not None:
                answers.append(answer)
                held.remove(sock)
                sock.close()

    with run_nginx(tmp_path, upstream, connections=limit + 16) as url:
        try:
            for i in range(limit + extra):
                held.append(half_sent_request(url))
                if i >= 30:
                    time.sleep(0.06)  # within limit_req's 20 r/s once its burst is used: only limit_conn may refuse
                drop_answered()
            deadline = time.monotonic() + 5
            while len(answers) < extra and time.monotonic() < deadline:
                drop_answered()
                keep_sending(held)
                time.sleep(0.2)
            for _ in range(3):
                keep_sending(held)
                with contextlib.suppress(httpx.TransportError):
                    served += httpx.get(f"{url}/health", timeout=3).status_code == 200
        finally:
            for sock in held:
                sock.close()
    assert answers == [b"HTTP/1.1 429"] * extra and len(held) == limit
    assert served == 3


def test_nginx_names_no_version(tmp_path: Path, backend: LiveServer) -> None:
    version = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr.strip().rsplit("/", 1)[-1]
    upstream = int(backend.url.rsplit(":", 1)[1])
    with run_nginx(tmp_path, upstream) as url:
        proxied = httpx.get(f"{url}/health")
        refused_here = httpx.get(f"{url}/metrics")  # nginx's own error page
    assert proxied.status_code == 200 and refused_here.status_code == 404
    for response in (proxied, refused_here):
        assert response.headers["server"] == "nginx"
    assert version and version not in refused_here.text


def test_the_https_variant_serves_tls_with_hsts_and_redirects_plain_http(tmp_path: Path, backend: LiveServer) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(certs / "privkey.pem"),
         "-out", str(certs / "fullchain.pem")],
        check=True, capture_output=True, timeout=60,
    )
    upstream = int(backend.url.rsplit(":", 1)[1])
    with run_nginx(tmp_path, upstream, tls=certs) as url:
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(verify=ssl.create_default_context(cafile=certs / "fullchain.pem"), timeout=10) as client:
            secure = client.get(f"https://127.0.0.1:{port + 1}/health")
            too_large = client.post(f"https://127.0.0.1:{port + 1}/api/chat/stream", content=b"x" * 300_000,
                                    headers={"content-type": "application/json"})
        plain = httpx.get(f"{url}/health?probe=1", timeout=10)
    assert secure.status_code == 200 and secure.json()["status"] in ("healthy", "degraded")
    assert secure.headers["strict-transport-security"] == "max-age=31536000"
    assert too_large.status_code == 413 and too_large.headers["strict-transport-security"] == "max-age=31536000"
    assert plain.status_code == 301 and plain.headers["location"] == "https://127.0.0.1/health?probe=1"


def test_metrics_stay_refused_at_the_edge_however_the_path_is_spelt(tmp_path: Path) -> None:
    """A router whose patterns end in "$" (Starlette's, which also matches before a final newline) serves
    "/metrics%0A" as /metrics. The service now matches whole paths only; nginx must refuse every spelling anyway,
    whatever the upstream does: here an upstream that answers metrics on every path."""

    async def metrics_everywhere(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"canvalo_requests_total 1\n"})

    token = "metrics-token-0123456789"
    with serve(create_app(make_settings(tmp_path, METRICS_TOKEN=token))) as service:
        assert httpx.get(f"{service.url}/metrics%0A", headers={"Authorization": f"Bearer {token}"}).status_code == 404
    with serve(metrics_everywhere) as live:
        assert httpx.get(f"{live.url}/metrics%0A").status_code == 200
        with run_nginx(tmp_path, int(live.url.rsplit(":", 1)[1])) as url:
            spellings = ("/metrics", "/metrics%0A", "/metrics%0a", "/%6detrics%0A", "//metrics%0A", "/metrics%0A?x=1")
            answers = {path: httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {token}"})
                       for path in spellings}
    assert {path: answer.status_code for path, answer in answers.items()} == dict.fromkeys(spellings, 404)
    assert not any("canvalo_" in answer.text for answer in answers.values())
