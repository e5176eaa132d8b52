"""README's commands as a newcomer pastes them: the walk-through runs as one block, and CI runs README's test command.

The walk-through is taken from README itself and run with bash against a fresh database, on a free port instead of
8000 (so a service already running here does not answer for it), with this interpreter as `.venv/bin/python`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    found = re.search(r"```bash\n(.*?)```", section, re.S)
    assert found is not None, heading
    return found.group(1)


def test_the_walk_through_runs_as_pasted(tmp_path: Path) -> None:
    port = free_port()
    script = fenced_block_after("## Walk-through").replace("localhost:8000", f"localhost:{port}")
    script = script.replace(".venv/bin/python", sys.executable)
    script = "trap 'kill ${APP_PID:-} 2>/dev/null || true' EXIT\n" + script  # no server left behind if a step fails
    env = {**os.environ, "API_PORT": str(port), "SQLITE_PATH": str(tmp_path / "canvalo.db"), "LOG_LEVEL": "WARNING",
           "LOCAL_TOKEN_DELAY": "0"}
    completed = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    out = completed.stdout
    assert '"status":"healthy"' in out or '"status":"degraded"' in out  # the health check ran after startup
    assert '"type":"complete"' in out and "INV-1043" in out  # the answer came from the sample rows
    assert '"status":"deleted"' in out


def test_ci_runs_the_readme_test_command_exactly() -> None:
    command = fenced_block_after("Install the test dependencies and run every test").strip()
    assert "\n" not in command  # one command
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()


def test_the_layout_names_every_module_of_the_service() -> None:
    layout = README.split("## Code map", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[\w]+\.(?:py|html)", layout))
    for folder in ("services", "web"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".html") and path.name != "__init__.py" and "__pycache__" not in path.parts:
                assert path.name in named, f"README's Code map does not name {path.relative_to(ROOT)}"


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
