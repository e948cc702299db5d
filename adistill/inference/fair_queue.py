"""Rows of many tenants -> encoder batches, served round-robin across the tenants that have rows waiting.

`FairBatcher.submit(tenant, items)` queues one row per item under its tenant and resolves to the outputs in order.
One loop builds each batch of up to `max_batch_size` rows by taking one row from each waiting tenant in turn (the
tenant served longest ago first: deficit round-robin with a quantum of one row and equal weights), so a tenant
with thousands of rows queued takes at most its share of a batch, and another tenant's row waits for at most the
batch in progress. Like Serve's `@serve.batch`, a partial batch waits at most `batch_wait_timeout_s` after its
oldest row arrived for more rows; one batch runs at a time. Rows whose caller went away (cancelled) are dropped.

The wait adapts to load (`adaptive_wait`): it is spent only while requests arrive faster than one per
`batch_wait_timeout_s` (a moving average of the gaps between submits). A lone client, whose next request comes only
after its answer, never waits for rows that cannot come; under load batches still fill.

Round-robin decides whose rows go first, not how long the forward they ride in takes: a row that arrives while a
full batch of a flooding tenant runs waits for all of it (batches cannot be preempted), then shares its own batch
with the flood's next rows. `tenant_batch_rows` bounds both while they matter: when a *light* tenant (one that
submitted in the last `active_window_s` and has at most `tenant_batch_rows` rows waiting) is active beside others,
no tenant puts more than `tenant_batch_rows` rows into one batch and batches start without waiting for more rows.
Many tenants still fill a batch together; a tenant alone, or heavy tenants among themselves, get full batches.
With `interject`, light tenants' rows that arrive while a batch runs do not wait for it: they go at once, as a
short batch of their own, to `interject(rows)`, which runs them inside the forward in progress, between two of its
layers (adistill.inference.interject) -- as FQ-CoDel serves sparse flows ahead of bulk ones. One such batch at a time.

Plain asyncio: no Ray. The encoder replica runs one of these (adistill.distributed.serve.EncoderGroup).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")
Out = TypeVar("Out")


class FairBatcher(Generic[R, Out]):
    """See the module docstring. `run(rows) -> outputs` (same length, same order) does one batch."""

    def __init__(
        self,
        run: Callable[[list[R]], Awaitable[list[Out]]],
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.005,
        adaptive_wait: bool = True,
        tenant_batch_rows: int | None = None,
        active_window_s: float = 1.0,
        interject: Callable[[list[R]], Awaitable[list[Out]]] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if tenant_batch_rows is not None and tenant_batch_rows < 1:
            raise ValueError(f"tenant_batch_rows must be >= 1 or None, got {tenant_batch_rows}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.adaptive_wait = adaptive_wait
        self.tenant_batch_rows = tenant_batch_rows
        self.active_window_s = active_window_s
        self.interject = interject
        self._last_seen: OrderedDict[Hashable, float] = OrderedDict()  # tenant -> its latest submit, oldest first
        self._last_submit: float | None = None
        self._gap: float | None = None  # moving average of seconds between submits
        # tenant -> its waiting rows (item, future, arrival time); order = next to serve first
        self._queues: OrderedDict[Hashable, deque[tuple[R, asyncio.Future[Out], float]]] = OrderedDict()
        self._waiting = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.max_waiting_rows = 0
        self.max_waiting_tenants = 0
        self.capped_batches = 0  # batches that left rows waiting because a light tenant was active
        self._in_progress: set[Hashable] = set()  # the tenants of the batch in progress

    async def submit(self, tenant: Hashable, items: list[R]) -> list[Out]:
        """Queue `items` for `tenant`; their outputs, in order, once their batches ran."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        self._start(loop)
        now = loop.time()
        if self._last_submit is not None:
            gap = now - self._last_submit
            self._gap = gap if self._gap is None else 0.8 * self._gap + 0.2 * gap
        self._last_submit = now
        self._last_seen[tenant] = now
        self._last_seen.move_to_end(tenant)
        futures: list[asyncio.Future[Out]] = [loop.create_future() for _ in items]
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = deque()  # a new tenant joins the end of the round
        queue.extend((item, f, now) for item, f in zip(items, futures))
        self._waiting += len(items)
        self.max_waiting_rows = max(self.max_waiting_rows, self._waiting)
        self.max_waiting_tenants = max(self.max_waiting_tenants, len(self._queues))
        assert self._arrived is not None
        self._arrived.set()
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()  # dropped when their turn comes
            raise

    @property
    def waiting_rows(self) -> int:
        return self._waiting

    @property
    def waiting_tenants(self) -> int:
        return len(self._queues)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="fair-batcher")

    def _cap(self, now: float) -> int | None:
        """`tenant_batch_rows` while a light tenant is active beside another, else None (no per-tenant limit)."""
        cap = self.tenant_batch_rows
        while self._last_seen and now - next(iter(self._last_seen.values())) > self.active_window_s:
            self._last_seen.popitem(last=False)
        if cap is None or cap >= self.max_batch_size or len(self._last_seen) < 2:
            return None
        light = any(len(self._queues.get(t, ())) <= cap for t in self._last_seen)
        return cap if light else None

    def _wait_s(self, now: float) -> float:
        """How long a partial batch may wait for more rows: the timeout, or 0 when no more rows are coming soon or a
        light tenant is waiting for a short batch."""
        if self._cap(now) is not None:
            return 0.0
        if not self.adaptive_wait:
            return self.batch_wait_timeout_s
        busy = self._gap is not None and self._gap < self.batch_wait_timeout_s
        return self.batch_wait_timeout_s if busy else 0.0

    def _oldest(self) -> float:
        return min(q[0][2] for q in self._queues.values() if q)

    async def _loop(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            deadline = self._oldest() + self._wait_s(loop.time())
            while self._waiting < self.max_batch_size and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), left)
            batch = self._take(loop.time())
            if batch:
                await self._run_interjecting(batch)

    async def _run_interjecting(self, batch: list[tuple[R, asyncio.Future[Out]]]) -> None:
        """Run `batch`; while it runs, hand light tenants' rows to `interject`, one short batch at a time."""
        if self.interject is None:
            await self._run(batch, self.run)
            return
        main = asyncio.ensure_future(self._run(batch, self.run))
        side: asyncio.Future[None] | None = None
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        try:
            while not main.done():
                if side is None and (rows := self._take_light(loop.time())):
                    side = asyncio.ensure_future(self._run(rows, self.interject))
                self._arrived.clear()
                arrived = asyncio.ensure_future(self._arrived.wait())
                await asyncio.wait([f for f in (main, side, arrived) if f is not None], return_when="FIRST_COMPLETED")
                arrived.cancel()
                if side is not None and side.done():
                    side = None
            if side is not None:
                await side
        except asyncio.CancelledError:
            main.cancel()
            if side is not None:
                side.cancel()
            raise

    def _take_light(self, now: float) -> list[tuple[R, asyncio.Future[Out]]]:
        """The waiting rows of light tenants (at most `_cap` rows waiting each, none in the batch in progress), up to
        `max_batch_size`."""
        cap = self._cap(now)
        if cap is None:
            return []
        batch: list[tuple[R, asyncio.Future[Out]]] = []
        for tenant in [t for t, q in self._queues.items() if len(q) <= cap and t not in self._in_progress]:
            queue = self._queues[tenant]
            while queue and len(batch) < self.max_batch_size:
                item, future, _ = queue.popleft()
                self._waiting -= 1
                if not future.done():  # a cancelled caller's rows are dropped
                    batch.append((item, future))
            if not queue:
                del self._queues[tenant]
        return batch

    def _take(self, now: float) -> list[tuple[R, asyncio.Future[Out]]]:
        """Up to `max_batch_size` live rows, one per waiting tenant in turn, at most `_cap` per tenant."""
        cap = self._cap(now)
        batch: list[tuple[R, asyncio.Future[Out]]] = []
        taken: dict[Hashable, int] = {}
        capped: list[tuple[Hashable, deque[tuple[R, asyncio.Future[Out], float]]]] = []
        while len(batch) < self.max_batch_size and self._queues:
            tenant, queue = self._queues.popitem(last=False)
            while queue and queue[0][1].done():  # a cancelled caller's rows are dropped without taking a turn
                queue.popleft()
                self._waiting -= 1
            if not queue:
                continue
            item, future, _ = queue.popleft()
            self._waiting -= 1
            batch.append((item, future))
            taken[tenant] = taken.get(tenant, 0) + 1
            if not queue:
                continue
            if cap is not None and taken[tenant] >= cap:
                capped.append((tenant, queue))  # its share of this batch is taken
            else:
                self._queues[tenant] = queue  # the end of the round
        self._queues.update(capped)  # back in the round, after the tenants still in it
        self._in_progress = set(taken)
        if capped and len(batch) < self.max_batch_size:
            self.capped_batches += 1
        return batch

    async def _run(
        self, batch: list[tuple[R, asyncio.Future[Out]]], run: Callable[[list[R]], Awaitable[list[Out]]]
    ) -> None:
        try:
            outputs = await run([item for item, _ in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} rows gave {len(outputs)} outputs")
        except Exception as exc:  # every row of the batch gets the error; the loop goes on
            log.exception("batch of %d rows failed", len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), out in zip(batch, outputs):
            if not future.done():
                future.set_result(out)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def rows_within_budget(one_row_s: float, full_batch_s: float, max_batch_size: int, budget: float) -> int:
    """The most rows (1..max_batch_size) whose forward takes at most `budget` x a one-row forward, on the line through
    a timed one-row forward and a timed `max_batch_size`-row one: the `tenant_batch_rows` for a replica's device.
    On a CPU, where a forward's fixed cost is most of it, that is one or two rows; where rows are nearly free, more."""
    if budget < 1.0:
        raise ValueError(f"budget must be >= 1 (x a one-row forward), got {budget}")
    if max_batch_size <= 1:
        return 1
    per_row = (full_batch_s - one_row_s) / (max_batch_size - 1)
    if per_row <= 0:
        return max_batch_size
    return max(1, min(max_batch_size, 1 + int((budget - 1.0) * one_row_s / per_row)))


__all__ = ["FairBatcher", "rows_within_budget"]
