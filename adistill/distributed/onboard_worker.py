"""The long-lived side of onboarding: a queue actor that hands out tenants, and the Ray Train worker loop.

Each worker loads the backbone once, then pulls tenants from the queue until none are left: reads the tenant's
data, trains it (`recipes.resume.train_resumable`: stage 1, checkpoint, stage 2, evaluation) and hands the
finished artifact back. Workers never publish; the driver does.

A tenant is leased to the worker that took it. Workers heartbeat; when a worker process dies (killed, out of memory)
its leases expire and its tenants go back to the queue, resuming from their stage-1 checkpoints (Ray Train restarts
the worker group, up to `max_failures` times). The queue accepts one result per tenant, so a tenant is published
exactly once even when a slow worker finishes a tenant that was handed out again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from adistill.errors import AdistillError

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # how often a worker says it is alive
LEASE_S = 15.0  # a tenant whose worker has been silent this long goes back to the queue
IDLE_S = 0.5  # how long a worker with nothing to do waits before asking again
DONE = "done"  # `next()`: nothing left, the worker may exit


@dataclass(frozen=True)
class TenantTask:
    """One tenant for a worker, as plain data."""

    tenant_id: str
    data: str
    config: dict[str, Any]
    run_name: str
    teachers: list[tuple[str, int | None]]
    selection: dict[str, Any] | None = None
    columns: tuple[str, str] = ("text", "label")  # the data's text and label columns


@dataclass
class Message:
    """What the queue tells the driver: a progress event, or a tenant's end (`files` or `error`)."""

    tenant_id: str
    status: str
    detail: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] | None = None
    error: str | None = None


class TenantQueue:
    """A Ray actor (0 CPUs): the batch's tenants, their leases, and an outbox the driver drains."""

    def __init__(self, tasks: list[TenantTask], max_attempts: int, lease_s: float = LEASE_S) -> None:
        self.tasks = {t.tenant_id: t for t in tasks}
        self.pending: deque[str] = deque(self.tasks)
        self.leases: dict[str, str] = {}  # tenant -> worker token
        self.attempts: dict[str, int] = {}
        self.seen: dict[str, float] = {}  # worker token -> last heartbeat
        self.resolved: set[str] = set()
        self.outbox: list[Message] = []
        self.max_attempts, self.lease_s = max_attempts, lease_s

    def next(self, token: str) -> TenantTask | str | None:
        """A tenant to train, None (others are still training: ask again soon) or DONE."""
        self.seen[token] = time.monotonic()
        self._expire()
        if self.pending:
            tenant = self.pending.popleft()
            self.leases[tenant] = token
            self.attempts[tenant] = self.attempts.get(tenant, 0) + 1
            return self.tasks[tenant]
        return None if self.leases else DONE

    def heartbeat(self, token: str) -> None:
        self.seen[token] = time.monotonic()

    def event(self, token: str, tenant_id: str, status: str, detail: dict[str, Any]) -> None:
        if self.leases.get(tenant_id) == token:
            self.outbox.append(Message(tenant_id, status, detail))

    def finish(
        self,
        token: str,
        tenant_id: str,
        files: dict[str, bytes] | None,
        error: str | None,
        detail: dict[str, Any],
    ) -> bool:
        """A tenant's end, trained (`files`) or failed (`error`); only the first end of a tenant counts."""
        if tenant_id in self.resolved:
            return False
        self.leases.pop(tenant_id, None)
        if tenant_id in self.pending:
            self.pending.remove(tenant_id)
        self.resolved.add(tenant_id)
        self.outbox.append(Message(tenant_id, "trained" if error is None else "failed", detail, files, error))
        return True

    def abort(self, error: str) -> None:
        """A worker cannot run at all (e.g. another backbone on its node): every unfinished tenant fails with it."""
        for tenant in list(self.tasks):
            if tenant not in self.resolved:
                self.finish(self.leases.get(tenant, ""), tenant, None, error, {})

    def drain(self) -> list[Message]:
        self._expire()
        out, self.outbox = self.outbox, []
        return out

    def unresolved(self) -> list[str]:
        return [t for t in self.tasks if t not in self.resolved]

    def _expire(self) -> None:
        now = time.monotonic()
        for tenant, token in list(self.leases.items()):
            if now - self.seen.get(token, now) <= self.lease_s:
                continue
            del self.leases[tenant]
            if self.attempts[tenant] >= self.max_attempts:
                error = f"WorkerDied: its worker died {self.attempts[tenant]} time(s) while training it"
                self.finish(token, tenant, None, error, {})
            else:
                self.pending.appendleft(tenant)
                self.outbox.append(Message(tenant, "requeued", {"reason": "its worker died"}))


