"""Onboarding on Ray Train: every tenant of a manifest trained as its own `TorchTrainer` run, many at once.

The Ray touch points are few and all here:

- the driver (`onboard_manifest`) snapshots the teachers (adapters already published for the backbone), skips
  tenants already published from the same data and config, and runs one `TorchTrainer.fit()` per tenant in a
  thread pool bounded by `max_concurrent` (`fit()` blocks on its own controller actor; threads are how Ray Tune
  runs Train V2 trainers too);
- each run has one worker with fractional resources (`ScalingConfig(num_workers=1, resources_per_worker=...)`,
  on a GPU when the cluster has one) that reads the tenant's data and the teachers itself (local or s3://),
  trains stage 1, reports a checkpoint, trains stage 2, and reports the finished artifact as the final checkpoint;
- the driver verifies that artifact and publishes it. One writer per tenant: a worker that dies, is retried by
  `FailureConfig` or runs twice never publishes anything, and a run that fails leaves nothing in the registry.

Run names are deterministic (tenant, data URI, recipe, backbone, teachers), so a killed worker is retried from its
latest checkpoint and a resubmitted job resumes every unfinished tenant (a tenant whose artifact was finished but
not yet published is published without retraining). Deterministic errors (bad data, bad config, corrupt teacher)
are reported by the worker to the driver and are not retried; crashes are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from adistill.artifacts import CONFIG, WEIGHTS, artifact_files, artifact_from_files, parse_meta, verify_files
from adistill.backbone import Backbone, load_backbone
from adistill.config import METHODS, RecipeConfig
from adistill.errors import AdistillError, ConfigError, DataError
from adistill.jobs import TenantJob, data_record, load_job_data
from adistill.manifest import Manifest, TenantSpec
from adistill.registry import Registry
from adistill.teachers import SelectionConfig, choose_from_registry
from adistill.tenant_id import validate_tenant_id

log = logging.getLogger(__name__)

STATE = "state.json"  # in every checkpoint: {"stage": "stage1" | "done", "data_fingerprint": ...}
STATUSES = ("published", "skipped", "failed")
BOARD_TIMEOUT_S = 60.0  # a progress-board call slower than this counts as a lost board (progress only)


@dataclass(frozen=True)
class OnboardOptions:
    """How a batch is run. `resources_per_tenant=None`: 1 CPU, plus a share of the GPUs when the cluster has any
    (`GPU = min(1, cluster GPUs / max_concurrent)`). `storage_path=None`: Ray's default (~/ray_results)."""

    backbone: str | None = None
    max_concurrent: int = 2
    resources_per_tenant: dict[str, float] | None = None
    storage_path: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_failures: int = 2
    poll_seconds: float = 0.5
    teacher_selection: SelectionConfig = field(default_factory=SelectionConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.max_concurrent, int) or self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent must be an integer >= 1, got {self.max_concurrent!r}")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ConfigError(f"max_failures must be an integer >= -1, got {self.max_failures!r}")
        res = self.resources_per_tenant
        if res is not None and not (
            isinstance(res, dict)
            and all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
                for k, v in res.items()
            )
            and any(v > 0 for v in res.values())
        ):
            raise ConfigError(
                f'resources_per_tenant must map resource names to numbers >= 0 (e.g. {{"CPU": 1, "GPU": 0.25}}), '
                f"got {res!r}"
            )


@dataclass
class TenantOutcome:
    """One row of the summary."""

    tenant_id: str
    method: str
    status: str  # one of STATUSES
    version: int | None = None
    accuracy: float | None = None  # test accuracy, else validation accuracy
    seconds: float = 0.0
    error: str | None = None
    teachers: list[tuple[str, int]] = field(default_factory=list)
    run_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "method": self.method,
            "status": self.status,
            "version": self.version,
            "accuracy": self.accuracy,
            "seconds": round(self.seconds, 2),
            "error": self.error,
            "teachers": [list(t) for t in self.teachers],
            "run_name": self.run_name,
        }


@dataclass(frozen=True)
class OnboardEvent:
    """A progress line: `status` is queued/skipped/running/stage1/stage2/.../published/failed."""

    tenant_id: str
    status: str
    detail: dict[str, Any] = field(default_factory=dict)


