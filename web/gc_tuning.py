"""CPython's garbage collector, tuned for a server holding thousands of open streams.

Measured in bench/RESULTS.md: with CPython's defaults a burst of 1,000 streams spent ~0.55 of its ~2.9 CPU-seconds
in the collector, most of it in full collections walking every live stream's objects (~80 ms each, every stream
stalled). Almost all garbage here is freed by reference counting; the collector is only for the cycles left
(exceptions with their tracebacks, closed coroutines). The benchmark's floors use the same settings, so the
comparison measures the relay, not the collector.
"""

from __future__ import annotations

import gc

# Young-generation collections every 50,000 net container allocations instead of 700, and older ones rarer.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Once startup is done: freeze what it created (modules, routes, settings: alive for good, so no collection need
    walk them again) and make collections rarer."""
    if gc.get_freeze_count() == 0:  # a process that starts apps repeatedly (the tests) freezes only the first time
        gc.collect()
        gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
