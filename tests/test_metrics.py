"""GET /metrics: access control, the numbers real requests move, and merging across workers (METRICS_DIR)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import anyio
import pytest
import httpx
from starlette.testclient import TestClient

from app import create_app
from errors import UpstreamUnavailable
from services import metrics as metrics_module
from services.metrics import Metrics
from services.retry import RetryPolicy, with_retry
from tests.scripted_model import ScriptedModel
from tests.support import make_settings, new_id, serve

TOKEN = "metrics-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in an exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def test_metrics_are_off_without_a_token(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        response = client.get("/metrics")
    assert response.status_code == 404 and response.json()["error"]["code"] == "NOT_FOUND"


def test_metrics_require_the_bearer_token(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, METRICS_TOKEN=TOKEN))) as client:
        missing = client.get("/metrics")
        wrong = client.get("/metrics", headers={"Authorization": "Bearer metrics-token-WRONG-000000"})
        right = client.get("/metrics", headers=AUTH)
    assert missing.status_code == wrong.status_code == 401
    assert right.status_code == 200 and right.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert TOKEN not in right.text


def test_metrics_move_after_real_requests(tmp_path: Path) -> None:
    model = ScriptedModel(pieces=["a ", "b ", "c"], first_pause=0.05)
    failing = ScriptedModel(pieces=["x"], fail_with=UpstreamUnavailable(code="MODEL_THROTTLED"))
    settings = make_settings(tmp_path, METRICS_TOKEN=TOKEN, RATE_LIMIT_API_PER_MINUTE="2")
    user = new_id()
    body = {"message": "hi", "conversation_id": new_id(), "user_id": user, "history": []}
    with serve(create_app(settings, model=model)) as live, serve(create_app(settings, model=failing)) as broken:
        assert httpx.post(f"{live.url}/api/chat/stream", json=body, timeout=20).status_code == 200
        httpx.post(f"{broken.url}/api/chat/stream", json={**body, "conversation_id": new_id()}, timeout=20)
        for _ in range(3):  # the third is over RATE_LIMIT_API_PER_MINUTE
            httpx.get(f"{live.url}/api/conversations", params={"user_id": user})
        text = httpx.get(f"{live.url}/metrics", headers=AUTH).text
        broken_text = httpx.get(f"{broken.url}/metrics", headers=AUTH).text
    route = {"method": "POST", "route": "/api/chat/stream", "status": "200"}
    assert sample(text, "canvalo_http_requests_total", **route) == 1
    assert sample(text, "canvalo_http_requests_total", method="GET", route="/api/conversations", status="429") == 1
    assert sample(text, "canvalo_http_request_duration_seconds_count", **route) == 1
    assert sample(text, "canvalo_stream_duration_seconds_count", outcome="complete") == 1
    assert sample(text, "canvalo_time_to_first_token_seconds_count") == 1
    assert sample(text, "canvalo_time_to_first_token_seconds_bucket", le="0.025") == 0  # it took >= 50 ms
    assert sample(text, "canvalo_llm_tokens_total", kind="input", model=model.model_id) == 7
    assert sample(text, "canvalo_llm_tokens_total", kind="output", model=model.model_id) == 3
    assert sample(text, "canvalo_rate_limit_rejections_total", limit="api") == 1
    # One chat turn: admitted and begun in one store call; its events and its end written by the worker's flushes.
    assert sample(text, "canvalo_store_query_duration_seconds_count", store="sqlite", operation="begin_run") == 1
    assert sample(text, "canvalo_store_query_duration_seconds_count", store="sqlite", operation="flush_runs") >= 1
    assert sample(text, "canvalo_open_streams") == 0
    assert sample(broken_text, "canvalo_llm_errors_total", code="MODEL_THROTTLED") == 1
    assert sample(broken_text, "canvalo_stream_duration_seconds_count", outcome="error") == 1


def test_open_streams_gauge_counts_a_stream_in_flight(tmp_path: Path) -> None:
    model = ScriptedModel(pieces=[f"w{i} " for i in range(10)], pause=0.05)
    settings = make_settings(tmp_path, METRICS_TOKEN=TOKEN)
    body = {"message": "long", "conversation_id": new_id(), "user_id": new_id(), "history": []}
    with serve(create_app(settings, model=model)) as live:
        with httpx.stream("POST", f"{live.url}/api/chat/stream", json=body, timeout=20) as response:
            pieces = response.iter_bytes()
            next(pieces)
            during = httpx.get(f"{live.url}/metrics", headers=AUTH).text
            b"".join(pieces)
        after = httpx.get(f"{live.url}/metrics", headers=AUTH).text
    assert sample(during, "canvalo_open_streams") == 1
    assert sample(after, "canvalo_open_streams") == 0


def test_a_scrape_shows_the_sum_of_every_worker(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, METRICS_TOKEN=TOKEN, METRICS_DIR=str(tmp_path / "metrics"))
    health = {"method": "GET", "route": "/health", "status": "200"}
    with serve(create_app(settings)) as first, serve(create_app(settings)) as second:
        for url, times in ((first.url, 3), (second.url, 2)):
            for _ in range(times):
                httpx.get(f"{url}/health")
        deadline = time.monotonic() + 5 * metrics_module.FLUSH_SECONDS
        while sample(text := httpx.get(f"{first.url}/metrics", headers=AUTH).text, "canvalo_http_requests_total", **health) < 5:
            assert time.monotonic() < deadline, "the other worker's numbers never reached the scrape"
            time.sleep(0.1)
        other_view = httpx.get(f"{second.url}/metrics", headers=AUTH).text
    assert sample(text, "canvalo_http_requests_total", **health) == 5
    assert sample(other_view, "canvalo_http_requests_total", **health) == 5
    assert len(list((tmp_path / "metrics").glob("*.json"))) == 2


def test_a_dead_workers_counters_stay_and_its_gauges_go(tmp_path: Path) -> None:
    dead = Metrics(str(tmp_path))
    dead.rate_limited.inc("chat", amount=4)
    dead.open_streams.inc(amount=3)
    dead.flush()
    snapshot = tmp_path / f"{dead.instance}.json"
    stale = json.loads(snapshot.read_text())
    stale["written_at"] -= 60
    snapshot.write_text(json.dumps(stale))
    live = Metrics(str(tmp_path))
    live.rate_limited.inc("chat")
    text = live.render()
    assert sample(text, "canvalo_rate_limit_rejections_total", limit="chat") == 5
    assert sample(text, "canvalo_open_streams") == 0


def test_exposition_format_histograms_and_label_escaping() -> None:
    registry = Metrics()
    registry.store_call("sqlite", 'we"ird\\op', 0.02)
    registry.store_call("sqlite", 'we"ird\\op', 3.0)
    text = registry.render()
    labels = 'store="sqlite",operation="we\\"ird\\\\op"'
    assert f'canvalo_store_query_duration_seconds_bucket{{{labels},le="0.025"}} 1' in text
    assert f'canvalo_store_query_duration_seconds_bucket{{{labels},le="5.0"}} 2' in text
    assert f'canvalo_store_query_duration_seconds_bucket{{{labels},le="+Inf"}} 2' in text
    assert f"canvalo_store_query_duration_seconds_count{{{labels}}} 2" in text
    assert f"canvalo_store_query_duration_seconds_sum{{{labels}}} 3.02" in text
    assert "# TYPE canvalo_store_query_duration_seconds histogram" in text


def test_retries_are_counted_by_code_in_the_request_context() -> None:
    registry = Metrics()
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise UpstreamUnavailable(code="MODEL_THROTTLED")
        return "ok"

    async def scenario() -> str:
        token = metrics_module.current.set(registry)
        try:
            return await with_retry(flaky, RetryPolicy(attempts=3, base_delay=0, max_delay=0), what="test")
        finally:
            metrics_module.current.reset(token)

    assert anyio.run(scenario) == "ok"
    assert sample(registry.render(), "canvalo_retries_total", code="MODEL_THROTTLED") == 2


def test_a_clients_own_methods_make_no_new_series(tmp_path: Path) -> None:
    """h11 and nginx take any token as a method: 200 made-up ones (4 KB each in the review) must not grow /metrics."""
    with serve(create_app(make_settings(tmp_path, METRICS_TOKEN=TOKEN))) as live:
        for i in range(200):
            assert httpx.request(f"X{i}" + "M" * 1000, f"{live.url}/health").status_code == 405
        text = httpx.get(f"{live.url}/metrics", headers=AUTH).text
    assert "MMMM" not in text
    assert sample(text, "canvalo_http_requests_total", method="OTHER", route="/health", status="405") == 200


# -- the exposition, read strictly, and what several workers' scrapes add up to ----------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)$")


def parse_strict(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition (format 0.0.4), refusing what a strict reader refuses: a sample before its
    family's HELP and TYPE, a family declared twice, a series twice, a bad label or value, a histogram whose buckets
    fall, lack +Inf, or disagree with _count."""
    assert text.endswith("\n") and "\n\n" not in text
    types: dict[str, str] = {}
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    current = ""
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert re.fullmatch(_NAME, name) and name not in types, line
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and kind in ("counter", "gauge", "histogram"), line
            types[name] = kind
        else:
            found = _SAMPLE.match(line)
            assert found, f"not a sample: {line!r}"
            name, value = found.group(1), found.group(found.lastindex or 0)
            labels = tuple(re.findall(_LABEL, found.group(2) or ""))
            family = re.sub(r"_(bucket|sum|count)$", "", name) if types.get(current) == "histogram" else name
            assert family == current, f"{line!r} outside its family {current!r}"
            assert len({k for k, _ in labels}) == len(labels), line
            assert (name, labels) not in samples, f"duplicate series: {line!r}"
            samples[name, labels] = float(value)  # "+Inf", "NaN" and numbers; anything else raises
    for (name, labels), count in samples.items():
        if name.endswith("_count") and types.get(name[:-6]) == "histogram":
            base = name[:-6]
            buckets = [(v, le) for (n, ls), v in samples.items() if n == base + "_bucket"
                       for le in [dict(ls)["le"]] if tuple(p for p in ls if p[0] != "le") == labels]
            bounds = sorted(buckets, key=lambda b: float(b[1]))
            assert bounds[-1][1] == "+Inf" and bounds[-1][0] == count, (name, labels)
            assert all(a[0] <= b[0] for a, b in zip(bounds, bounds[1:])), (name, labels)
    return samples


