"""Prometheus metrics without a dependency: counters, gauges, fixed-bucket histograms and the text exposition.

Why hand-written: the service needs a dozen metrics and one text format (Prometheus exposition format 0.0.4);
``prometheus_client`` would be the only runtime dependency for that.

Several workers each keep their own numbers in memory, and a scrape reaches one of them. So that a scrape shows the
service's totals, each worker writes a snapshot of its numbers to ``METRICS_DIR`` (one JSON file per worker, written
atomically every ``FLUSH_SECONDS`` and at shutdown), and the worker answering a scrape merges every snapshot with its
own live numbers (docs/operations.md, "Metrics", says how each kind is merged): prometheus_client's multiprocess mode.

The per-request ``ContextVar`` below exists for code deep inside the store and model clients: ``services/retry.py``'s
``with_retry``, and the Bedrock client's walk down its fallback models; threading a registry through all of their
signatures would change modules that do not care about metrics. ``RequestContext`` sets it for each request (a
chat run's task inherits the context of the request that started it), so two apps in one process (tests) keep
their numbers apart, which a module-level registry would not.

The ``model`` label only ever holds a configured model id, never anything a request supplies, so its series are
bounded by the configuration.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import anyio

logger = logging.getLogger(__name__)

# How often a worker writes its snapshot; a gauge from a snapshot older than STALE_AFTER is left out of a merge.
FLUSH_SECONDS = 1.0
STALE_AFTER = 5 * FLUSH_SECONDS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STREAM_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0)

Labels = tuple[str, ...]


class Counter:
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self.values: dict[Labels, Any] = {}  # per label set: the value (a histogram's: see ``Histogram``)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def dump(self) -> list[list[Any]]:
        return [[list(labels), value] for labels, value in self.values.items()]


class Gauge(Counter):
    kind = "gauge"


class Histogram(Counter):
    """Per label set, its values are non-cumulative counts per bucket (the last one is +Inf), then the sum of the
    observations."""

    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(buckets)

    def observe(self, value: float, *labels: str) -> None:
        row = self.values.setdefault(labels, [0.0] * (len(self.buckets) + 2))
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        row[index] += 1
        row[-1] += value


class Metrics:
    """The service's metrics. One per app, created in the lifespan and reached through ``request.state.metrics``."""

    def __init__(self, directory: str = "") -> None:
        self.directory = directory
        self.instance = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.http_requests = Counter(
            "canvalo_http_requests_total", "HTTP requests by method, route template and status.",
            ("method", "route", "status"),
        )
        self.http_duration = Histogram(
            "canvalo_http_request_duration_seconds",
            "Time from request to the end of the response (for the chat route, the whole stream).",
            ("method", "route", "status"), LATENCY_BUCKETS,
        )
        self.open_streams = Gauge("canvalo_open_streams", "Chat streams open now.")
        self.stream_duration = Histogram(
            "canvalo_stream_duration_seconds", "Chat stream duration by how it ended.", ("outcome",), STREAM_BUCKETS
        )
        self.first_token = Histogram(
            "canvalo_time_to_first_token_seconds", "Time from request to the first token sent.", (), TOKEN_BUCKETS
        )
        self.llm_tokens = Counter(
            "canvalo_llm_tokens_total",
            "Model tokens by kind (input, output, cache_read, cache_write) and the model that used them; a call cut "
            "short counts estimated tokens.",
            ("kind", "model"),
        )
        self.llm_estimated_tokens = Counter(
            "canvalo_llm_estimated_tokens_total",
            "The part of canvalo_llm_tokens_total that is estimated: calls cut short before the model counted them.",
            ("kind", "model"),
        )
        self.llm_cost = Counter(
            "canvalo_llm_cost_usd_total",
            "Model cost in USD by model, at MODEL_PRICES (estimated calls included; unpriced models count none).",
            ("model",),
        )
        self.budget_refusals = Counter(
            "canvalo_budget_refusals_total", "Chat turns refused with 429 BUDGET_EXCEEDED, by period and unit.",
            ("period", "unit"),
        )
        self.llm_requests = Counter(
            "canvalo_llm_requests_total",
            "Model calls by model and outcome: answered, or the error code it failed with before any output.",
            ("model", "outcome"),
        )
        self.llm_errors = Counter(
            "canvalo_llm_errors_total", "Chat turns that ended with an error chunk, by error code.", ("code",)
        )
        self.retries = Counter(
            "canvalo_retries_total", "Retries of transient model and store failures, by code.", ("code",)
        )
        self.store_duration = Histogram(
            "canvalo_store_query_duration_seconds", "Store call latency by store and operation.",
            ("store", "operation"), LATENCY_BUCKETS,
        )
        self.rate_limited = Counter(
            "canvalo_rate_limit_rejections_total", "Requests refused with 429, by limit (chat, api, streams).",
            ("limit",),
        )
        # Every metric above, in the order they are exposed.
        self.all: list[Counter] = [value for value in vars(self).values() if isinstance(value, Counter)]

    def store_call(self, store: str, operation: str, seconds: float) -> None:
        """The stores' query observer (``services.store.QueryObserver``)."""
        self.store_duration.observe(seconds, store, operation)

    # -- snapshots and exposition ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"instance": self.instance, "written_at": time.time(), "metrics": {m.name: m.dump() for m in self.all}}

    def flush(self, snapshot: dict[str, Any] | None = None) -> None:
        """Write this worker's snapshot (``snapshot``, or one taken now) to ``directory`` atomically (write, then
        rename)."""
        if not self.directory:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{self.instance}.json")
        temporary = f"{path}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(snapshot or self.snapshot(), handle, separators=(",", ":"))
        os.replace(temporary, path)

    @contextlib.asynccontextmanager
    async def snapshotting(self) -> AsyncIterator[Metrics]:
        """This worker's snapshot written every ``FLUSH_SECONDS`` while open, and once more when it closes, so its
        final numbers stay in the merge."""
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._flush_periodically)
                yield self
                group.cancel_scope.cancel()
        finally:
            self.flush_quietly()

    async def _flush_periodically(self) -> None:
        while True:
            await anyio.sleep(FLUSH_SECONDS)
            self.flush_quietly()

    def flush_quietly(self, snapshot: dict[str, Any] | None = None) -> None:
        try:
            self.flush(snapshot)
        except OSError as exc:
            logger.warning("Could not write the metrics snapshot: %s", exc.strerror)

    def render(self) -> str:
        """The Prometheus text exposition of every worker's numbers merged (this worker's live ones included).

        The live numbers shown are written first, as they are: a scrape answered next by another worker reads them
        there, not an older snapshot of this worker. Otherwise a counter could fall from one scrape to the next, which
        Prometheus takes for a restart and counts its whole value again (a spike in ``rate()``)."""
        own = self.snapshot()
        self.flush_quietly(own)
        snapshots = [own, *self._other_snapshots()]
        now = time.time()
        lines: list[str] = []
        for metric in self.all:
            live = [s for s in snapshots if metric.kind != "gauge" or now - s["written_at"] <= STALE_AFTER]
            merged = _merge(metric, (s["metrics"].get(metric.name) for s in live))
            lines.extend(_exposition(metric, merged))
        return "\n".join(lines) + "\n"

    def _other_snapshots(self) -> list[dict[str, Any]]:
        if not self.directory or not os.path.isdir(self.directory):
            return []
        snapshots = []
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".json") or name == f"{self.instance}.json":
                continue
            try:
                with open(os.path.join(self.directory, name), encoding="utf-8") as handle:
                    snapshot = json.load(handle)
            except (OSError, ValueError):
                continue  # a file being replaced right now; the next scrape reads it
            # Not a snapshot (a stray file): left out, rather than every scrape failing. Rows of another shape (a
            # previous version's buckets or labels) are left out row by row in _merge.
            if (isinstance(snapshot, dict) and isinstance(snapshot.get("metrics"), dict)
                    and isinstance(snapshot.get("written_at"), (int, float))):
                snapshots.append(snapshot)
        return snapshots


