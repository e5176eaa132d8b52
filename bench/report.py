"""The benchmark's table: one row per figure, one column per target, then the targets checked against the floor.

What: ``render(document)`` turns ``bench/run.py``'s result document into plain text (the same text goes to the
terminal, bench/results/<stamp>.txt and, by hand, bench/RESULTS.md); ``all_ran`` says whether every figure produced
numbers (a figure that raised is shown as FAILED and makes the run exit non-zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

COLUMNS = ("service", "baseline", "floor")

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
    ]
    return table


def render(document: dict[str, Any]) -> str:
    results = document["results"]
    columns = [c for c in COLUMNS if c in results]
    body = [(label, [cell(results[c]) for c in columns]) for label, cell in rows(document)]
    width = max(len(label) for label, _ in body)
    widths = [max(len(c), *(len(cells[i]) for _, cells in body)) for i, c in enumerate(columns)]
    lines = [f"{'':{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    lines.append("-" * len(lines[0]))
    lines += [f"{label:{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(cells, widths)) for label, cells in body]
    lines += ["", machine_line(document["machine"])]
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


def targets(results: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """The issue's targets for the service, each judged from this run's numbers (skipped when a number is missing)."""
    if "service" not in results or "floor" not in results:
        return []
    checks: list[tuple[str, float | None, float | None, Callable[[float, float], bool], str]] = [
        ("relay CPU per token <= 1.5x floor", _get(results, "service", "relay", "cpu_s_per_1000_tokens"),
         _get(results, "floor", "relay", "cpu_s_per_1000_tokens"), lambda s, f: s <= 1.5 * f, "ratio"),
        ("added TTFT at one stream, p50 within 2 ms of floor", _get(results, "service", "ttft", "ttft_p50_ms"),
         _get(results, "floor", "ttft", "ttft_p50_ms"), lambda s, f: s - f <= 2.0, "diff"),
    ]
    if 1000 in plan["levels"]:
        checks.append(("1,000 streams: TTFT p99 <= 1.5x floor", _get(results, "service", "streams_1000", "ttft_p99_s"),
                       _get(results, "floor", "streams_1000", "ttft_p99_s"), lambda s, f: s <= 1.5 * f, "ratio"))
    lines = ["", "Targets (service):"]
    for name, service, floor, ok, kind in checks:
        if service is None or floor is None:
            lines.append(f"  [ -- ] {name}: no number")
            continue
        if kind == "ratio":
            detail = f"{service / floor:.2f}x ({service:g} vs {floor:g})" if floor else "floor measured 0"
        else:
            detail = f"{service - floor:+.2f} ms ({service:g} vs {floor:g})"
        lines.append(f"  [{'MET ' if ok(service, floor) else 'MISS'}] {name}: {detail}")
    lines += _stream_targets(results, plan)
    return lines


def _stream_targets(results: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    lines = []
    top = max(plan["levels"])
    data = results["service"].get(f"streams_{top}", {})
    if "completed" in data:
        ok = data["completed"] == data["streams"] and not data["errors"]
        lines.append(f"  [{'MET ' if ok else 'MISS'}] {top:,} streams on one worker, zero errors: "
                     f"{data['completed']:,}/{data['streams']:,} completed, errors {data['errors'] or 'none'}")
    worst = max((results["service"].get(f"streams_{n}", {}).get("kb_per_stream", 0) or 0) for n in plan["levels"]
                if n >= 100) if any(n >= 100 for n in plan["levels"]) else None
    if worst is not None:
        lines.append(f"  [{'MET ' if worst <= 40 else 'MISS'}] at most 40 KB of server memory per open stream "
                     f"(worst level >= 100 streams): {worst:.1f} KB")
    return lines


def all_ran(document: dict[str, Any]) -> bool:
    return all("failed" not in figure for target in document["results"].values() for figure in target.values())
