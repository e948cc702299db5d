"""Ray Tune over stage 2: `adistill tune`. Every Ray touch point of the search is in this module.

- The driver (`tune_tenants`) trains stage 1 **once per tenant** (a Ray task each, in parallel) and stores it as an
  artifact folder in the experiment's storage (`<storage>/<name>/stage1/<tenant>/`); every trial starts from it.
- A Ray Tune `Tuner` runs `_trial_driver` per trial (a tiny function trainable); the driver builds and fits a Ray
  Train `TorchTrainer` whose workers run stage 2 only, one worker per tuned tenant (`--tenants a,b` trains both at
  once). Each worker reports after every epoch; `_MeanReport` averages the workers' reports into one Tune result, so
  the metric is the mean validation accuracy over the tuned tenants.
- `val_accuracy` is the best stage-2 validation accuracy so far (stage 2 returns its best epoch): exactly what
  publishing that trial would give. ASHA stops weak trials at its rungs; Optuna (TPE) or random search proposes
  configs.
- Names are deterministic (tenants, data, space, recipe, backbone, teachers, search settings): running the same
  command again resumes the experiment with `Tuner.restore` (finished trials are kept, unfinished ones restart
  their stage 2) and reuses the stored stage 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import ray
import ray.train
import ray.train.torch
from ray import tune

from adistill.config import Config, RecipeConfig, at_least, require
from adistill.distributed.common import (
    absolute_uri,
    check_resources,
    ensure_ray,
    run_storage,
    ship_teachers,
)
from adistill.distributed.tune_search import Events, EventSink, TrialOutcome, TuneEvent, param_space, trial_outcome
from adistill.distributed.tune_trials import METRIC, stage1_task, trial_driver
from adistill.errors import AdistillError, ConfigError
from adistill.selection import RegistryPool, SelectionConfig, choose_teachers
from adistill.store.checkpoints import RunFolder
from adistill.store.names import CONFIG
from adistill.tune_space import SearchSpace

if TYPE_CHECKING:
    from adistill.manifest import Manifest
    from adistill.store.registry import Registry

log = logging.getLogger(__name__)
DRIVER_CPU = 0.01  # a trial's driver only waits on its Train run (Tune refuses 0)
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("optuna", "random")
DEFAULT_STORAGE = "~/ray_results"


@dataclass(frozen=True)
class TuneOptions(Config):
    """How a search runs. `samples=None`: the space's own `samples`. `resources_per_worker=None`: 1 CPU per tenant,
    plus a share of the GPUs when the cluster has any. `storage_path=None`: ~/ray_results. `time_budget_s`: Tune
    stops the whole search (running trials too) after that long."""

    backbone: str | None = None
    samples: int | None = None
    max_concurrent: int = 2
    scheduler: Literal["asha", "fifo"] = "asha"
    search: Literal["optuna", "random"] = "optuna"
    storage_path: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    resources_per_worker: dict[str, float] | None = None
    seed: int = 0
    time_budget_s: float | None = None
    teacher_selection: SelectionConfig = field(default_factory=SelectionConfig)

    def check(self) -> None:
        at_least(self, 1, "samples", "max_concurrent")
        require(
            self.time_budget_s is None or self.time_budget_s > 0,
            f"time_budget_s must be > 0, got {self.time_budget_s!r}",
        )
        require(
            self.name is None or _safe_name(self.name),
            f"name must be letters, digits, '-', '_' or '.', got {self.name!r}",
        )
        check_resources(self.resources_per_worker)


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


@dataclass
class TuneOutcome:
    name: str
    path: str
    tenants: list[str]
    best_params: dict[str, Any]
    best_recipe: RecipeConfig
    best_metric: float
    trials: list[TrialOutcome]
    stage1_val_accuracy: dict[str, float]
    max_epochs: int
    teacher_selection: dict[str, dict[str, Any]] = field(default_factory=dict)

    def best_config(self) -> dict[str, Any]:
        """The tuned stage-2 settings, flat: temperature, alpha, beta, gamma, detach_teacher, lr, epochs, ..."""
        return {**self.best_recipe.distill.__dict__, **self.best_recipe.stage2.__dict__}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "metric": f"{METRIC} (mean best validation accuracy over the tuned tenants)",
            "tenants": self.tenants,
            "best_config": self.best_config(),
            "best_params": self.best_params,
            "best_metric": self.best_metric,
            "best_recipe": self.best_recipe.to_dict(),
            "stage1_val_accuracy": self.stage1_val_accuracy,
            "max_epochs": self.max_epochs,
            "teacher_selection": self.teacher_selection,
            "trials": [t.to_dict() for t in self.trials],
        }


# ------------------------------------------------------------------------------------------------------ driver


def tune_tenants(
    manifest: Manifest,
    tenant_ids: list[str],
    space: SearchSpace,
    registry: Registry,
    base_config: RecipeConfig | None = None,
    options: TuneOptions | None = None,
    on_event: EventSink | None = None,
) -> TuneOutcome:
    """Search `space` for the manifest tenants `tenant_ids` (teachers: the registry's adapters on the backbone, the
    tuned tenants excluded); returns the best config and every trial. Connects to Ray (`ray.init()`) if needed."""
    from adistill.backbone import load_backbone
    from adistill.recipes.tenant import TenantJob, load_job_data

    options = options or TuneOptions()
    base_config = base_config or RecipeConfig()
    emit = on_event or (lambda event: None)
    if not tenant_ids or len(set(tenant_ids)) != len(tenant_ids):
        raise ConfigError(f"tenants to tune must be distinct and at least one, got {tenant_ids}")
    entries = [manifest.tenant(t) for t in tenant_ids]
    backbone = load_backbone(options.backbone, "cpu", options.storage_options)
    published = registry.adapters_for(backbone.fingerprint, exclude=tenant_ids)
    if not published:
        raise ConfigError(
            f"registry {registry.uri} holds no teacher adapters for backbone {backbone.name!r} "
            f"(tenants {tenant_ids} excluded): stage 2 needs at least one; onboard some tenants first"
        )
    tenants: list[dict[str, Any]] = []
    for e in entries:  # each tuned tenant gets its own teachers, chosen as onboarding would choose them
        recipe = space.apply(e.recipe(base_config)).replace(method="distill")  # tuning searches stage 2
        job = TenantJob(e.id, absolute_uri(str(e.data)), recipe, e.text_column, e.label_column)
        data = load_job_data(job, options.storage_options) if options.teacher_selection.uses_data else None
        pool = RegistryPool(registry, published, backbone)
        selection = choose_teachers(pool, e.id, backbone, recipe, options.teacher_selection, data)
        emit(TuneEvent("teachers", detail={"tenant": e.id, **selection.lineage()}))
        tenants.append(
            {
                "id": e.id,
                "data": job.data,
                "columns": list(job.columns),
                "recipe": recipe.to_dict(),
                "teachers": [list(pair) for pair in selection.pairs],
                "teacher_selection": selection.lineage(),
            }
        )
    epochs = {t["id"]: t["recipe"]["stage2"]["epochs"] for t in tenants}
    if len(set(epochs.values())) > 1:  # the workers of a trial report in lockstep, one report per epoch
        raise ConfigError(f"tenants tuned together must share stage2.epochs (fix it in the space), got {epochs}")
    samples = options.samples or space.samples
    key = {
        "tenants": [[t["id"], t["data"], t["recipe"], t["teachers"]] for t in tenants],
        "space": space.to_dict(),
        "base": base_config.to_dict(),
        "backbone": backbone.fingerprint,
        "search": [options.search, options.scheduler, samples, options.seed],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = options.name or f"tune-{space.name}-{'-'.join(tenant_ids)[:40]}-{digest}"
    storage_uri = options.storage_path or str(Path(DEFAULT_STORAGE).expanduser())
    storage_uri = absolute_uri(storage_uri)
    ensure_ray()  # every check that needs no cluster is done: the recipe fits its teachers, the data reads
    stage1 = _stage1_all(tenants, options, backbone.fingerprint, storage_uri, name, emit)

    resources, use_gpu = _worker_resources(options, len(tenants))
    context = {
        "name": name,
        "tenants": [{**t, "stage1": stage1[t["id"]]["stage"]} for t in tenants],
        "backbone": options.backbone,
        "backbone_fingerprint": backbone.fingerprint,
        "teachers": ship_teachers(registry, {tuple(p) for t in tenants for p in t["teachers"]}),
        "storage_uri": storage_uri,
        "storage_options": options.storage_options,
        "resources": resources,
        "use_gpu": use_gpu,
    }
    trainable = tune.with_resources(tune.with_parameters(trial_driver, context=context), {"CPU": DRIVER_CPU})
    storage_path, storage_fs = run_storage(storage_uri, options.storage_options)
    assert storage_path is not None
    experiment = f"{storage_path.rstrip('/')}/{name}"
    max_t = space.max_epochs(base_config)
    callbacks: list[Any] = [Events(emit, max_t)]
    if tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs):
        emit(TuneEvent("resuming", detail={"path": experiment}))
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True, storage_filesystem=storage_fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(space),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                search_alg=_searcher(options),
                scheduler=_scheduler(options, space, max_t),
                num_samples=samples,
                max_concurrent_trials=options.max_concurrent,
                time_budget_s=options.time_budget_s,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                callbacks=callbacks,
                verbose=0,
            ),
        )
    grid = tuner.fit()
    trials = [trial_outcome(grid[i], space, max_t) for i in range(len(grid))]
    scored = [t for t in trials if t.val_accuracy is not None and not math.isnan(t.val_accuracy)]
    if not scored:
        errors = [t.error for t in trials if t.error]
        raise AdistillError(f"tuning {name}: no trial finished; first error: {errors[0] if errors else 'none'}")
    best = max(scored, key=lambda t: (t.val_accuracy, t.epochs_run))
    base = space.apply(base_config)
    return TuneOutcome(
        name=name,
        path=experiment,
        tenants=list(tenant_ids),
        best_params=best.params,
        best_recipe=space.apply(base_config, best.params) if best.params else base,
        best_metric=float(best.val_accuracy),  # type: ignore[arg-type]
        trials=trials,
        stage1_val_accuracy={t: float(stage1[t]["val_accuracy"]) for t in tenant_ids},
        max_epochs=max_t,
        teacher_selection={t["id"]: t["teacher_selection"] for t in tenants},
    )


def save_recipe(outcome: TuneOutcome, path: str | Path) -> Path:
    """Write the best config as a recipe YAML that `adistill onboard/train --config` accept."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Tuned by `adistill tune` ({outcome.name}): mean best validation accuracy {outcome.best_metric:.4f}\n"
        f"# over tenant(s) {', '.join(outcome.tenants)}; {len(outcome.trials)} trials. Use with --config.\n"
    )
    path.write_text(header + yaml.safe_dump(outcome.best_recipe.to_dict(), sort_keys=False))
    RecipeConfig.from_yaml(path)  # what we wrote must load
    return path


