"""The benchmark's table: one row per figure, one column per target, then the service judged against the relay floor.

What: ``render(document)`` turns ``bench/run.py``'s result document into plain text (the same text goes to the
terminal, bench/results/<stamp>.txt and, by hand, bench/RESULTS.md); ``all_ran`` says whether every figure produced
numbers (a figure that raised is shown as FAILED and makes the run exit non-zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

COLUMNS = ("service", "baseline", "floor", "relay")
HEADERS = {"relay": "relay floor"}  # "relay" alone reads like figure 2

Cell = Callable[[dict[str, Any]], str]


def _num(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "never"
    if isinstance(value, (int, float)):
        text = f"{value:,.{digits}f}"
        return text + unit
    return str(value)


def _cell(figure: str, render: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str]:
    """A table cell for ``figure``: "-" when it was not run, "FAILED" when it failed, else ``render(data)``."""

    def cell(results: dict[str, Any]) -> str:
        data = results.get(figure)
        if data is None:
            return "-"
        if "failed" in data:
            return "FAILED"
        return render(data)

    return cell


def _field(figure: str, key: str, digits: int = 0, unit: str = "") -> Callable[[dict[str, Any]], str]:
    return _cell(figure, lambda data: _num(data.get(key), digits, unit))


def _completed(figure: str) -> Callable[[dict[str, Any]], str]:
    return _cell(figure, lambda data: f"{data['completed']:,}/{data['streams']:,}")


def rows(document: dict[str, Any]) -> list[tuple[str, Cell]]:
    plan = document["plan"]
    paced = plan["paced"]
    table: list[tuple[str, Cell]] = [
        ("1. TTFT, one stream, p50", _field("ttft", "ttft_p50_ms", 2, " ms")),
        ("   TTFT, one stream, p99", _field("ttft", "ttft_p99_ms", 2, " ms")),
        (f"2. Relay CPU per 1,000 tokens ({plan['relay_streams']}x{plan['relay_tokens']})",
         _field("relay", "cpu_s_per_1000_tokens", 4, " s")),
        ("   Relay throughput", _field("relay", "tokens_per_s", 0, " tok/s")),
        ("   SSE events per stream", _field("relay", "sse_events_per_stream", 1)),
    ]
    label = f"ttft {paced['ttft'] * 1000:.0f} ms, {paced['tokens']} tok / {paced['interval'] * 1000:.0f} ms"
    for count in plan["levels"]:
        key = f"streams_{count}"
        table += [
            (f"3. {count:,} streams ({label}): completed", _completed(key)),
            ("   TTFT p50", _field(key, "ttft_p50_s", 3, " s")),
            ("   TTFT p99", _field(key, "ttft_p99_s", 3, " s")),
            ("   extra gap between tokens, p99", _field(key, "extra_gap_p99_s", 3, " s")),
            ("   server memory per open stream", _field(key, "kb_per_stream", 1, " KB")),
        ]
    table += [
        (f"4. List conversations ({plan['conversations']:,} stored)", _field("api", "list_rps", 0, " req/s")),
        ("   Get one conversation", _field("api", "get_rps", 0, " req/s")),
        ("   List, page halfway down, by offset", _field("api", "list_deep_offset_rps", 0, " req/s")),
        ("   List, the same page by cursor", _field("api", "list_deep_cursor_rps", 0, " req/s")),
    ]
    return table


def render(document: dict[str, Any]) -> str:
    results = document["results"]
    columns = [c for c in COLUMNS if c in results]
    body = [(label, [cell(results[c]) for c in columns]) for label, cell in rows(document)]
    width = max(len(label) for label, _ in body)
    headers = [HEADERS.get(c, c) for c in columns]
    widths = [max(len(h), *(len(cells[i]) for _, cells in body)) for i, h in enumerate(headers)]
    lines = [f"{'':{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(headers, widths))]
    lines.append("-" * len(lines[0]))
    lines += [f"{label:{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(cells, widths)) for label, cells in body]
    lines += ["", machine_line(document["machine"])]
    if document.get("smoke"):
        # A few streams say the script works, not how fast the service is: no target is judged from them.
        lines += ["", "Targets: not judged in a smoke run (run without --smoke)."]
    else:
        lines += targets(results, document["plan"])
    return "\n".join(lines)


def machine_line(machine: dict[str, Any]) -> str:
    pinned = (
        f"server pinned to core {machine['server_core']}, fake upstream + load generator to core {machine['bench_core']}"
        if machine["server_core"] is not None
        else "NOT pinned (fewer than 2 cores available)"
    )
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, Linux "
        f"{machine['kernel']}, Python {machine['python']}; {pinned}."
    )


def _get(results: dict[str, Any], target: str, figure: str, key: str) -> float | None:
    value = results.get(target, {}).get(figure, {}).get(key)
    return value if isinstance(value, (int, float)) else None


MEMORY_LIMIT_KB = 40.0


def targets(results: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """Issue 13's targets: the service against the relay floor of the same run (skipped when a number is missing)."""
    if "service" not in results or "relay" not in results:
        return ["", "Targets: not judged (they need the service and the relay floor in the same run)."]
    service, relay = results["service"], results["relay"]
    lines = ["", "Targets (service against the relay floor of this run):"]
    s, r = _get(results, "service", "ttft", "ttft_p50_ms"), _get(results, "relay", "ttft", "ttft_p50_ms")
    lines.append(_line("S1 one stream: TTFT p50 within 1 ms of the relay floor", s, r,
                       None if s is None or r is None else s - r <= 1.0, " ms", f"{(s or 0) - (r or 0):+.2f} ms, "))
    s = _get(results, "service", "relay", "cpu_s_per_1000_tokens")
    r = _get(results, "relay", "relay", "cpu_s_per_1000_tokens")
    lines.append(_line("S2 relay CPU per 1,000 tokens <= 1.5x the relay floor", s, r, _within(s, r, 1.5), " s"))
    lines.append(_streams("S3 1,000 streams: all complete, TTFT p99 <= 1.5x the relay floor",
                          service.get("streams_1000"), relay.get("streams_1000"), zero_errors=False))
    lines.append(_streams("5,000 streams: all complete, zero errors, TTFT p99 <= 1.5x the relay floor",
                          service.get("streams_5000"), relay.get("streams_5000"), zero_errors=True))
    levels = [n for n in plan["levels"] if n >= 1000]
    s = _worst(service, levels, "kb_per_stream")
    r = _worst(relay, levels, "kb_per_stream")
    name = f"memory per open stream (1,000+ streams, worst level) <= {MEMORY_LIMIT_KB:g} KB"
    lines.append(_line(name, s, r, None if s is None else s <= MEMORY_LIMIT_KB, " KB", f"{s or 0:.1f} KB, "))
    return lines