EventSink = Callable[[OnboardEvent], None]


@dataclass(frozen=True)
class TenantPlan:
    """What the driver decided for one tenant: its job, teachers and deterministic run name."""

    job: TenantJob
    teachers: tuple[tuple[str, int], ...]
    run_name: str
    selection: dict[str, Any] | None = None  # how the teachers were chosen (recorded in the artifact)


# ------------------------------------------------------------------------------------------------------ driver


def tenant_config(entry: TenantSpec, base: RecipeConfig, method: str | None = None) -> RecipeConfig:
    """A manifest tenant's recipe: its own `config` (else `base`, the --config file), then the method (the tenant's,
    else its manifest defaults', else `method` from the command line) and shots."""
    cfg = entry.recipe(base)
    if method is not None and entry.method is None:
        cfg = cfg.replace(method=method)
    return cfg


def run_name(job: TenantJob, backbone_fingerprint: str, teachers: tuple[tuple[str, int], ...]) -> str:
    """Deterministic: the same tenant, data URI, recipe, backbone and teachers always map to the same run."""
    key = json.dumps(
        {
            "tenant": job.tenant_id,
            "data": job.data,
            "config": job.config.to_dict(),
            "backbone": backbone_fingerprint,
            "teachers": [list(t) for t in teachers],
        },
        sort_keys=True,
    )
    return f"adistill-{job.tenant_id}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def published_same(
    registry: Registry, job: TenantJob, backbone: Backbone, storage_options: dict[str, Any]
) -> int | None:
    """The latest version of `job.tenant_id` when it was trained from the same data, recipe and backbone."""
    version = registry.latest_version(job.tenant_id)
    if version is None:
        return None
    meta = registry.meta(job.tenant_id, version)
    if meta.get("backbone", {}).get("fingerprint") != backbone.fingerprint or _normalise(
        meta.get("hyperparameters")
    ) != _normalise(job.config.to_dict()):
        return None
    # Same recipe and backbone: compare the data itself (the only time the driver reads a tenant's data).
    try:
        data = load_job_data(job, storage_options)
    except AdistillError:
        return None  # the worker reports the data error
    return version if meta.get("data", {}).get("fingerprint") == data.fingerprint() else None


def absolute_data_uri(uri: str) -> str:
    """Workers run in their own folders: local paths become absolute (URIs with a scheme are left alone)."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def run_storage(storage_path: str | None, storage_options: dict[str, Any]) -> tuple[str | None, Any]:
    """(storage_path, storage_filesystem) for `RunConfig`: local paths absolute; remote URIs (s3://...) through
    the same fsspec filesystem and options as the registry, wrapped for pyarrow."""
    if storage_path is None:
        return None, None
    if "://" not in storage_path or storage_path.startswith("file://"):
        return str(Path(storage_path.removeprefix("file://")).expanduser().resolve()), None
    import pyarrow.fs

    try:
        fs, root = fsspec.core.url_to_fs(storage_path, **storage_options)
    except (ImportError, ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"storage path {storage_path!r}: cannot open its filesystem: {exc}") from exc
    return root.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def default_resources(max_concurrent: int) -> tuple[dict[str, float], bool]:
    """1 CPU per tenant; with GPUs in the cluster also a fraction of one so `max_concurrent` tenants share them."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus <= 0:
        return {"CPU": 1.0}, False
    return {"CPU": 1.0, "GPU": min(1.0, gpus / max_concurrent)}, True


def plan_batch(
    manifest: Manifest,
    registry: Registry,
    backbone: Backbone,
    base_config: RecipeConfig,
    method: str | None,
    storage_options: dict[str, Any],
    emit: EventSink,
    selection: SelectionConfig | None = None,
) -> tuple[list[TenantPlan], list[TenantOutcome]]:
    """Teachers snapshot (taken once, at the start), skip check, teacher selection, run names. Nothing is trained
    here."""
    if method is not None and method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}")
    ids = [t.id for t in manifest.tenants]
    # The batch's own tenants never teach each other (nor an older version of themselves): they run at once.
    teachers = tuple(registry.teachers(backbone.fingerprint, exclude=ids))
    plans, skipped = [], []
    for entry in manifest.tenants:
        cfg = tenant_config(entry, base_config, method)
        job = TenantJob(validate_tenant_id(entry.id), absolute_data_uri(str(entry.data)), cfg)
        used = teachers if cfg.method in ("distill", "fusion") else ()
        version = published_same(registry, job, backbone, storage_options)
        if version is not None:
            meta = registry.meta(job.tenant_id, version)
            outcome = TenantOutcome(
                job.tenant_id,
                cfg.method,
                "skipped",
                version,
                _accuracy(meta),
                teachers=[(t["tenant_id"], t["version"]) for t in meta.get("teachers", [])],
                error=None,
            )
            skipped.append(outcome)
            emit(OnboardEvent(job.tenant_id, "skipped", {"version": version, "reason": "same data and config"}))
            continue
        chosen: dict[str, Any] | None = None
        if used:
            used, chosen = choose_teachers(
                job, used, registry, backbone, selection or SelectionConfig(), storage_options
            )
            emit(OnboardEvent(job.tenant_id, "teachers", chosen))
        plans.append(TenantPlan(job, used, run_name(job, backbone.fingerprint, used), chosen))
    return plans, skipped