def test_the_exposition_is_strictly_valid_after_odd_requests(tmp_path: Path) -> None:
    """404s, 405s, made-up methods, HEAD, a failed turn, and another worker's snapshot: one valid exposition."""
    failing = ScriptedModel(pieces=["x"], fail_with=UpstreamUnavailable(code="MODEL_THROTTLED"))
    settings = make_settings(tmp_path, METRICS_TOKEN=TOKEN, METRICS_DIR=str(tmp_path / "metrics"))
    body = {"message": "hi", "conversation_id": new_id(), "user_id": new_id(), "history": []}
    with serve(create_app(settings, model=failing)) as live, serve(create_app(settings)) as other:
        for path in ("/nope", '/a"b\\c', "/api/conversations/x/y/z", "/%00"):
            httpx.get(f"{live.url}{path}")
        httpx.request("BREW", f"{live.url}/health")
        httpx.delete(f"{live.url}/health")
        httpx.head(f"{live.url}/health")
        httpx.post(f"{live.url}/api/chat/stream", json=body, timeout=20)
        httpx.get(f"{other.url}/metrics", headers=AUTH)  # the other worker writes its snapshot
        text = httpx.get(f"{live.url}/metrics", headers=AUTH).text
    samples = parse_strict(text)
    assert samples["canvalo_http_requests_total", (("method", "GET"), ("route", "<unmatched>"), ("status", "404"))] == 4
    assert samples["canvalo_llm_errors_total", (("code", "MODEL_THROTTLED"),)] == 1