def _within(service: float | None, relay: float | None, factor: float) -> bool | None:
    return None if service is None or relay is None else service <= factor * relay


def _ratio(service: float | None, relay: float | None, unit: str) -> str:
    """``1.23x (service 2.5 ms vs relay floor 2.0 ms)``; a time that never came shows as "never"."""
    if service is None or relay is None:
        return "no number"
    if math.isinf(service) or math.isinf(relay) or not relay:
        ratio = "no ratio"
    else:
        ratio = f"{service / relay:.2f}x"
    return f"{ratio} (service {_plain(service, unit)} vs relay floor {_plain(relay, unit)})"


def _plain(value: float, unit: str) -> str:
    return "never" if math.isinf(value) else f"{value:g}{unit}"


def _line(name: str, service: float | None, relay: float | None, ok: bool | None, unit: str, prefix: str = "") -> str:
    """One target: [MET ]/[MISS], or [ -- ] when this run has no number for the service."""
    if ok is None:
        return f"  [ -- ] {name}: no number"
    return f"  [{'MET ' if ok else 'MISS'}] {name}: {prefix}{_ratio(service, relay, unit)}"


def _streams(name: str, service: dict[str, Any] | None, relay: dict[str, Any] | None, zero_errors: bool) -> str:
    """A concurrency target: every stream completed (and no error at all, if asked) and TTFT p99 within 1.5x."""
    if not service or "completed" not in service:
        return f"  [ -- ] {name}: {'FAILED' if service else 'not run'}"
    s = service.get("ttft_p99_s")
    r = (relay or {}).get("ttft_p99_s")
    s = s if isinstance(s, (int, float)) else None
    r = r if isinstance(r, (int, float)) else None
    complete = service["completed"] == service["streams"] and not (zero_errors and service["errors"])
    fast = _within(s, r, 1.5)
    # Incomplete is a miss whatever the relay floor did; complete but nothing to compare the TTFT with is unjudged.
    mark = "MISS" if not complete or fast is False else "MET " if fast else " -- "
    detail = f"{service['completed']:,}/{service['streams']:,}, errors {service['errors'] or 'none'}; TTFT p99 "
    return f"  [{mark}] {name}: {detail}{_ratio(s, r, ' s')}"


def _worst(figures: dict[str, Any], levels: list[int], key: str) -> float | None:
    values = [figures.get(f"streams_{n}", {}).get(key) for n in levels]
    numbers = [v for v in values if isinstance(v, (int, float))]
    return max(numbers) if numbers else None


def all_ran(document: dict[str, Any]) -> bool:
    return all("failed" not in figure for target in document["results"].values() for figure in target.values())
