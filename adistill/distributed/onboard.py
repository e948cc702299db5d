"""Onboarding on Ray Train: a manifest's tenants trained by one long-lived worker group, published by the driver.

- The driver (`onboard_manifest`) loads the backbone's fingerprint, snapshots the teachers (adapters already
  published for the backbone), skips tenants already published from the same data and config, chooses each new
  tenant's teachers, and ships the chosen teachers' files to the object store once for the whole batch.
- One `TorchTrainer` run with `workers` workers (each `resources_per_worker`: a CPU, or a GPU fraction such as
  `{"GPU": 0.25}` to pack four onto one GPU). Each worker loads the backbone once and trains tenants handed out by
  a queue actor until none are left (`onboard_worker`).
- The driver drains the queue: prints progress, verifies each finished artifact and publishes it. One writer per
  tenant: workers never publish, and a tenant that fails leaves nothing in the registry.

Metrics (adistill.distributed.metrics, exported by Ray while it is connected): each tenant's outcome, the batch's
tenants per hour and the publish time from the driver; read, training-stage and packaging times from the workers.

Run names are deterministic (tenant, data URI, recipe, backbone, teachers) and name each tenant's checkpoints
(`store.checkpoints.RunFolder`): a resubmitted job resumes a tenant from its stage-1 checkpoint, and publishes a
tenant that finished training before its driver died without retraining it. A tenant's own failure (bad data, bad
config, a crash in its training) fails it alone; a worker process that dies hands its tenant back to the queue.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from adistill.backbone import Backbone, load_backbone
from adistill.config import Config, RecipeConfig, at_least
from adistill.distributed.common import (
    absolute_uri,
    check_resources,
    default_resources,
    ensure_ray,
    run_storage,
    ship_teachers,
    short_error,
    uses_gpu,
    warn_if_short,
    workers_that_fit,
)
from adistill.distributed.metrics import onboarding
from adistill.distributed.onboard_worker import Message, TenantQueue, TenantTask, worker_loop
from adistill.errors import AdistillError
from adistill.manifest import Manifest
from adistill.onboard_plan import (
    EventSink,
    OnboardEvent,
    TenantOutcome,
    TenantPlan,
    check_data,
    plan_batch,
    summary_table,
)
from adistill.reports import meta_accuracy
from adistill.selection import SelectionConfig
from adistill.store.artifact import parse_meta, verify_files
from adistill.store.checkpoints import RunFolder
from adistill.store.names import CONFIG
from adistill.store.registry import Registry

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "~/ray_results"


@dataclass(frozen=True)
class OnboardOptions(Config):
    """How a batch runs. `workers=None`: as many workers as the cluster holds now (at most one per tenant).
    `resources_per_worker=None`: 1 CPU, plus an equal share of the GPUs when the cluster has any.
    `storage_path`: where Train runs and tenants' checkpoints go (default ~/ray_results; shared storage such as
    s3:// on a multi-node cluster). `max_failures`: worker-group restarts, and how often a tenant goes back to the
    queue after its worker died."""

    backbone: str | None = None
    workers: int | None = None
    resources_per_worker: dict[str, float] | None = None
    storage_path: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_failures: int = 2
    poll_seconds: float = 0.5
    teacher_selection: SelectionConfig = field(default_factory=SelectionConfig)

    def check(self) -> None:
        at_least(self, 1, "workers")
        at_least(self, 0, "max_failures", "poll_seconds")
        check_resources(self.resources_per_worker)


# ------------------------------------------------------------------------------------------------------ driver


def onboard_manifest(
    manifest: Manifest,
    registry: Registry,
    base_config: RecipeConfig | None = None,
    method: str | None = None,
    options: OnboardOptions | None = None,
    on_event: EventSink | None = None,
) -> list[TenantOutcome]:
    """Train and publish every tenant of `manifest` on Ray Train; one outcome per tenant, in manifest order.

    When something is left to train, connects to Ray if needed (`ensure_ray`) and leaves it running. A tenant's
    failure is recorded in its outcome and never stops the others."""
    options = options or OnboardOptions()
    base_config = base_config or RecipeConfig()
    emit = on_event or (lambda event: None)
    # Every tenant's data is read and checked first: a tenant with unusable data fails now, before any model loads.
    failed = check_data(manifest, base_config, method, options.storage_options, emit)
    # The driver needs the backbone's fingerprint (teachers, skip check, run names); workers load their own copy.
    backbone = load_backbone(options.backbone, "cpu", options.storage_options)
    plans, skipped = plan_batch(
        manifest,
        registry,
        backbone,
        base_config,
        method,
        options.storage_options,
        emit,
        options.teacher_selection,
        failed,
    )
    outcomes = {o.tenant_id: o for o in skipped}
    if plans:
        batch = _Batch(plans, registry, backbone, options, emit)
        for o in batch.run():
            outcomes[o.tenant_id] = o
    for o in skipped:  # recorded once Ray is up, if the batch started it (no Ray: nothing exports metrics)
        onboarding.outcome(o.status)
    return [outcomes[t.id] for t in manifest.tenants]


class _Batch:
    """One batch's run: finished-but-unpublished tenants published first, then a worker group for the rest."""

    def __init__(
        self, plans: list[TenantPlan], registry: Registry, backbone: Backbone, options: OnboardOptions, emit: EventSink
    ) -> None:
        self.plans, self.registry, self.backbone, self.options = plans, registry, backbone, options
        self.storage_uri = absolute_uri(options.storage_path or DEFAULT_STORAGE)
        self.outcomes: dict[str, TenantOutcome] = {}
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self._emit = emit

    def emit(self, event: OnboardEvent) -> None:
        with self.lock:
            self._emit(event)

    def folder(self, plan: TenantPlan) -> RunFolder:
        return RunFolder(self.storage_uri, plan.run_name, self.options.storage_options)

    def run(self) -> list[TenantOutcome]:
        finished = [(plan, self.folder(plan).read("done")) for plan in self.plans]
        todo = [plan for plan, files in finished if files is None]
        if todo:
            ensure_ray()  # before publishing the finished ones, so that their outcomes reach the metrics too
        for plan, files in finished:
            if files is not None:  # trained before a driver died: publish it without retraining
                self.emit(OnboardEvent(plan.job.tenant_id, "resumed", {"from": "finished artifact"}))
                self.publish(plan, files, {"seconds": 0.0, "train_seconds": 0.0})
        if todo:
            self.train(todo)
        return [self.outcomes[p.job.tenant_id] for p in self.plans]

    def train(self, plans: list[TenantPlan]) -> None:
        options = self.options
        workers = options.workers
        resources = options.resources_per_worker or default_resources(workers or len(plans))
        warn_if_short(resources, "worker")
        if workers is None:
            workers = workers_that_fit(resources, len(plans))
        teachers = ship_teachers(self.registry, {t for p in plans for t in p.teachers})
        for p in plans:
            self.emit(OnboardEvent(p.job.tenant_id, "queued", {"teachers": len(p.teachers), "run": p.run_name}))
        context = {
            "backbone": options.backbone,
            "fingerprint": self.backbone.fingerprint,
            "data_storage_options": options.storage_options,
            "storage_uri": self.storage_uri,
            "storage_options": options.storage_options,
            "teachers": teachers,
        }
        self.run_group(plans, min(workers, len(plans)), resources, context)

    def run_group(
        self, plans: list[TenantPlan], workers: int, resources: dict[str, float], context: dict[str, Any]
    ) -> None:
        """One Train run of `workers` workers over `plans`, drained until every tenant has an outcome."""
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        train: Any = ray.train  # Train V2 classes (ray's annotations still name some V1 ones)
        by_id = {p.job.tenant_id: p for p in plans}
        tasks = [
            TenantTask(
                p.job.tenant_id,
                p.job.data,
                p.job.config.to_dict(),
                p.run_name,
                list(p.teachers),
                p.selection,
                p.job.columns,
            )
            for p in plans
        ]
        queue: Any = ray.remote(num_cpus=0)(TenantQueue).remote(tasks, self.options.max_failures + 1)
        storage_path, storage_fs = run_storage(self.storage_uri, self.options.storage_options)
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"queue": queue, "context": context},
            torch_config=TorchConfig(backend="gloo"),  # tenants train independently: no collectives, on CPU or GPU
            scaling_config=train.ScalingConfig(
                num_workers=workers, use_gpu=uses_gpu(resources), resources_per_worker=resources
            ),
            run_config=train.RunConfig(
                name=f"adistill-onboard-{uuid.uuid4().hex[:12]}",
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=train.FailureConfig(max_failures=self.options.max_failures),
                logging_config=train.LoggingConfig(log_level="WARNING"),
            ),
        )
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit()
            except Exception as exc:  # the group failed for good: its unfinished tenants fail below
                failure.append(exc)

        for p in plans:
            self.emit(OnboardEvent(p.job.tenant_id, "running", {"run": p.run_name}))
        thread = threading.Thread(target=fit, daemon=True, name="onboard-fit")
        thread.start()
        try:
            while True:
                ended = not thread.is_alive()
                for message in ray.get(queue.drain.remote()):
                    self.handle(by_id[message.tenant_id], message)
                if all(t in self.outcomes for t in by_id) or ended:
                    break
                time.sleep(self.options.poll_seconds)
        except KeyboardInterrupt:
            ray.shutdown()  # disconnecting ends the run (its actors belong to this driver)
            raise
        thread.join()
        reason = short_error(failure[0]) if failure else "the worker group ended before training it"
        for tenant, plan in by_id.items():
            if tenant not in self.outcomes:
                self.finish(plan, TenantOutcome(tenant, plan.job.config.method, "failed", error=reason))
        ray.kill(queue)

    def handle(self, plan: TenantPlan, message: Message) -> None:
        if message.status == "trained" and message.files is not None:
            self.publish(plan, message.files, message.detail)
        elif message.status == "failed":
            outcome = TenantOutcome(plan.job.tenant_id, plan.job.config.method, "failed", error=message.error)
            outcome.seconds = float(message.detail.get("seconds", 0.0))
            self.finish(plan, outcome)
        else:
            self.emit(OnboardEvent(plan.job.tenant_id, message.status, message.detail))

    def publish(self, plan: TenantPlan, files: dict[str, bytes], detail: dict[str, Any]) -> None:
        """Verify a finished artifact and publish it; its checkpoints go once it is in the registry."""
        tenant = plan.job.tenant_id
        outcome = TenantOutcome(tenant, plan.job.config.method, "failed", teachers=list(plan.teachers))
        outcome.run_name = plan.run_name
        outcome.seconds = float(detail.get("seconds", 0.0))
        outcome.train_seconds = float(detail.get("train_seconds", 0.0))
        try:
            start = time.perf_counter()
            meta = parse_meta(files[CONFIG], tenant)
            verify_files(meta, files, f"finished artifact of {tenant!r}")
            outcome.version = self.registry.publish(tenant, files)
            outcome.status, outcome.accuracy = "published", meta_accuracy(meta)[0]
            onboarding.stage("publish", time.perf_counter() - start)
            self.folder(plan).remove()
        except AdistillError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        self.finish(plan, outcome)

    def finish(self, plan: TenantPlan, outcome: TenantOutcome) -> None:
        self.outcomes[outcome.tenant_id] = outcome
        done, total = len(self.outcomes), len(self.plans)
        hours = (time.monotonic() - self.started) / 3600
        rate = done / hours if hours > 0 else 0.0
        detail = {
            "version": outcome.version,
            "accuracy": outcome.accuracy,
            "error": outcome.error,
            "seconds": round(outcome.seconds, 1),
            "done": done,
            "total": total,
            "tenants_per_hour": round(rate, 1),
            "eta_s": round((total - done) / rate * 3600) if rate > 0 else None,
        }
        onboarding.outcome(outcome.status)
        onboarding.rate(rate)
        self.emit(OnboardEvent(outcome.tenant_id, outcome.status, detail))


__all__ = [
    "OnboardEvent",
    "OnboardOptions",
    "TenantOutcome",
    "onboard_manifest",
    "summary_table",
]