def choose_teachers(
    job: TenantJob,
    teachers: tuple[tuple[str, int], ...],
    registry: Registry,
    backbone: Backbone,
    cfg: SelectionConfig,
    storage_options: dict[str, Any],
) -> tuple[tuple[tuple[str, int], ...], dict[str, Any]]:
    """At most `cfg.k` of the published `teachers` for this tenant (adistill.teachers), ranked on metadata."""
    data = None
    if cfg.uses_data:
        try:
            data = load_job_data(job, storage_options)
        except DataError as exc:  # the tenant fails in its worker with this error; it must not stop the batch
            log.warning("%s: teachers not ranked, its data is unusable: %s", job.tenant_id, exc)
            return teachers, {"strategy": cfg.strategy, "k": cfg.k, "skipped": "data unusable"}
    chosen = choose_from_registry(registry, teachers, job.tenant_id, backbone, cfg, data, job.config.max_length)
    return tuple((c.tenant_id, int(c.version or 0)) for c in chosen.chosen), chosen.lineage()


def onboard_manifest(
    manifest: Manifest,
    registry: Registry,
    base_config: RecipeConfig | None = None,
    method: str | None = None,
    options: OnboardOptions | None = None,
    on_event: EventSink | None = None,
) -> list[TenantOutcome]:
    """Train and publish every tenant of `manifest` on Ray Train; one outcome per tenant, in manifest order.

    When something is left to train and Ray is not initialised yet, connects with `ray.init()` (the cluster of a
    `ray job submit`, `RAY_ADDRESS`, or a new local instance) and leaves it running. A tenant's failure is
    recorded in its outcome and never stops the others.
    """
    options = options or OnboardOptions()
    base_config = base_config or RecipeConfig()
    emit = on_event or (lambda event: None)
    # The driver needs the backbone's fingerprint (teachers, skip check, run names); workers load their own copy.
    backbone = load_backbone(options.backbone, "cpu", options.storage_options)
    plans, skipped = plan_batch(
        manifest, registry, backbone, base_config, method, options.storage_options, emit, options.teacher_selection
    )
    outcomes = {o.tenant_id: o for o in skipped}
    if plans:
        for o in _run_plans(plans, registry, backbone, options, emit):
            outcomes[o.tenant_id] = o
    return [outcomes[t.id] for t in manifest.tenants]