def _merge(metric: Counter, dumps: Iterable[Any]) -> dict[Labels, Any]:
    merged: dict[Labels, Any] = {}
    for dump in dumps:
        for labels, value in _rows(metric, dump):
            key = tuple(labels)
            if isinstance(value, list):
                previous = merged.get(key) or [0.0] * len(value)
                merged[key] = [a + b for a, b in zip(previous, value, strict=True)]
            else:
                merged[key] = merged.get(key, 0.0) + value
    if not merged and not metric.labelnames and metric.kind != "histogram":
        merged[()] = 0.0  # an unlabelled counter or gauge is always shown, so dashboards see 0, not "no data"
    return merged


def _rows(metric: Counter, dump: Any) -> Iterable[tuple[list[str], Any]]:
    """The rows of one metric's dump that have its shape today: as many string labels as it has names, and a number
    (a histogram: a number per bucket, +Inf's, then the sum)."""
    if not isinstance(dump, list):
        return
    width = len(metric.buckets) + 2 if isinstance(metric, Histogram) else 0
    for row in dump:
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], list)):
            continue
        labels, value = row
        if len(labels) != len(metric.labelnames) or not all(isinstance(label, str) for label in labels):
            continue
        numbers = value if width and isinstance(value, list) and len(value) == width else [value]
        if (len(numbers) == 1) == bool(width) or not all(_finite(number) for number in numbers):
            continue
        yield labels, value


def _finite(number: Any) -> bool:
    return isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number)


def _exposition(metric: Counter, merged: dict[Labels, Any]) -> list[str]:
    lines = [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}"]
    for labels, value in sorted(merged.items()):
        pairs = list(zip(metric.labelnames, labels, strict=True))
        if isinstance(metric, Histogram):
            cumulative = 0.0
            for bound, count in zip([*metric.buckets, math.inf], value[:-1], strict=True):
                cumulative += count
                le = "+Inf" if bound == math.inf else repr(float(bound))
                lines.append(f"{metric.name}_bucket{_labels([*pairs, ('le', le)])} {_number(cumulative)}")
            lines.append(f"{metric.name}_sum{_labels(pairs)} {_number(value[-1])}")
            lines.append(f"{metric.name}_count{_labels(pairs)} {_number(cumulative)}")
        else:
            lines.append(f"{metric.name}{_labels(pairs)} {_number(value)}")
    return lines


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    escaped = (value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, value in pairs)
    return "{" + ",".join(f'{name}="{value}"' for (name, _), value in zip(pairs, escaped, strict=True)) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# -- the per-request registry for with_retry (see the module docstring for why this one is a ContextVar) ----------

current: contextvars.ContextVar[Metrics | None] = contextvars.ContextVar("canvalo_metrics", default=None)


def record_retry(code: str) -> None:
    metrics = current.get()
    if metrics is not None:
        metrics.retries.inc(code)


def record_model_call(model_id: str, outcome: str) -> None:
    """One model call's outcome before its output: ``answered``, or the error code it failed with."""
    metrics = current.get()
    if metrics is not None:
        metrics.llm_requests.inc(model_id, outcome)
