"""The benchmark's smoke mode, so ``bench/run.py`` cannot rot between manual full runs.

Runs ``python bench/run.py --smoke`` (a few streams per figure, on 127.0.0.1 only) for the service, the floor and the
relay floor (``bench/relay_floor_app.py``, which relays the fake Bedrock) and checks that every figure produced
numbers. The baseline is not part of smoke mode: it needs its own virtual environment (bench/.venv-baseline with
FastAPI and boto3), which only the full run creates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