def test_a_counter_never_falls_from_one_scrape_to_the_next_whichever_worker_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prometheus reads a counter that falls as a restart and counts its whole value again (a spike in rate()). A
    worker that shows its live numbers must have written them where the next scrape, on another worker, reads."""
    monkeypatch.setattr(metrics_module, "FLUSH_SECONDS", 3600.0)  # no periodic snapshot during the test
    settings = make_settings(tmp_path, METRICS_TOKEN=TOKEN, METRICS_DIR=str(tmp_path / "metrics"))
    with serve(create_app(settings)) as first, serve(create_app(settings)) as second:
        for _ in range(3):
            httpx.get(f"{first.url}/health")
            httpx.get(f"{first.url}/nowhere")
        scrapes = [httpx.get(f"{url}/metrics", headers=AUTH).text for url in (first.url, second.url, first.url)]
    families = {line.split(" ")[2]: line.split(" ")[3] for line in scrapes[0].splitlines() if line.startswith("# TYPE")}
    for earlier, later in zip(scrapes, scrapes[1:]):
        before, after = parse_strict(earlier), parse_strict(later)
        for (name, labels), value in before.items():
            if families.get(re.sub(r"_(bucket|sum|count)$", "", name)) != "gauge":
                assert after.get((name, labels), 0.0) >= value, (name, labels, value, after.get((name, labels)))


def test_a_snapshot_of_another_shape_does_not_break_the_scrape(tmp_path: Path) -> None:
    """A previous version's snapshot (other buckets, other labels) or a stray JSON file in METRICS_DIR is left out;
    the scrape still answers, with every valid worker's numbers."""
    (tmp_path / "stray.json").write_text("{}")
    (tmp_path / "list.json").write_text("[1, 2]")
    old = Metrics(str(tmp_path))
    old.rate_limited.inc("chat", amount=2)
    old.store_call("sqlite", "ping", 0.01)
    old.flush()
    snapshot = tmp_path / f"{old.instance}.json"
    data = json.loads(snapshot.read_text())
    data["metrics"]["canvalo_store_query_duration_seconds"][0][1].append(0.0)  # one bucket more than today
    data["metrics"]["canvalo_llm_errors_total"] = [[["A", "B"], 1.0], ["x"], [[], "NaN?"]]  # labels of another shape
    data["metrics"]["canvalo_open_streams"] = "many"
    snapshot.write_text(json.dumps(data))
    live = Metrics(str(tmp_path))
    live.rate_limited.inc("chat")
    samples = parse_strict(live.render())
    assert samples["canvalo_rate_limit_rejections_total", (("limit", "chat"),)] == 3
    assert not any(name == "canvalo_llm_errors_total" for name, _ in samples)