def _run_plans(
    plans: list[TenantPlan], registry: Registry, backbone: Backbone, options: OnboardOptions, emit: EventSink
) -> list[TenantOutcome]:
    import ray

    if not ray.is_initialized():
        ray.init()
    if options.resources_per_tenant is None:
        resources, use_gpu = default_resources(options.max_concurrent)
    else:
        resources = dict(options.resources_per_tenant)
        use_gpu = resources.get("GPU", 0) > 0
        cluster = ray.cluster_resources()
        short = {k: v for k, v in resources.items() if v > cluster.get(k, 0.0)}
        if short:  # an autoscaling cluster may still grow; a fixed one never will, and the runs would wait forever
            log.warning("each tenant asks for %s but the cluster has only %s now", short, dict(cluster))
    storage_path, storage_fs = run_storage(options.storage_path, options.storage_options)
    board: Any = ray.remote(num_cpus=0)(_Board).options(name=f"adistill-board-{uuid.uuid4().hex[:12]}").remote()
    board_alive = [True]

    def ask(call: Callable[[], Any], default: Any) -> Any:
        """A board call that cannot hang or fail the batch: a lost board only loses progress lines."""
        if not board_alive[0]:
            return default
        try:
            return ray.get(call(), timeout=BOARD_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            log.warning("progress board lost (%s): tenants keep training, their progress lines stop", exc)
            board_alive[0] = False
            return default

    events: queue.Queue[OnboardEvent] = queue.Queue()
    for p in plans:
        emit(OnboardEvent(p.job.tenant_id, "queued", {"teachers": len(p.teachers), "run": p.run_name}))

    def run_one(plan: TenantPlan) -> TenantOutcome:
        start = time.perf_counter()
        tenant = plan.job.tenant_id
        events.put(OnboardEvent(tenant, "running", {"run": plan.run_name}))
        outcome = TenantOutcome(
            tenant, plan.job.config.method, "failed", teachers=list(plan.teachers), run_name=plan.run_name
        )
        try:
            result = _fit(plan, registry, backbone, options, resources, use_gpu, storage_path, storage_fs, board)
            reported = ask(lambda: board.error.remote(tenant), None)
            if reported:
                outcome.error = reported
            else:
                files = _artifact_from_result(result, tenant)
                meta = parse_meta(files[CONFIG], tenant)
                outcome.version = registry.publish(tenant, files)
                outcome.status, outcome.accuracy = "published", _accuracy(meta)
        except Exception as exc:  # one tenant's failure never stops the batch: it is reported in its outcome
            log.debug("tenant %s failed", tenant, exc_info=True)
            outcome.error = _short_error(exc)
        outcome.seconds = time.perf_counter() - start
        detail = {"version": outcome.version, "accuracy": outcome.accuracy, "error": outcome.error}
        events.put(OnboardEvent(tenant, outcome.status, detail))
        return outcome

    pool = ThreadPoolExecutor(max_workers=options.max_concurrent, thread_name_prefix="onboard")
    futures: list[Future[TenantOutcome]] = [pool.submit(run_one, p) for p in plans]
    try:
        while True:
            done = all(f.done() for f in futures)
            for tenant, event in ask(lambda: board.drain.remote(), []):
                if event.get("status") != "failed":  # a tenant's final line comes from run_one
                    events.put(OnboardEvent(tenant, str(event.pop("status")), event))
            while not events.empty():
                emit(events.get())
            if done:
                break
            time.sleep(options.poll_seconds)
    except KeyboardInterrupt:
        # Queued tenants never start; disconnecting ends the running fits (their actors belong to this driver).
        pool.shutdown(wait=False, cancel_futures=True)
        ray.shutdown()
        raise
    pool.shutdown()
    if board_alive[0]:
        ray.kill(board)
    return [f.result() for f in futures]


def _fit(
    plan: TenantPlan,
    registry: Registry,
    backbone: Backbone,
    options: OnboardOptions,
    resources: dict[str, float],
    use_gpu: bool,
    storage_path: str | None,
    storage_fs: Any,
    board: Any,
) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    train: Any = ray.train  # Train V2 classes (ray's annotations still name some V1 ones)
    spec = WorkerSpec(
        tenant_id=plan.job.tenant_id,
        data=plan.job.data,
        config=plan.job.config.to_dict(),
        backbone=options.backbone,
        backbone_fingerprint=backbone.fingerprint,
        registry=registry.uri,
        storage_options=registry.storage_options,
        data_storage_options=options.storage_options,
        teachers=[list(t) for t in plan.teachers],
        selection=plan.selection,
    )
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={"spec": spec.to_dict(), "board": board},
        scaling_config=train.ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=train.RunConfig(
            name=plan.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=train.CheckpointConfig(num_to_keep=2),
            logging_config=train.LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()


def _artifact_from_result(result: Any, tenant_id: str) -> dict[str, bytes]:
    """The finished artifact in a run's final checkpoint, checksums verified."""
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise AdistillError(f"tenant {tenant_id!r}: the run ended without a checkpoint")
    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / STATE).read_text())
        if state.get("stage") != "done":
            raise AdistillError(f"tenant {tenant_id!r}: the run ended at stage {state.get('stage')!r}, not done")
        files = {name: (Path(folder) / name).read_bytes() for name in (WEIGHTS, CONFIG)}
    verify_files(parse_meta(files[CONFIG], tenant_id), files, f"run artifact of {tenant_id!r}")
    return files


