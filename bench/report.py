"""The benchmark's table: one row per figure, one column per target, then the service judged against the relay floor
and the production target (PostgREST stand-in + PostgreSQL) against the SQLite service of the same run.

What: ``render(document)`` turns ``bench/run.py``'s result document into plain text (the same text goes to the
terminal, bench/results/<stamp>.txt and, by hand, bench/RESULTS.md); ``all_ran`` says whether every figure produced
numbers (a figure that raised is shown as FAILED and makes the run exit non-zero). Rows of figures a target does not
run show "-" in its column: figures 5 to 7 are the production target's alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from settings import Settings

COLUMNS = ("service", "baseline", "floor", "relay", "production")
HEADERS = {"relay": "relay floor"}  # "relay" alone reads like figure 2
# The service's PostgREST pool (SUPABASE_POOL_SIZE's default, which the benchmark leaves as it is): the most
# connections a worker should ever hold to PostgREST, besides the one kept for flushes.
POOL_SIZE = Settings.supabase_pool_size

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


def _completed(figure: str, total: str = "streams") -> Callable[[dict[str, Any]], str]:
    return _cell(figure, lambda data: f"{data['completed']:,}/{data[total]:,}")


def _pair(figure: str, first: str, second: str, digits: int, unit: str = "") -> Callable[[dict[str, Any]], str]:
    """``a / b`` from two keys of one figure."""
    return _cell(figure, lambda data: f"{_num(data.get(first), digits)} / {_num(data.get(second), digits)}{unit}")


def _routes(figure: str) -> Callable[[dict[str, Any]], str]:
    """PostgREST requests per turn by route: begin / flush / other."""
    keys = ("begin_per_turn", "flush_per_turn", "other_per_turn")
    return _cell(figure, lambda data: " / ".join(_num(data.get(k), 2) for k in keys))


def _connections(figure: str) -> Callable[[dict[str, Any]], str]:
    """TCP connections accepted for the requests served (the most open at once)."""
    def render(data: dict[str, Any]) -> str:
        if "connections_accepted" not in data:
            return "-"  # a target without the stand-in
        return f"{data['connections_accepted']:,} for {data['requests_served']:,} ({data['connections_max_open']})"

    return _cell(figure, render)


def stream_levels(document: dict[str, Any]) -> list[int]:
    """Figure 3's levels that some target ran: the plan's, and the production comparison's."""
    ran = {int(key.split("_")[1]) for figures in document["results"].values() for key in figures
           if key.startswith("streams_")}
    return sorted(ran)


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
    for count in stream_levels(document):
        key = f"streams_{count}"
        table += [
            (f"3. {count:,} streams ({label}): completed", _completed(key)),
            ("   TTFT p50", _field(key, "ttft_p50_s", 3, " s")),
            ("   TTFT p99", _field(key, "ttft_p99_s", 3, " s")),
            ("   extra gap between tokens, p99", _field(key, "extra_gap_p99_s", 3, " s")),
            ("   server memory per open stream", _field(key, "kb_per_stream", 1, " KB")),
            ("   server CPU per turn", _field(key, "cpu_ms_per_turn", 2, " ms")),
        ]
    table += [
        (f"4. List conversations ({plan['conversations']:,} stored)", _field("api", "list_rps", 0, " req/s")),
        ("   Get one conversation", _field("api", "get_rps", 0, " req/s")),
        ("   List, page halfway down, by offset", _field("api", "list_deep_offset_rps", 0, " req/s")),
        ("   List, the same page by cursor", _field("api", "list_deep_cursor_rps", 0, " req/s")),
    ]
    return table + production_rows(plan)


def production_rows(plan: dict[str, Any]) -> list[tuple[str, Cell]]:
    """Figures 5-7, the production target's: PostgREST requests and connections counted at the stand-in."""
    upstream = plan["request_upstream"]
    length = upstream["ttft"] + upstream["tokens"] * upstream["interval"]
    table: list[tuple[str, Cell]] = []
    for users in plan["request_levels"]:
        key = f"requests_{users}"
        table += [
            (f"5. {users:,} user{'s' * (users != 1)} at once, {length:.1f} s answers: completed",
             _completed(key, "users")),
            ("   PostgREST requests per turn: begin / flush / other", _routes(key)),
            ("   flush requests/s while all stream / whole batch",
             _pair(key, "flush_per_s_streaming", "flush_per_s", 2)),
            ("   TCP connections for requests (most open)", _connections(key)),
        ]
    for rate in plan["arrival_rates"]:
        key = f"arrivals_{rate}"
        table += [
            (f"6. {rate} new turns/s for {plan['arrival_seconds']:g} s: completed", _completed(key, "turns")),
            ("   arrivals/s achieved", _field(key, "achieved_rate", 1)),
            ("   flush requests per turn", _field(key, "flush_per_turn", 3)),
            ("   flush requests/s", _field(key, "flush_per_s", 2)),
            ("   TTFT p50 / p99", _pair(key, "ttft_p50_s", "ttft_p99_s", 3, " s")),
            ("   TCP connections for requests (most open)", _connections(key)),
        ]
    key = f"streams_{plan['production_streams']}"
    table += [
        (f"7. {plan['production_streams']:,} streams (figure 3): flush requests, most runs in one",
         _pair(key, "flush_requests", "runs_per_flush_max", 0)),
        ("   flush round at the stand-in, p99 / max", _pair(key, "flush_p99_ms", "flush_max_ms", 1, " ms")),
        ("   begin at the stand-in, p50 / p99", _pair(key, "begin_p50_ms", "begin_p99_ms", 1, " ms")),
        ("   flush rounds over 1 s (service's histogram)", _field(key, "service_flush_rounds_over_1s")),
        ("   stand-in / PostgreSQL CPU per turn", _pair(key, "standin_cpu_ms_per_turn", "postgres_cpu_ms_per_turn", 2,
                                                     " ms")),
        ("   stand-in + PostgreSQL CPU, whole batch (core 1)", _field(key, "helpers_cpu_s", 2, " s")),
        ("   TCP connections for requests (most open)", _connections(key)),
    ]
    return table


