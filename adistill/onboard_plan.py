"""What onboarding decides before any Ray work: each tenant's recipe, teachers and run name, which tenants are
already published (and skipped), and the outcome rows and summary table. No Ray here."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from adistill.backbone import Backbone
from adistill.config import METHODS, RecipeConfig
from adistill.data import LABEL_COLUMN, TEXT_COLUMN
from adistill.errors import AdistillError, ConfigError, DataError
from adistill.manifest import Manifest, TenantSpec
from adistill.recipes.tenant import TenantJob, load_job_data
from adistill.reports import meta_accuracy, text_table
from adistill.selection import RegistryPool, SelectionConfig, choose_teachers
from adistill.store.registry import Registry
from adistill.store.uris import absolute_uri
from adistill.tenant_id import validate_tenant_id

log = logging.getLogger(__name__)

STATUSES = ("published", "skipped", "failed")
Pairs = tuple[tuple[str, int | None], ...]


@dataclass
class TenantOutcome:
    """One row of the summary."""

    tenant_id: str
    method: str
    status: str  # one of STATUSES
    version: int | None = None
    accuracy: float | None = None  # test accuracy, else validation accuracy
    seconds: float = 0.0  # the tenant's time on its worker (data read to finished artifact)
    error: str | None = None
    teachers: list[tuple[str, int | None]] = field(default_factory=list)
    run_name: str | None = None
    train_seconds: float = 0.0  # of which inside training and evaluation

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "method": self.method,
            "status": self.status,
            "version": self.version,
            "accuracy": self.accuracy,
            "seconds": round(self.seconds, 2),
            "train_seconds": round(self.train_seconds, 2),
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
    teachers: Pairs
    run_name: str
    selection: dict[str, Any] | None = None  # how the teachers were chosen (recorded in the artifact)


def tenant_config(entry: TenantSpec, base: RecipeConfig, method: str | None = None) -> RecipeConfig:
    """A manifest tenant's recipe: its own `config` (else `base`, the --config file), then the method (the tenant's,
    else its manifest defaults', else `method` from the command line) and shots."""
    cfg = entry.recipe(base)
    if method is not None and entry.method is None:
        cfg = cfg.replace(method=method)
    return cfg


def run_name(job: TenantJob, backbone_fingerprint: str, teachers: Pairs) -> str:
    """Deterministic: the same tenant, data URI (and column names), recipe, backbone and teachers always map to the
    same run."""
    key_parts: dict[str, Any] = {
        "tenant": job.tenant_id,
        "data": job.data,
        "config": job.config.to_dict(),
        "backbone": backbone_fingerprint,
        "teachers": [list(t) for t in teachers],
    }
    if job.columns != (TEXT_COLUMN, LABEL_COLUMN):  # the default names keep the run names they always had
        key_parts["columns"] = list(job.columns)
    key = json.dumps(key_parts, sort_keys=True)
    return f"adistill-{job.tenant_id}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _same_recipe(recorded: Any, cfg: RecipeConfig) -> bool:
    """Whether an artifact's recorded recipe is `cfg`, read as a recipe: a field added since it was trained counts
    at its default, so a new recipe field does not retrain every published tenant (not even where its default
    trains differently from the version that trained it: docs/onboarding.md says so)."""
    if not isinstance(recorded, dict):
        return False
    try:
        return _normalise(RecipeConfig.from_dict(recorded).to_dict()) == _normalise(cfg.to_dict())
    except ConfigError:  # a recipe this version cannot read: train again
        return False


def published_same(
    registry: Registry, job: TenantJob, backbone: Backbone, storage_options: dict[str, Any]
) -> int | None:
    """The latest version of `job.tenant_id` when it was trained from the same data, recipe and backbone."""
    version = registry.latest_version(job.tenant_id)
    if version is None:
        return None
    meta = registry.meta(job.tenant_id, version)
    if meta.get("backbone", {}).get("fingerprint") != backbone.fingerprint or not _same_recipe(
        meta.get("hyperparameters"), job.config
    ):
        return None
    # Same recipe and backbone: compare the data itself (the only time the driver reads a tenant's data).
    try:
        data = load_job_data(job, storage_options)
    except AdistillError:
        return None  # the worker reports the data error
    return version if meta.get("data", {}).get("fingerprint") == data.fingerprint() else None


def tenant_job(entry: TenantSpec, base_config: RecipeConfig, method: str | None = None) -> TenantJob:
    """A manifest tenant as a job: its recipe (`tenant_config`), absolute data URI and column names."""
    cfg = tenant_config(entry, base_config, method)
    uri = absolute_uri(str(entry.data))
    return TenantJob(validate_tenant_id(entry.id), uri, cfg, entry.text_column, entry.label_column)