def _searcher(options: TuneOptions) -> Any:
    if options.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=options.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=options.max_concurrent, random_state=options.seed)


def _scheduler(options: TuneOptions, space: SearchSpace, max_t: int) -> Any:
    if options.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_t,
        grace_period=min(space.asha.grace_period, max_t),
        reduction_factor=space.asha.reduction_factor,
        stop_last_trials=False,  # a finished trial ends on its own: Train then releases its workers itself
    )


def _worker_resources(options: TuneOptions, workers: int) -> tuple[dict[str, float], bool]:
    """Per Train worker: 1 CPU, or less when `max_concurrent` trials would not fit the cluster otherwise (each trial's
    driver holds DRIVER_CPU too); with GPUs in the cluster also a share of them."""
    if options.resources_per_worker is not None:
        resources = dict(options.resources_per_worker)
        return resources, resources.get("GPU", 0) > 0
    total = ray.cluster_resources()
    slots = options.max_concurrent * workers
    spare = float(total.get("CPU", 1.0)) - DRIVER_CPU * options.max_concurrent
    cpu = max(0.1, min(1.0, math.floor(100 * spare / slots) / 100))
    gpus = float(total.get("GPU", 0.0))
    if gpus <= 0:
        return {"CPU": cpu}, False
    return {"CPU": cpu, "GPU": min(1.0, gpus / slots)}, True


