"""README's commands as a newcomer pastes them: the walk-through runs as one block, and CI runs README's test command.

The walk-through is taken from README itself and run with bash against a fresh database, beside a running quick-start
server (as a newcomer has one), on a free port instead of its own 8001, with this interpreter as `.venv/bin/python`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shlex
import shutil
import subprocess
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    found = re.search(r"```bash\n(.*?)```", section, re.S)
    assert found is not None, heading
    return found.group(1)


WALK_THROUGH = fenced_block_after("## Walk-through")
QUICK_START_PORT = 8000  # the port README's quick start (python app.py) holds


def walk_through(port: int) -> str:
    """The walk-through as pasted, its own port (README's 8001) moved to ``port`` so parallel runs do not meet, and
    this interpreter as ``.venv/bin/python``."""
    assert WALK_THROUGH.count("PORT=8001") == 1 and f":{QUICK_START_PORT}" not in WALK_THROUGH
    return WALK_THROUGH.replace("PORT=8001", f"PORT={port}").replace(".venv/bin/python", sys.executable)


def run_bash(script: str, env: dict[str, str], *options: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *options, "-c", script], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_the_walk_through_runs_as_pasted_beside_the_quick_starts_server(tmp_path: Path) -> None:
    """The quick start's server still runs (on its port, with its own database here, so the answers show which
    server gave them): the walk-through starts its own beside it, talks to that one, and its kill stops it."""
    quick_port, port = free_port(), free_port()
    # The environment a newcomer's shell has: nothing set, so python app.py means API_PORT's default, which the quick
    # start's server holds (quick_port stands in for 8000 here).
    shell = {"API_PORT": str(quick_port), "LOG_LEVEL": "WARNING", "LOCAL_TOKEN_DELAY": "0"}
    quick_start = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT,
                                   env={**os.environ, **shell, "SQLITE_PATH": str(tmp_path / "quick.db")},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(f"http://127.0.0.1:{quick_port}", quick_start)
        script = "trap 'kill ${APP_PID:-} 2>/dev/null || true' EXIT\n" + walk_through(port)  # none left if a step fails
        completed = run_bash(script, {**shell, "SQLITE_PATH": str(tmp_path / "walk.db")}, "-euo", "pipefail")
        assert quick_start.poll() is None and httpx.get(f"http://127.0.0.1:{quick_port}/health").status_code == 200
    finally:
        quick_start.terminate()
        quick_start.wait(timeout=20)
    # bash -e: every step succeeded, kill $APP_PID included (its server was still there to stop).
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "already in use" not in completed.stderr
    out = completed.stdout
    assert '"status":"healthy"' in out or '"status":"degraded"' in out  # the health check ran after startup
    # The sample rows are only in the walk-through's database: its own server answered.
    assert '"type":"complete"' in out and "INV-1043" in out
    assert '"model_id":"canvalo-local-responder","calls":3' in out  # the turn's three calls, in the usage ledger
    assert '"status":"deleted"' in out
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)  # kill stopped it


def test_the_walk_throughs_wait_ends_when_its_server_cannot_start(tmp_path: Path) -> None:
    """Its port taken: the server says so in one line and stops, and the wait ends then, not never."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: the server cannot bind it, and curl is refused at once
        port = taken.getsockname()[1]
        started = time.monotonic()
        completed = run_bash(walk_through(port), {"SQLITE_PATH": str(tmp_path / "walk.db")}, timeout=30)
        took = time.monotonic() - started
    assert f"API_PORT {port} on API_HOST 127.0.0.1 is already in use" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert took < 10, took  # under the wait's 10 s alone: it stopped waiting once the server had stopped


def test_the_walk_throughs_wait_gives_up_after_ten_seconds() -> None:
    """A server that runs but never answers: the wait loop stops after its 50 tries."""
    loop = re.search(r"^for i in .*?^done$", WALK_THROUGH, re.M | re.S)
    assert loop is not None
    script = f"PORT={free_port()}\nsleep 60 & APP_PID=$!\n{loop.group(0)}\nkill $APP_PID"
    started = time.monotonic()
    completed = run_bash(script, {}, timeout=40)
    took = time.monotonic() - started
    assert completed.returncode == 0, completed.stderr
    assert 9 <= took < 25, took


def test_the_readmes_uvicorn_command_passes_what_the_image_passes() -> None:
    """The uvicorn CLI reads none of KEEP_ALIVE_SECONDS, MAX_CONNECTIONS, SHUTDOWN_GRACE_SECONDS: README's command
    must pass them as the Dockerfile's does, at the settings' defaults (uvicorn's own 5 s keep-alive is under nginx's
    60 s upstream keepalive: occasional 502s)."""
    from settings import Settings
    from tests.test_production import docker_command

    found = re.search(r"`\.venv/bin/uvicorn (app:app [^`]*)`", README)
    assert found is not None
    words = shlex.split(found.group(1))
    flags = dict(zip(words[1::2], words[2::2]))
    image = " ".join(docker_command())
    for flag in ("--http", "--timeout-keep-alive", "--limit-concurrency", "--timeout-graceful-shutdown"):
        assert flag in image and flag in flags, flag
    assert flags["--http"] == "web.tcp:NoDelayH11Protocol"
    assert float(flags["--timeout-keep-alive"]) == Settings.keep_alive_seconds
    assert int(flags["--limit-concurrency"]) == Settings.max_connections
    assert float(flags["--timeout-graceful-shutdown"]) == Settings.shutdown_grace_seconds