def worker_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: load the backbone once, then train tenants from the queue until it says DONE."""
    import ray.train.torch

    from adistill.distributed.common import TeacherShelf, load_checked_backbone

    queue, ctx = config["queue"], config["context"]
    token = uuid.uuid4().hex
    beating = threading.Event()

    def heartbeat() -> None:
        while not beating.wait(HEARTBEAT_S):
            queue.heartbeat.remote(token)

    threading.Thread(target=heartbeat, daemon=True, name="adistill-heartbeat").start()
    try:
        queue.heartbeat.remote(token)
        try:
            device = ray.train.torch.get_device()
            backbone = load_checked_backbone(ctx["backbone"], device, ctx["data_storage_options"], ctx["fingerprint"])
        except AdistillError as exc:  # deterministic: every tenant would fail the same way, retrying is no use
            ray.get(queue.abort.remote(f"{type(exc).__name__}: {exc}"))
            return
        shelf = TeacherShelf(ctx["teachers"], backbone)
        while True:
            task = ray.get(queue.next.remote(token))
            if task == DONE:
                return
            if task is None:
                time.sleep(IDLE_S)
                continue
            _train_one(task, queue, token, backbone, shelf, ctx)
    finally:
        beating.set()


def _train_one(task: TenantTask, queue: Any, token: str, backbone: Any, shelf: Any, ctx: dict[str, Any]) -> None:
    """Train one tenant and hand its artifact (or its error) to the queue; never raises for a tenant's fault."""
    from adistill.config import RecipeConfig
    from adistill.distributed.common import short_error
    from adistill.distributed.metrics import onboarding
    from adistill.recipes.resume import train_resumable
    from adistill.recipes.tenant import TenantJob, data_record, load_job_data
    from adistill.store.checkpoints import RunFolder

    start = time.perf_counter()
    resumed: list[str] = []  # stages restored from a checkpoint: not run (nor timed) again here

    def tell(status: str, **detail: Any) -> None:
        queue.event.remote(token, task.tenant_id, status, detail)  # progress is fire-and-forget

    def progress(event: dict[str, object]) -> None:
        if event["stage"] == "resumed":
            resumed.append("stage1")
        tell(str(event["stage"]), **{k: v for k, v in event.items() if k != "stage"})

    try:
        cfg = RecipeConfig.from_dict(task.config)
        job = TenantJob(task.tenant_id, task.data, cfg, *task.columns)
        tell("reading", device=str(backbone.device), pid=os.getpid())
        data = load_job_data(job, ctx["data_storage_options"])
        onboarding.stage("read", time.perf_counter() - start)
        folder = RunFolder(ctx["storage_uri"], task.run_name, ctx["storage_options"])
        teachers = shelf.get(task.teachers) if cfg.method in ("distill", "fusion") else []
        trained = time.perf_counter()
        result = train_resumable(
            task.tenant_id, backbone, data, cfg, teachers, progress, folder.read("stage1"), folder.writer("stage1")
        )
        for stage, fit in result.stages.items():
            if stage not in resumed:
                onboarding.stage(stage, fit.seconds)
        packed = time.perf_counter()
        extra = {"teacher_selection": task.selection} if task.selection else None
        files = result.files(task.tenant_id, backbone, cfg, data_record(job, data, backbone), extra=extra)
        train_seconds = time.perf_counter() - trained
        folder.write("done", files)  # a driver that dies now publishes it on the next run without retraining
        onboarding.stage("package", time.perf_counter() - packed)
        detail = {"seconds": time.perf_counter() - start, "train_seconds": train_seconds}
        ray.get(queue.finish.remote(token, task.tenant_id, files, None, detail))
    except Exception as exc:  # a tenant's failure (bad data, bad config, a crash in its training) is its own
        log.debug("tenant %s failed", task.tenant_id, exc_info=True)
        error = f"{type(exc).__name__}: {exc}" if isinstance(exc, AdistillError) else short_error(exc)
        ray.get(queue.finish.remote(token, task.tenant_id, None, error, {"seconds": time.perf_counter() - start}))