# ------------------------------------------------------------------------------------------------------ stage 1


def _stage1_all(
    tenants: list[dict[str, Any]],
    options: TuneOptions,
    backbone_fingerprint: str,
    storage_uri: str,
    name: str,
    emit: EventSink,
) -> dict[str, dict[str, Any]]:
    """Stage 1 of every tenant, trained once (Ray tasks, in parallel) or found in the experiment's storage
    (`<storage>/<name>/stage1/<tenant>/`)."""
    out: dict[str, dict[str, Any]] = {}
    pending = {}
    folder = RunFolder(storage_uri, name, options.storage_options)
    resources, use_gpu = _worker_resources(options, len(tenants))
    task = ray.remote(stage1_task).options(
        num_cpus=resources.get("CPU", 0),
        num_gpus=resources.get("GPU", 0),
        resources={k: v for k, v in resources.items() if k not in ("CPU", "GPU")} or None,
    )
    for t in tenants:
        stage = f"stage1/{t['id']}"
        files = folder.read(stage)
        if files is not None:
            out[t["id"]] = {"stage": stage, "val_accuracy": _val_accuracy(files)}
            emit(TuneEvent("stage1", detail={"tenant": t["id"], "reused": f"{folder.root}/{stage}"}))
            continue
        emit(TuneEvent("stage1", detail={"tenant": t["id"], "training": True}))
        spec = {
            "tenant": t,
            "backbone": options.backbone,
            "fingerprint": backbone_fingerprint,
            "storage_options": options.storage_options,
            "use_gpu": use_gpu,
        }
        pending[t["id"]] = (stage, task.remote(spec))
    for tenant_id, (stage, ref) in pending.items():
        files = ray.get(ref)
        folder.write(stage, files)
        out[tenant_id] = {"stage": stage, "val_accuracy": _val_accuracy(files)}
        emit(TuneEvent("stage1", detail={"tenant": tenant_id, "val_accuracy": out[tenant_id]["val_accuracy"]}))
    return out


def _val_accuracy(files: dict[str, bytes]) -> float:
    return float(json.loads(files[CONFIG])["metrics"]["validation"]["accuracy"])


__all__ = ["TrialOutcome", "TuneEvent", "TuneOptions", "TuneOutcome", "save_recipe", "tune_tenants"]