def test_ci_runs_the_readme_test_command_exactly() -> None:
    command = fenced_block_after("Install the test dependencies and run every test").strip()
    assert "\n" not in command  # one command
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()


FAKE_APT = """#!/bin/sh
# Records what it was asked, and prints what apt prints, so the test sees whether the script shows it.
echo "$*" >> "$APT_LOG"
case "$*" in
  *update*) echo "Hit:1 fake-mirror bookworm InRelease" ;;
  *install*) echo "Unpacking fake-package"; echo "Setting up fake-package" ;;
esac
"""


def test_the_system_package_step_says_what_it_is_doing(tmp_path: Path) -> None:
    """A fresh machine: apt-get runs for minutes, so each step is announced before it starts and apt's own progress
    lines are shown (apt-get and sudo are fakes here; chromium is "missing" because PATH has only the fakes)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("apt-get", "sudo"):
        (bin_dir / name).write_text(FAKE_APT if name == "apt-get" else '#!/bin/sh\nexec "$@"\n')
        (bin_dir / name).chmod(0o755)
    for tool in ("ls", "id"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    env = {"PATH": str(bin_dir), "APT_LOG": str(tmp_path / "apt.log")}
    completed = subprocess.run(["/bin/sh", "tests/install-system-packages.sh"], cwd=ROOT, env=env, timeout=30,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert completed.returncode == 0, completed.stdout
    lines = completed.stdout.splitlines()
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert [call.split()[0] for call in calls] == ["update", "install"] and "chromium" in calls[1]

    def before(announced: str, shown: str) -> bool:
        said = [i for i, line in enumerate(lines) if line.startswith("tests:") and announced in line]
        return bool(said) and shown in lines and said[0] < lines.index(shown)

    assert before("apt-get update", "Hit:1 fake-mirror bookworm InRelease")
    assert before("apt-get install chromium", "Unpacking fake-package")  # apt's progress is shown, not discarded
    assert "installed chromium" in lines[-1]


def _collected(*args: str) -> set[str]:
    completed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", *args],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    # Tests named by function, plus whether a variant runs on Supabase (some parameter ids are random per run).
    return {_variant(line) for line in completed.stdout.splitlines() if "::" in line}


def _variant(node: str) -> str:
    """A test run once per store has the store as its first parameter id: ``[supabase]``, ``[supabase-...]``."""
    function, _, params = node.partition("[")
    return function + ("[supabase]" if params.split("-")[0].rstrip("]") == "supabase" else "")


def _needs_chromium(node: str) -> bool:
    """Read from the test's own source: it drives a browser (the playground's fixtures, or Playwright itself)."""
    path, name = node.split("::")[0], node.split("::")[1].split("[")[0]
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    source = inspect.getsource(getattr(module, name))
    return any(word in source for word in ("watched", "browser", "sync_playwright"))


def test_the_quick_command_leaves_out_every_test_needing_postgresql_nginx_or_chromium() -> None:
    command = shlex.split(fenced_block_after("While iterating").strip())
    assert command[:4] == [".venv/bin/python", "-m", "pytest", "-q"]
    quick, every = _collected(*command[4:]), _collected()
    assert quick < every and len(quick) > len(every) / 2
    left_out = every - quick
    for node in every:
        postgresql = node.endswith("[supabase]") or node.startswith("tests/test_data_api.py")
        nginx = node.startswith("tests/test_nginx.py")
        chromium = node.startswith(("tests/test_playground.py", "tests/test_openapi.py")) and _needs_chromium(node)
        if postgresql or nginx or chromium:
            assert node in left_out, node


def test_the_layout_names_every_module_of_the_service() -> None:
    layout = README.split("## Code map", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[\w]+\.(?:py|html)", layout))
    for folder in ("services", "web"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".html") and path.name != "__init__.py" and "__pycache__" not in path.parts:
                assert path.name in named, f"README's Code map does not name {path.relative_to(ROOT)}"


def test_no_module_of_services_imports_a_layer_above_its_own_or_the_web_edge() -> None:
    """services/__init__.py lists its modules and packages from the bottom up; each may import only its own layer
    and those listed before it, and none imports the web edge, app.py, starlette or uvicorn."""
    listing = (ROOT / "services" / "__init__.py").read_text().split("from the bottom up", 1)[1]
    names = [re.split(r"\s{2,}", line.strip())[0] for line in listing.splitlines() if line.startswith("    ")]
    order = [name for column in names for name in re.findall(r"(\w+)(?:\.py|/)", column)]
    assert {"store", "model", "agents", "runs"} <= set(order)
    for path in (ROOT / "services").rglob("*.py"):
        layer = path.relative_to(ROOT / "services").parts[0].removesuffix(".py")
        if layer == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top, _, rest = module.partition(".")
                assert top not in ("web", "app", "starlette", "uvicorn"), f"{path.relative_to(ROOT)} imports {module}"
                if top == "services" and rest:
                    other = rest.split(".")[0]
                    assert other == layer or order.index(other) < order.index(layer), \
                        f"{path.relative_to(ROOT)} ({layer}) imports {module}, a layer above it"


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation but hyphens dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_every_link_between_readme_and_docs_reaches_its_file_and_heading() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1  # README links its reference pages under docs/
    for page in pages:
        for target, anchor in re.findall(r"\]\((?!https?:)([^)#\s]*)(?:#([\w\-]+))?\)", page.read_text()):
            linked = (page.parent / target).resolve() if target else page
            assert linked.exists(), f"{page.name} links to a missing {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked.read_text()), f"{page.name} links to {target}#{anchor}: no such heading"