def check_data(
    manifest: Manifest,
    base_config: RecipeConfig,
    method: str | None,
    storage_options: dict[str, Any],
    emit: EventSink,
    threads: int = 8,
) -> list[TenantOutcome]:
    """Read and validate every tenant's data (columns, labels, splits) before any model loads: a tenant whose data
    is unusable fails here, at once, with its `DataError` (the others go on). Returns those failures."""

    def check(entry: TenantSpec) -> TenantOutcome | None:
        job = tenant_job(entry, base_config, method)
        try:
            load_job_data(job, storage_options)
        except DataError as exc:
            return TenantOutcome(job.tenant_id, job.config.method, "failed", error=f"{type(exc).__name__}: {exc}")
        return None

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="data-check") as pool:
        failed = [o for o in pool.map(check, manifest.tenants) if o is not None]
    for outcome in failed:
        emit(OnboardEvent(outcome.tenant_id, "failed", {"error": outcome.error}))
    return failed


def plan_batch(
    manifest: Manifest,
    registry: Registry,
    backbone: Backbone,
    base_config: RecipeConfig,
    method: str | None,
    storage_options: dict[str, Any],
    emit: EventSink,
    selection: SelectionConfig | None = None,
    failed: list[TenantOutcome] | None = None,
) -> tuple[list[TenantPlan], list[TenantOutcome]]:
    """Teachers snapshot (taken once, at the start), skip check, teacher selection, run names. Nothing is trained
    here; a recipe that does not fit the teachers is refused here, before any Ray work. `failed` (`check_data`'s
    outcomes) are not planned; they come back with the skipped tenants, as the outcomes of tenants not trained."""
    if method is not None and method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}")
    ids = [t.id for t in manifest.tenants]
    # The batch's own tenants never teach each other (nor an older version of themselves): they run at once.
    published = registry.adapters_for(backbone.fingerprint, exclude=ids)
    plans, skipped = [], list(failed or [])
    done = {o.tenant_id for o in skipped}
    for entry in manifest.tenants:
        if entry.id in done:
            continue
        job = tenant_job(entry, base_config, method)
        cfg = job.config
        version = published_same(registry, job, backbone, storage_options)
        if version is not None:
            meta = registry.meta(job.tenant_id, version)
            teachers = [(t["tenant_id"], t["version"]) for t in meta.get("teachers", [])]
            skipped.append(
                TenantOutcome(job.tenant_id, cfg.method, "skipped", version, meta_accuracy(meta)[0], teachers=teachers)
            )
            emit(OnboardEvent(job.tenant_id, "skipped", {"version": version, "reason": "same data and config"}))
            continue
        used: Pairs = ()
        chosen: dict[str, Any] | None = None
        if cfg.method in ("distill", "fusion") and published:
            used, chosen = _choose(job, registry, published, backbone, selection or SelectionConfig(), storage_options)
            emit(OnboardEvent(job.tenant_id, "teachers", chosen))
        if cfg.method == "distill" and not used:
            note = "no teachers: stage 1 alone, published as method 'adapter'"
            emit(OnboardEvent(job.tenant_id, "teachers", {"note": note}))
        plans.append(TenantPlan(job, used, run_name(job, backbone.fingerprint, used), chosen))
    return plans, skipped


def _choose(
    job: TenantJob,
    registry: Registry,
    published: list[tuple[str, int]],
    backbone: Backbone,
    cfg: SelectionConfig,
    storage_options: dict[str, Any],
) -> tuple[Pairs, dict[str, Any]]:
    """At most `cfg.k` of the published teachers for this tenant (`adistill.selection`)."""
    pool = RegistryPool(registry, published, backbone)
    data = None
    if cfg.uses_data:
        try:
            data = load_job_data(job, storage_options)
        except DataError as exc:  # the tenant fails in its worker with this error; it must not stop the batch
            log.warning("%s: teachers not ranked, its data is unusable: %s", job.tenant_id, exc)
            return (), {"strategy": cfg.strategy, "k": cfg.k, "skipped": "data unusable"}
    selection = choose_teachers(pool, job.tenant_id, backbone, job.config, cfg, data)
    return selection.pairs, selection.lineage()


def summary_table(outcomes: list[TenantOutcome]) -> str:
    """The summary the CLI prints: tenant, method, status, version, accuracy, time, teachers, error."""
    header = ["tenant", "method", "status", "version", "accuracy", "time", "teachers", "error"]
    rows = [
        [
            o.tenant_id,
            o.method,
            o.status,
            "-" if o.version is None else str(o.version),
            "-" if o.accuracy is None else f"{o.accuracy:.3f}",
            f"{o.seconds:.1f}s",
            str(len(o.teachers)),
            (o.error or "")[:100],
        ]
        for o in outcomes
    ]
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    return text_table(header, rows) + "\n" + ", ".join(f"{n} {s}" for s, n in counts.items())
