"""The benchmark's smoke mode, so ``bench/run.py`` cannot rot between manual full runs.

Runs ``python bench/run.py --smoke`` (a few streams per figure, on 127.0.0.1 only) for the service, the floor and the
relay floor (``bench/relay_floor_app.py``, which relays the fake Bedrock), and for the production target (the service
on PostgREST and PostgreSQL), and checks that every figure produced numbers; no figure's speed is judged here. The
baseline is not part of smoke mode: it needs its own virtual environment (bench/.venv-baseline with FastAPI and
boto3), which only the full run creates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_bench_smoke_runs_every_figure_for_service_floor_and_relay_floor(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--targets", "service,floor,relay", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert "1. TTFT, one stream, p50" in completed.stdout and "relay floor" in completed.stdout
    assert "not judged in a smoke run" in completed.stdout and "[MISS]" not in completed.stdout
    [document] = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    results = document["results"]
    assert set(results) == {"service", "floor", "relay"}
    for target in ("service", "floor", "relay"):
        figures = results[target]
        assert set(figures) == {"ttft", "relay", "streams_5", "api"}
        assert figures["ttft"]["ok"] == figures["ttft"]["requests"] > 0
        assert figures["relay"]["ok"] == figures["relay"]["streams"] and figures["relay"]["tokens"] > 0
        assert figures["streams_5"]["completed"] == 5 and not figures["streams_5"]["errors"]
        assert figures["api"]["list_rps"] > 0 and figures["api"]["get_rps"] > 0
        assert figures["api"]["list_failed"] == figures["api"]["get_failed"] == 0


@pytest.mark.system  # PostgreSQL
def test_bench_smoke_runs_every_production_figure_beside_the_sqlite_service(tmp_path: Path) -> None:
    """``--targets production``: PostgreSQL, the PostgREST stand-in and the service on them start and stop, every
    production figure produces numbers, and the SQLite service runs the figures they are compared with."""
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--targets", "production", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert "PostgREST requests per turn" in completed.stdout and "[MISS]" not in completed.stdout
    [document] = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    results = document["results"]
    assert set(results) == {"service", "production"}
    assert set(results["service"]) == {"ttft", "streams_5"}
    assert set(results["production"]) == {"ttft", "streams_5", "requests_3", "arrivals_8"}
    production = results["production"]
    assert production["ttft"]["ok"] == production["ttft"]["requests"] > 0
    assert production["streams_5"]["completed"] == 5 and not production["streams_5"]["errors"]
    assert production["requests_3"]["completed"] == 3 and production["arrivals_8"]["completed"] == 4
    # Counted at the stand-in: one begin per turn, and every turn's end flushed.
    assert production["requests_3"]["begin_requests"] == 3 and production["requests_3"]["flush_requests"] >= 1
    assert set(document["machine"]["pinning"]) == {"service", "postgresql", "postgrest_standin", "load_generator"}
    assert document["machine"]["standin_server"] in ("uvloop+httptools", "asyncio+h11")
