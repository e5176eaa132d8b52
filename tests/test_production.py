"""Production readiness: startup validation, nothing secret in /health or the logs, and the Docker image's command.

The image cannot be built here (no Docker daemon), so the Dockerfile is checked for what it must contain and its
exact CMD is run locally: two uvicorn workers, the settings it expands, and SIGTERM during an open stream.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.testclient import TestClient

from app import create_app
from services.store.sqlite.store import SQLiteStore
from settings import ConfigError, Settings
from tests.support import chunks, free_port, make_settings, new_id, wait_until_healthy
from tests.tokens import TEST_JWT_SECRET, bearer, mint

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
GOOD_PRODUCTION = {
    "ENVIRONMENT": "production",
    "STORE": "supabase",
    "SUPABASE_URL": "https://project.supabase.co",
    "SUPABASE_PUBLISHABLE_KEY": "sb_publishable_x",
    "SUPABASE_JWT_SECRET": TEST_JWT_SECRET,
    "SUPABASE_RUN_SECRET": "r" * 32,
    "LLM_PROVIDER": "bedrock",
    "CORS_ORIGINS": "https://app.canvalo.example",
}


def test_a_complete_production_configuration_starts() -> None:
    Settings.from_environ(GOOD_PRODUCTION)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"CORS_ORIGINS": ""}, "CORS_ORIGINS"),  # empty falls back to the localhost defaults
        ({"CORS_ORIGINS": "*"}, "CORS_ORIGINS"),
        ({"CORS_ORIGINS": "https://app.canvalo.example,http://localhost:3000"}, "CORS_ORIGINS"),
        ({"LLM_PROVIDER": "local"}, "LLM_PROVIDER=bedrock"),
        ({"STORE": "sqlite"}, "STORE=supabase"),
        ({"SUPABASE_JWT_SECRET": "", "SUPABASE_URL": "", "STORE": "sqlite"}, "requires authentication"),
        ({"METRICS_TOKEN": "short"}, "METRICS_TOKEN"),
        ({"SUPABASE_RUN_SECRET": ""}, "SUPABASE_RUN_SECRET"),
        ({"SUPABASE_RUN_SECRET": "r" * 31}, "SUPABASE_RUN_SECRET, at least 32 characters"),
    ],
)
def test_production_names_each_problem(change: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        Settings.from_environ({**GOOD_PRODUCTION, **change})


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_environ({"ENVIRONMENT": "production"})
    message = str(caught.value)
    # What the Supabase store needs is named now too, not in a second round once STORE=supabase is set.
    names = ("SUPABASE_JWT_SECRET", "SUPABASE_URL", "SUPABASE_PUBLISHABLE_KEY", "SUPABASE_RUN_SECRET", "CORS_ORIGINS",
             "LLM_PROVIDER", "STORE")
    assert all(name in message for name in names), message


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RATE_LIMIT_CHAT_PER_MINUTE", "0"), ("RATE_LIMIT_API_PER_MINUTE", "0"), ("MAX_STREAMS_PER_USER", "0"),
     ("RATE_LIMIT_WINDOW_SECONDS", "0")],
)
def test_limit_settings_are_checked(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_environ({variable: value})


def test_health_and_logs_reveal_no_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics_token = "metrics-token-secret-4242"
    user = new_id()
    token = mint(user)
    settings = make_settings(tmp_path, SUPABASE_JWT_SECRET=TEST_JWT_SECRET, METRICS_TOKEN=metrics_token, LOG_LEVEL="DEBUG")
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(settings)) as client:
        health = client.get("/health")
        client.get("/api/conversations", params={"user_id": user}, headers=bearer(token))
        client.get("/api/conversations", params={"user_id": user}, headers=bearer(token + "tampered"))
        client.post("/api/chat/stream", headers=bearer(token),
                    json={"message": "my secret plan", "conversation_id": new_id(), "user_id": user})
        client.get("/metrics", headers={"Authorization": f"Bearer {metrics_token}"})
    assert health.status_code == 200
    for secret in (TEST_JWT_SECRET, metrics_token, token):
        assert secret not in health.text
    client_side = ("httpx", "httpcore")  # the test's own HTTP client logs its URLs; the service is what is checked
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(client_side))
    assert "/api/conversations 200" in logged  # the access line is there ...
    for secret in (TEST_JWT_SECRET, metrics_token, token, token.split(".")[2], "my secret plan", user):
        assert secret not in logged  # ... without tokens, keys, message text or the query string


# -- the Docker image ----------------------------------------------------------------------------------------------


def docker_command() -> list[str]:
    found = re.search(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.M)
    assert found is not None
    return json.loads(found.group(1))  # type: ignore[no-any-return]


def test_dockerfile_is_slim_non_root_with_a_health_check() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    user = re.search(r"^USER (\S+)$", text, re.M)
    assert user is not None and user.group(1) not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    command = " ".join(docker_command())
    assert "exec uvicorn app:app" in command and "--timeout-graceful-shutdown" in command
    assert "--limit-concurrency" in command and "--timeout-keep-alive" in command
    assert "tests/" in (ROOT / ".dockerignore").read_text() and ".env" in (ROOT / ".dockerignore").read_text()


def test_the_image_command_serves_with_two_workers_and_drains_on_sigterm(tmp_path: Path) -> None:
    """The Dockerfile's CMD as is: SIGTERM mid-stream ends the stream with a retryable error after the grace."""
    database = str(tmp_path / "canvalo.db")

    async def migrate() -> None:  # the file is created once, before two workers open it
        store = SQLiteStore(database)
        await store.open()
        await store.aclose()

    anyio.run(migrate)
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}",  # uvicorn of this interpreter
        "API_HOST": "127.0.0.1", "API_PORT": str(port), "SQLITE_PATH": database,
        "METRICS_DIR": str(tmp_path / "metrics"), "SHUTDOWN_GRACE_SECONDS": "1", "WEB_CONCURRENCY": "2",
        "LOCAL_TOKEN_DELAY": "0.2", "LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(docker_command(), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)  # the image command started
        body = {"message": "hello", "conversation_id": new_id(), "user_id": new_id(), "history": []}
        received = b""
        with httpx.stream("POST", f"{url}/api/chat/stream", json=body, timeout=20) as response:
            pieces = response.iter_bytes()
            received += next(pieces)
            process.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1 (exec'd uvicorn)
            signalled = time.monotonic()
            received += b"".join(pieces)
            ended_after = time.monotonic() - signalled
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    items = chunks(received.decode())
    assert items[-1]["type"] == "error" and items[-1]["code"] == "SERVER_SHUTTING_DOWN" and items[-1]["retryable"]
    assert 0.8 <= ended_after < 5  # the grace period passed, then the stream was ended rather than left running


def test_the_image_command_exits_2_on_an_invalid_setting_before_uvicorn_starts(tmp_path: Path) -> None:
    """With two workers (as the image runs), a worker refusing a setting only makes uvicorn's parent exit 0, which an
    orchestrator reports as a completed container: the command checks the settings before uvicorn starts."""
    env = {
        **dockerfile_env(),
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",
        "API_HOST": "127.0.0.1", "API_PORT": str(free_port()), "SQLITE_PATH": str(tmp_path / "canvalo.db"),
        "METRICS_DIR": str(tmp_path / "metrics"), "LOG_LEVEL": "verbose",
    }
    done = subprocess.run(docker_command(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, f"exit status {done.returncode}: {done.stderr[-300:]}"
    assert done.stderr.strip() == "canvalo: LOG_LEVEL must be one of: DEBUG, INFO, WARNING, ERROR"  # one line
    assert "Uvicorn running" not in done.stderr and not (tmp_path / "canvalo.db").exists()


def dockerfile_env() -> dict[str, str]:
    """The image's environment: every ``ENV`` instruction's KEY=VALUE pairs (continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    pairs = [item for line in re.findall(r"^ENV (.+)$", text, re.M) for item in shlex.split(line)]
    return dict(pair.split("=", 1) for pair in pairs)


def readme_development_run() -> list[str]:
    """README's ``docker run`` without an env file: the image tried locally."""
    readme = (ROOT / "README.md").read_text()
    runs = [shlex.split(line) for line in re.findall(r"^docker run .*$", readme, re.M) if "--env-file" not in line]
    assert len(runs) == 1, runs
    return runs[0]


def test_the_image_runs_on_the_embedded_default_without_an_env_file(tmp_path: Path) -> None:
    """README's development ``docker run``: the image's CMD with the image's environment and only what that command
    adds (no -e, no .env): it starts in development on SQLite in the volume, with the local responder. Run here
    without Docker: the volume is a fresh directory, and the container's port a free one on 127.0.0.1."""
    run = readme_development_run()
    assert run[-1] == "canvalo-chat" and "-e" not in run and "--env" not in run
    image = dockerfile_env()
    published = run[run.index("-p") + 1]
    assert published.startswith("127.0.0.1:") and published.endswith(f":{image['API_PORT']}")  # this machine only
    volume = run[run.index("-v") + 1].split(":")[1]
    assert image["SQLITE_PATH"].startswith(volume + "/")
    port = free_port()
    env = {
        **image,
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",  # uvicorn of this interpreter; nothing else set
        "API_HOST": "127.0.0.1", "API_PORT": str(port),  # the container's 0.0.0.0:8000, here
        "SQLITE_PATH": image["SQLITE_PATH"].replace(volume, str(tmp_path / "volume")),
        "METRICS_DIR": str(tmp_path / "metrics"),
    }
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "old-worker.json").write_text("{}")  # a previous run's snapshot: deleted
    (tmp_path / "metrics" / "kept.db").write_text("x")  # anything else an operator keeps there: not
    process = subprocess.Popen(docker_command(), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        health = httpx.get(f"{url}/health", timeout=10).json()
        playground = httpx.get(f"{url}/playground", timeout=10)
        body = {"message": "hello", "conversation_id": new_id(), "user_id": new_id()}
        answer = httpx.post(f"{url}/api/chat/stream", json=body, timeout=20)
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=30)
    assert health["environment"] == "development" and health["store"]["kind"] == "sqlite"
    assert health["model"]["provider"] == "local" and health["auth"]["mode"] == "none"
    assert playground.status_code == 200
    assert answer.status_code == 200 and chunks(answer.text)[-1]["type"] == "complete"
    assert (tmp_path / "volume" / "canvalo.db").is_file()  # the data is in the volume
    assert (tmp_path / "metrics" / "kept.db").is_file() and not (tmp_path / "metrics" / "old-worker.json").exists()
    assert "Traceback" not in errors
