"""Garbage-collector pauses of a serving process: every collection timed, and the start-up heap frozen.

Once Ray, FastAPI, torch and the encoder are loaded, a serving process holds about half a million long-lived Python
objects, and a full (generation 2) collection that walks them stops every request in flight for 175-188 ms on the
2-core benchmark machine (benchmarks/results/fairness*.json: the collection before Serve's freeze). Ray Serve
collects and freezes (`gc.freeze()`) a replica's heap once its constructor has run (`RAY_SERVE_FREEZE_GC_ON_STARTUP`,
on by default), so serving collections skip it: `GcPauses` times every collection through `gc.callbacks` so
/metrics shows that they stay short. `freeze_startup_heap()` does the same freeze for processes Serve does not start
(the benchmarks' clients).

Plain Python: no Ray.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect once, then exclude every object alive now from later collections; the number of objects frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("gc: %d start-up objects frozen (full collections skip them)", frozen)
    return frozen


class GcPauses:
    """Count, total and longest pause of the collector, per generation, since `start()`."""

    def __init__(self) -> None:
        self._started_at: float | None = None
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]

    def start(self) -> GcPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        if self._started_at is None:
            return
        seconds = time.perf_counter() - self._started_at
        self._started_at = None
        generation = min(int(info.get("generation", 0)), 2)
        self.count[generation] += 1
        self.total_s[generation] += seconds
        self.max_s[generation] = max(self.max_s[generation], seconds)

    def snapshot(self) -> dict[str, Any]:
        """`{"frozen_objects", "generations": {"0": {"collections", "total_ms", "max_ms"}, ...}}`."""
        return {
            "frozen_objects": gc.get_freeze_count(),
            "generations": {
                str(g): {
                    "collections": self.count[g],
                    "total_ms": round(self.total_s[g] * 1000, 3),
                    "max_ms": round(self.max_s[g] * 1000, 3),
                }
                for g in range(3)
            },
        }


__all__ = ["GcPauses", "freeze_startup_heap"]