def render(document: dict[str, Any]) -> str:
    results = document["results"]
    columns = [c for c in COLUMNS if c in results]
    body = [(label, [cell(results[c]) for c in columns]) for label, cell in rows(document)]
    body = [(label, cells) for label, cells in body if any(cell != "-" for cell in cells)]  # figures nobody ran
    width = max(len(label) for label, _ in body)
    headers = [HEADERS.get(c, c) for c in columns]
    widths = [max(len(h), *(len(cells[i]) for _, cells in body)) for i, h in enumerate(headers)]
    lines = [f"{'':{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(headers, widths))]
    lines.append("-" * len(lines[0]))
    lines += [f"{label:{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(cells, widths)) for label, cells in body]
    lines += ["", machine_line(document["machine"]), *load_lines(document["machine"])]
    if document.get("smoke"):
        # A few streams say the script works, not how fast the service is: no target is judged from them.
        lines += ["", "Targets: not judged in a smoke run (run without --smoke)."]
    else:
        if any(c in results for c in ("baseline", "floor", "relay")) or "production" not in results:
            lines += targets(results, document["plan"])
        if "production" in results:
            lines += production_targets(results, document["plan"])
    return "\n".join(lines)


def load_lines(machine: dict[str, Any]) -> list[str]:
    """Where the production target's processes could run (read from /proc), and the machine's load around the run:
    other people's processes are not pinned, so they share both cores with ours."""
    lines = []
    pinning = machine.get("pinning")
    if pinning:
        lines.append("Affinity (Cpus_allowed_list): " + ", ".join(f"{name} {cores}" for name, cores in pinning.items())
                     + "; the fake Bedrock inherits the load generator's.")
    if machine.get("standin_server"):
        lines.append(f"PostgREST stand-in's event loop and HTTP parser: {machine['standin_server']}.")
    if "load_before" in machine:
        before, after = (" ".join(f"{v:.2f}" for v in machine[key]) for key in ("load_before", "load_after"))
        lines.append(f"Load average (1/5/15 min): {before} before the run, {after} after.")
    return lines


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


def _ratio(
    service: float | None, relay: float | None, unit: str, names: tuple[str, str] = ("service", "relay floor")
) -> str:
    """``1.23x (service 2.5 ms vs relay floor 2.0 ms)``; a time that never came shows as "never"."""
    if service is None or relay is None:
        return "no number"
    if math.isinf(service) or math.isinf(relay) or not relay:
        ratio = "no ratio"
    else:
        ratio = f"{service / relay:.2f}x"
    return f"{ratio} ({names[0]} {_plain(service, unit)} vs {names[1]} {_plain(relay, unit)})"


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


def production_targets(results: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """The production target against the SQLite service of the same run, and its own bounds on PostgREST traffic."""
    production, service = results["production"], results.get("service", {})
    count = plan["production_streams"]
    key = f"streams_{count}"
    mine, theirs = production.get(key), service.get(key)
    lines = ["", "Targets (production: PostgREST stand-in + PostgreSQL, against the SQLite service of this run):"]
    lines.append(_all_complete(f"{count:,} streams at once: all complete", mine))
    lines.append(_versus(f"{count:,} streams: TTFT p99 <= 2x the SQLite service's", mine, theirs, "ttft_p99_s", " s"))
    lines.append(_versus(f"{count:,} streams: service CPU per turn <= 2x the SQLite service's", mine, theirs,
                         "cpu_ms_per_turn", " ms"))
    lines.append(_flush_rounds(production))
    lines += _arrivals(production, plan["arrival_rates"])
    lines.append(_pool(production))
    lines.append(_flush_rate_by_users(production, plan["request_levels"]))
    return lines


def _all_complete(name: str, figure: dict[str, Any] | None, total: str = "streams") -> str:
    if not figure or "completed" not in figure:
        return f"  [ -- ] {name}: {'FAILED' if figure else 'not run'}"
    ok = figure["completed"] == figure[total]
    return f"  [{_mark(ok)}] {name}: {figure['completed']:,}/{figure[total]:,}, errors {figure['errors'] or 'none'}"


def _versus(name: str, mine: dict[str, Any] | None, theirs: dict[str, Any] | None, key: str, unit: str) -> str:
    """``mine[key]`` within 2x ``theirs[key]``; unjudged when either number is missing."""
    a, b = (mine or {}).get(key), (theirs or {}).get(key)
    a = a if isinstance(a, (int, float)) else None
    b = b if isinstance(b, (int, float)) else None
    ok = _within(a, b, 2.0)
    if ok is None:
        return f"  [ -- ] {name}: no number"
    return f"  [{_mark(ok)}] {name}: {_ratio(a, b, unit, ('production', 'SQLite service'))}"


def _figures_with(production: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    return {name: data for name, data in production.items() if isinstance(data.get(key), (int, float))}


def _flush_rounds(production: dict[str, Any]) -> str:
    """Every flush round under 1 s: the longest flush request the stand-in served in any production figure, and the
    rounds the service's own histogram put over 1 s (a round is one request up to 500 runs)."""
    name = "every flush round under 1 s (all production figures)"
    timed = _figures_with(production, "flush_max_ms")
    if not timed:
        return f"  [ -- ] {name}: no number"
    worst = max(timed, key=lambda figure: timed[figure]["flush_max_ms"])
    longest = timed[worst]["flush_max_ms"]
    rounds = sum(data.get("service_flush_rounds", 0) for data in timed.values())
    over = sum(data.get("service_flush_rounds_over_1s", 0) for data in timed.values())
    ok = longest < 1000 and over == 0
    return (f"  [{_mark(ok)}] {name}: longest at the stand-in {longest:g} ms ({worst}, p99 there "
            f"{timed[worst]['flush_p99_ms']:g} ms); service's histogram: {over} of {rounds:,} rounds over 1 s")


def _arrivals(production: dict[str, Any], rates: list[int]) -> list[str]:
    """Every arriving turn completes at every rate, and flush requests per turn do not grow from the lowest rate to
    the highest."""
    figures = {rate: production.get(f"arrivals_{rate}") for rate in rates}
    lines = []
    for rate, figure in figures.items():
        lines.append(_all_complete(f"{rate} new turns/s: every turn completes", figure, "turns"))
    low, high = figures.get(min(rates)) or {}, figures.get(max(rates)) or {}
    a, b = high.get("flush_per_turn"), low.get("flush_per_turn")
    name = f"flush requests per turn do not grow with the arrival rate ({min(rates)}/s -> {max(rates)}/s)"
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or len(figures) < 2:
        return lines + [f"  [ -- ] {name}: no number"]
    shown = f"{b:g} at {min(rates)}/s, {a:g} at {max(rates)}/s"
    if any(f.get("completed") != f.get("turns") for f in (low, high)):
        # Turns that never began or never ended take no flushes: per turn means nothing then.
        return lines + [f"  [ -- ] {name}: not judged, turns failed ({shown})"]
    return lines + [f"  [{_mark(a <= b)}] {name}: {shown}"]


REUSE = 5  # requests per accepted connection, at the least


def _pool(production: dict[str, Any]) -> str:
    """Connections bounded by the pool and reused: in every production figure, never more than POOL_SIZE + 1 open at
    once (the pool, and the connection kept for flushes), and at least REUSE requests per connection accepted over
    the figure (a connection idle for 5 s is closed and a later burst opens it again, so accepted connections may
    pass the pool over a long figure; one per request is what must never happen)."""
    name = f"PostgREST connections bounded by the pool ({POOL_SIZE} + 1) and reused, every production figure"
    counted = _figures_with(production, "connections_accepted")
    if not counted:
        return f"  [ -- ] {name}: no number"
    most = max(counted, key=lambda figure: counted[figure]["connections_accepted"])
    accepted = counted[most]["connections_accepted"]
    widest = max(data["connections_max_open"] for data in counted.values())
    reused = all(data["connections_accepted"] <= max(POOL_SIZE + 1, data["requests_served"] / REUSE)
                 for data in counted.values())
    ok = reused and widest <= POOL_SIZE + 1
    served = counted[most]["requests_served"]
    return (f"  [{_mark(ok)}] {name}: at most {accepted:,} accepted ({most}, for {served:,} requests), "
            f"at most {widest} open at once")


def _flush_rate_by_users(production: dict[str, Any], levels: list[int]) -> str:
    """Flush requests a second while every stream of figure 5 streamed, at the most users within 1.25x of one user."""
    rates = {n: (production.get(f"requests_{n}") or {}).get("flush_per_s_streaming") for n in levels}
    name = f"flush requests/s while streaming do not grow with the users (<= 1.25x from {min(levels)} to {max(levels)})"
    low, high = rates.get(min(levels)), rates.get(max(levels))
    shown = ", ".join(f"{_num(rate, 2)}/s at {n:,}" for n, rate in rates.items())
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or len(levels) < 2:
        # "-": the last stream's first token came after the first one's end, so they never all streamed at once.
        return f"  [ -- ] {name}: no number ({shown}; - is a level whose streams never all streamed at once)"
    return f"  [{_mark(high <= 1.25 * low)}] {name}: {shown}"


def _mark(ok: bool) -> str:
    return "MET " if ok else "MISS"
