"""Operator review: reproductions of what an operator or newcomer trips on. Each test asserts the documented or
expected behaviour, so each FAILS on the code as reviewed (9aa61b9).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from settings import ConfigError, Settings
from tests.support import chunks, free_port, new_id, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATE_", "METRICS_", "SHUTDOWN_"))}
    env.update(API_HOST="127.0.0.1", API_PORT=str(port), SQLITE_PATH=str(tmp_path / "canvalo.db"), **extra)
    env["PATH"] = f"{os.path.dirname(PY)}:{env.get('PATH', '')}"
    return env


def _image_cmd() -> list[str]:
    found = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert found
    return json.loads(found.group(1))


# 1. A stream cut at the end of the shutdown grace period logs an ERROR with a traceback (README: Ctrl-C stops it
#    "quietly"; docs/operations.md Shutdown describes it as the normal path).
def test_sigterm_during_a_stream_logs_no_traceback(tmp_path: Path) -> None:
    port = free_port()
    env = _env(tmp_path, port, SHUTDOWN_GRACE_SECONDS="1", LOCAL_TOKEN_DELAY="0.3")
    process = subprocess.Popen([PY, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        body = {"message": "What invoices do I have?", "conversation_id": new_id(), "user_id": new_id()}
        with httpx.stream("POST", f"{url}/api/chat/stream", json=body, timeout=20) as response:
            pieces = response.iter_bytes()
            received = next(pieces)
            process.send_signal(signal.SIGTERM)
            received += b"".join(pieces)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
    assert chunks(received.decode())[-1]["code"] == "SERVER_SHUTTING_DOWN"  # the client side is right ...
    assert "Exception in ASGI application" not in errors and "Traceback" not in errors, errors[-1500:]  # ... the log not


# 2. The Docker image's command (WEB_CONCURRENCY=2, as the image sets it) exits 0 on an invalid setting; README says an
#    invalid value stops startup (exit status 2 for SQLITE_PATH and cost budgets). Docker/Kubernetes see "Completed".
def test_the_image_command_exits_non_zero_on_an_invalid_setting(tmp_path: Path) -> None:
    (tmp_path / "metrics").mkdir()
    env = _env(tmp_path, free_port(), METRICS_DIR=str(tmp_path / "metrics"), SHUTDOWN_GRACE_SECONDS="20",
               MAX_CONNECTIONS="10000", KEEP_ALIVE_SECONDS="75", WEB_CONCURRENCY="2",
               FORWARDED_ALLOW_IPS="127.0.0.1", LOG_LEVEL="verbose")
    done = subprocess.run(_image_cmd(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "LOG_LEVEL must be one of" in done.stderr
    assert done.returncode == 2, f"exit status {done.returncode}"


# 3. An unusable METRICS_DIR is accepted; each worker then logs a WARNING every second, forever, naming neither the
#    variable nor the path. SQLITE_PATH gets a one-line refusal at startup; METRICS_DIR should too.
def test_an_unwritable_metrics_dir_stops_startup_naming_it(tmp_path: Path) -> None:
    env = _env(tmp_path, free_port(), METRICS_DIR="/proc/no-such-dir")
    process = subprocess.Popen([PY, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        status = process.wait(timeout=4)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
        warnings = errors.count("Could not write the metrics snapshot")
        pytest.fail(f"started anyway; {warnings} warnings in 4 s, naming METRICS_DIR: {'METRICS_DIR' in errors}")
    assert status == 2


# 4. Documented settings that are never checked: a negative/zero/NaN Bedrock timeout starts (every call then times
#    out), and SHUTDOWN_GRACE_SECONDS=inf passes validation and then crashes with a traceback (exit 1).
@pytest.mark.parametrize(
    ("variable", "value"),
    [("BEDROCK_CONNECT_TIMEOUT", "-5"), ("BEDROCK_FIRST_EVENT_TIMEOUT", "0"), ("BEDROCK_IDLE_TIMEOUT", "nan"),
     ("SHUTDOWN_GRACE_SECONDS", "inf"), ("RUN_EVENTS_TTL", "inf"), ("SUPABASE_TIMEOUT", "inf")],
)
def test_documented_numeric_settings_are_checked(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_environ({"LLM_PROVIDER": "bedrock", variable: value})


def test_infinite_grace_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    env = _env(tmp_path, free_port(), SHUTDOWN_GRACE_SECONDS="inf")
    done = subprocess.run([PY, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-400:]


# 5. Connections the per-address cap closes leave no trace in the service: no log line, no metric. Behind a proxy
#    that is not in FORWARDED_ALLOW_IPS (the image's default 127.0.0.1 never matches nginx outside the container),
#    users see nginx 502s and the service log shows nothing.
def test_a_connection_closed_by_the_per_address_cap_is_logged(tmp_path: Path) -> None:
    port = free_port()
    env = _env(tmp_path, port, MAX_CONNECTIONS_PER_ADDRESS="1", FORWARDED_ALLOW_IPS="10.9.9.9")
    process = subprocess.Popen([PY, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process)
        held = socket.create_connection(("127.0.0.1", port))
        refused = socket.create_connection(("127.0.0.1", port))
        refused.settimeout(5)
        assert refused.recv(1) == b""  # closed at once: the cap works
        held.close()
        refused.close()
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
    assert re.search(r"MAX_CONNECTIONS_PER_ADDRESS|per.address", errors, re.I), "nothing logged for the refusal"


# 6. A second Ctrl-C ("CTRL+C to force quit", as uvicorn prints) during a stream: uvicorn says "Finished server
#    process", then the process hangs 30 s (FINAL_SAVE_SECONDS), prints tracebacks, and leaves the run 'running'.
def test_a_second_ctrl_c_quits_promptly(tmp_path: Path) -> None:
    port = free_port()
    env = _env(tmp_path, port, LOCAL_TOKEN_DELAY="0.5")
    process = subprocess.Popen([PY, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        body = {"message": "What invoices do I have?", "conversation_id": new_id(), "user_id": new_id()}
        with httpx.stream("POST", f"{url}/api/chat/stream", json=body, timeout=60) as response:
            pieces = response.iter_bytes()
            next(pieces)
            os.killpg(process.pid, signal.SIGINT)
            time.sleep(1)
            os.killpg(process.pid, signal.SIGINT)
            forced = time.monotonic()
            b"".join(pieces)
            status = process.wait(timeout=60)
            took = time.monotonic() - forced
    finally:
        if process.poll() is None:
            process.kill()
        _, errors = process.communicate(timeout=30)
    assert status == 130
    assert took < 10, f"exited {took:.0f} s after the second Ctrl-C; log tail: {errors[-300:]}"


# 7. nginx in front of a stopped or restarting service: its 502 is nginx's HTML page, not the service's envelope
#    (README: "its own refusals (413, 429) use the service's error envelope" -- 502/503/504 are not covered, and
#    every restart hits them: uvicorn closes its listening socket at SIGTERM, before the grace period).
@pytest.mark.system
@pytest.mark.parametrize(("method", "path"), [("GET", "/api/conversations?user_id=x"), ("POST", "/api/chat/stream")])
def test_nginx_answers_an_unreachable_upstream_in_the_envelope(tmp_path: Path, method: str, path: str) -> None:
    from tests.test_nginx import run_nginx

    closed = free_port()  # nothing listens here: the service is down or restarting
    with run_nginx(tmp_path, closed) as edge:
        response = httpx.request(method, edge + path, json={} if method == "POST" else None, timeout=10)
    assert response.status_code in (502, 503)
    assert response.headers["content-type"].startswith("application/json"), response.text[:120]
    error = response.json()["error"]
    assert error["retryable"] is True and "Retry-After" in response.headers