def _accuracy(meta: dict[str, Any]) -> float | None:
    metrics = meta.get("metrics", {})
    for split in ("test", "validation"):
        value = metrics.get(split, {}).get("accuracy")
        if isinstance(value, int | float) and not math.isnan(value):
            return float(value)
    return None


def _short_error(exc: BaseException) -> str:
    """The root cause of a (possibly wrapped) Ray Train error, on one line."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))
    cause: BaseException = exc
    while getattr(cause, "cause", None) is not None or cause.__cause__ is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__  # type: ignore[assignment]
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}".strip()


class _Board:
    """A tiny actor the workers tell their progress and deterministic failures to; the driver drains it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.errors: dict[str, str] = {}

    def put(self, tenant_id: str, event: dict[str, Any]) -> None:
        if event.get("status") == "failed":
            self.errors[tenant_id] = str(event.get("error"))
        else:
            self.errors.pop(tenant_id, None)  # a retry that got further clears an earlier report
        self.events.append((tenant_id, event))

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        out, self.events = self.events, []
        return out

    def error(self, tenant_id: str) -> str | None:
        return self.errors.get(tenant_id)


# ------------------------------------------------------------------------------------------------------ worker


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, as plain data (the dict edge is `to_dict`/`from_dict`)."""

    tenant_id: str
    data: str
    config: dict[str, Any]
    backbone: str | None
    backbone_fingerprint: str
    registry: str
    storage_options: dict[str, Any]
    data_storage_options: dict[str, Any]
    teachers: list[list[Any]]
    selection: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerSpec:
        return cls(**data)


def _worker_main(loop_config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: train one tenant (resuming from the run's checkpoint), report the artifact."""
    import ray

    spec = WorkerSpec.from_dict(loop_config["spec"])
    board = loop_config["board"]

    def tell(status: str, **detail: Any) -> None:
        try:  # progress is best effort: training never waits on, or fails with, the board
            ray.get(board.put.remote(spec.tenant_id, {"status": status, **detail}), timeout=BOARD_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            log.warning("%s: progress not delivered (%s)", spec.tenant_id, exc)

    try:
        train_tenant_in_worker(spec, tell)
    except AdistillError as exc:  # deterministic (data, config, corrupt teacher): report, do not retry
        tell("failed", error=f"{type(exc).__name__}: {exc}")


def train_tenant_in_worker(spec: WorkerSpec, tell: Callable[..., None]) -> None:
    import ray.train
    import ray.train.torch

    from adistill.recipes.train import Teacher

    checkpoint = ray.train.get_checkpoint()
    state, saved = _read_checkpoint(checkpoint)
    if state.get("stage") == "done":  # finished earlier, the driver died before publishing: it is the result
        tell("trained", resumed=True)
        return
    device = ray.train.torch.get_device()
    backbone = load_backbone(spec.backbone, device, spec.data_storage_options)
    if backbone.fingerprint != spec.backbone_fingerprint:
        raise ConfigError(
            f"backbone {spec.backbone!r} on this node has fingerprint {backbone.fingerprint[:12]}, "
            f"the driver's has {spec.backbone_fingerprint[:12]}: every node must load the same weights"
        )
    cfg = RecipeConfig.from_dict(spec.config)
    job = TenantJob(spec.tenant_id, spec.data, cfg)
    tell("reading", device=str(device))
    data = load_job_data(job, spec.data_storage_options)
    if state and state.get("data_fingerprint") != data.fingerprint():
        state, saved = {}, {}  # the data changed under the same URI: start over
    teachers: list[Teacher] = []
    if cfg.method in ("distill", "fusion") and spec.teachers:
        registry = Registry(spec.registry, spec.storage_options)
        teachers = [registry.get(t, backbone, int(v)).as_teacher() for t, v in spec.teachers]

    def progress(event: dict[str, object]) -> None:
        tell(str(event["stage"]), **{k: v for k, v in event.items() if k != "stage"})
        ray.train.report({k: v for k, v in event.items() if isinstance(v, int | float | str)})

    def on_stage1(files: dict[str, bytes], fit: dict[str, Any]) -> None:
        _report_checkpoint(
            {"stage": "stage1", "data_fingerprint": data.fingerprint(), "fit": fit}, files, {"stage": "stage1"}
        )

    result = train_resumable(backbone, data, cfg, teachers, spec.tenant_id, saved, state, on_stage1, progress)
    extra = {"teacher_selection": spec.selection} if spec.selection else None
    files = artifact_files(spec.tenant_id, result, backbone, cfg, data_record(job, data, backbone), extra=extra)
    tell("trained", accuracy=_accuracy(json.loads(files[CONFIG])))
    _report_checkpoint({"stage": "done", "data_fingerprint": data.fingerprint()}, files, {"stage": "done"})


def train_resumable(
    backbone: Backbone,
    data: Any,
    cfg: RecipeConfig,
    teachers: list[Any],
    tenant_id: str,
    saved: dict[str, bytes],
    state: dict[str, Any],
    on_stage1: Callable[[dict[str, bytes], dict[str, Any]], None],
    progress: Callable[[dict[str, object]], None] | None = None,
) -> Any:
    """`train_tenant` with a checkpoint between stage 1 and the rest: stage 1 is loaded from `saved` when the run
    got that far before, else trained and handed to `on_stage1` (which checkpoints it)."""
    from adistill.recipes import train_tenant
    from adistill.recipes.loop import FitResult
    from adistill.recipes.stage1 import train_adapter
    from adistill.recipes.train import TrainResult

    if cfg.method == "finetune" or (cfg.method == "distill" and not teachers):
        return train_tenant(backbone, data, cfg, teachers, progress)  # one stage: nothing to resume between
    if state.get("stage") == "stage1" and saved:
        stage1 = artifact_from_files(saved, backbone, f"stage-1 checkpoint of {tenant_id!r}").model
        stage1.requires_grad_(True).train()
        fit1 = FitResult(**state["fit"])
        log.info("%s: stage 1 restored from its checkpoint", tenant_id)
        if progress is not None:
            progress({"stage": "resumed", "from": "stage1 checkpoint"})
    else:
        stage1, fit1 = train_adapter(backbone, data, cfg, progress)
        stage1_cfg = cfg.replace(method="adapter")
        files = artifact_files(
            tenant_id, TrainResult(stage1, {}, {"stage1": fit1}), backbone, stage1_cfg, {"stage": "stage1"}
        )
        if cfg.method != "adapter":  # `adapter` ends here: nothing to resume into
            on_stage1(files, dict(fit1.__dict__))
    return train_tenant(backbone, data, cfg, teachers, progress, stage1=(stage1, fit1))


def _read_checkpoint(checkpoint: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    if checkpoint is None:
        return {}, {}
    with checkpoint.as_directory() as folder:
        path = Path(folder)
        if not (path / STATE).is_file():
            return {}, {}
        state = json.loads((path / STATE).read_text())
        files = {name: (path / name).read_bytes() for name in (WEIGHTS, CONFIG) if (path / name).is_file()}
    return state, files


def _report_checkpoint(state: dict[str, Any], files: dict[str, bytes], metrics: dict[str, Any]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="adistill-ckpt-") as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        (Path(folder) / STATE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def summary_table(outcomes: list[TenantOutcome]) -> str:
    """The summary the CLI prints: tenant, method, status, version, accuracy, time, teachers, error."""
    header = ("tenant", "method", "status", "version", "accuracy", "time", "teachers", "error")
    rows = [
        (
            o.tenant_id,
            o.method,
            o.status,
            "-" if o.version is None else str(o.version),
            "-" if o.accuracy is None else f"{o.accuracy:.3f}",
            f"{o.seconds:.1f}s",
            str(len(o.teachers)),
            (o.error or "")[:100],
        )
        for o in outcomes
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


__all__ = [
    "OnboardEvent",
    "OnboardOptions",
    "TenantOutcome",
    "onboard_manifest",
    "summary_table",
]
