"""Short batches run inside a long forward, between two of its encoder layers.

A forward cannot be preempted, but it can pause: the engine calls `Interjections.run_pending` after each encoder
layer (`Engine.predict(..., between_layers=...)`), on the forward thread. A short batch handed over with `offer`
runs there, whole, and its answers go back to the event loop; the long forward then resumes where it paused. A quiet
tenant's row that arrives while a flood's batch runs therefore waits for one encoder layer, not the whole forward.

`offer` and `withdraw` run on the event loop, `run_pending` on the forward thread; one lock orders them, so a batch
is either run by the forward thread or withdrawn by the event loop (the forward ended before its next layer),
never both and never neither. Plain threading and asyncio: no Ray, no torch.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Interjection:
    """One short batch: `run(*args)` on the forward thread; its result (or error) lands in `done` on `loop`."""

    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.done = self.loop.create_future()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Interjections:
    """Short batches waiting for the forward in progress to reach a layer boundary (see the module docstring)."""

    def __init__(self, run: Callable[..., Any]) -> None:
        self.run = run
        self._lock = threading.Lock()
        self._waiting: deque[Interjection] = deque()
        self.ran = 0  # batches answered inside another forward

    def offer(self, job: Interjection) -> None:
        with self._lock:
            self._waiting.append(job)

    def withdraw(self, job: Interjection) -> bool:
        """Take `job` back if no forward has started it: True if withdrawn (run it some other way)."""
        with self._lock:
            try:
                self._waiting.remove(job)
            except ValueError:
                return False
            return True

    def run_pending(self) -> None:
        """On the forward thread, between two layers: run every batch offered meanwhile."""
        while self._waiting:  # a cheap look first: most layer boundaries find nothing
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            result, error = None, None
            try:
                result = self.run(*job.args)
                self.ran += 1
            except Exception as exc:  # the job's caller gets it; the paused forward goes on
                error = exc
            job.loop.call_soon_threadsafe(_settle, job.done, result, error)


__all__ = ["Interjection", "Interjections"]
