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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import ray
import ray.train
import ray.train.torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from adistill.config import RecipeConfig
from adistill.errors import AdistillError, ConfigError
from adistill.teachers import SelectionConfig, choose_from_registry
from adistill.tune_space import SearchSpace

if TYPE_CHECKING:
    from adistill.manifest import Manifest
    from adistill.registry import Registry

# The model code (torch, transformers) is imported where it runs: a trial's driver process needs only Ray.

log = logging.getLogger(__name__)

WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"  # as adistill.artifacts names them
METRIC = "val_accuracy"
DRIVER_CPU = 0.01  # a trial's driver only waits on its Train run (Tune refuses 0)
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("optuna", "random")
DEFAULT_STORAGE = "~/ray_results"


@dataclass(frozen=True)
class TuneOptions:
    """How a search runs. `samples=None`: the space's own `samples`. `resources_per_worker=None`: 1 CPU per tenant,
    plus a share of the GPUs when the cluster has any. `storage_path=None`: ~/ray_results. `time_budget_s`: Tune
    stops the whole search (running trials too) after that long."""

    backbone: str | None = None
    samples: int | None = None
    max_concurrent: int = 2
    scheduler: str = "asha"
    search: str = "optuna"
    storage_path: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    resources_per_worker: dict[str, float] | None = None
    seed: int = 0
    time_budget_s: float | None = None
    teacher_selection: SelectionConfig = field(default_factory=SelectionConfig)

    def __post_init__(self) -> None:
        if self.samples is not None and (isinstance(self.samples, bool) or self.samples < 1):
            raise ConfigError(f"samples must be an integer >= 1, got {self.samples!r}")
        if isinstance(self.max_concurrent, bool) or not isinstance(self.max_concurrent, int) or self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent must be an integer >= 1, got {self.max_concurrent!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        if self.search not in SEARCHERS:
            raise ConfigError(f"search must be one of {list(SEARCHERS)}, got {self.search!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"time_budget_s must be > 0, got {self.time_budget_s!r}")
        if self.name is not None and not _safe_name(self.name):
            raise ConfigError(f"name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        res = self.resources_per_worker
        if res is not None and (
            not isinstance(res, dict)
            or not any(isinstance(v, int | float) and v > 0 for v in res.values())
            or any(isinstance(v, bool) or not isinstance(v, int | float) or v < 0 for v in res.values())
        ):
            raise ConfigError(f"resources_per_worker must map resource names to numbers >= 0, got {res!r}")


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


@dataclass(frozen=True)
class TuneEvent:
    """A progress line: status is stage1/started/epoch/finished/stopped/failed."""

    status: str
    trial_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]  # {dotted path: value}
    status: str  # TERMINATED, ERROR
    val_accuracy: float | None
    epochs_run: int
    stopped_early: bool
    per_tenant: dict[str, float] = field(default_factory=dict)
    test_accuracy: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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


EventSink = Callable[[TuneEvent], None]


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
    from adistill.jobs import TenantJob, load_job_data

    options = options or TuneOptions()
    base_config = base_config or RecipeConfig()
    emit = on_event or (lambda event: None)
    if not tenant_ids or len(set(tenant_ids)) != len(tenant_ids):
        raise ConfigError(f"tenants to tune must be distinct and at least one, got {tenant_ids}")
    entries = [manifest.tenant(t) for t in tenant_ids]
    if not ray.is_initialized():
        ray.init()
    backbone = load_backbone(options.backbone, "cpu", options.storage_options)
    teachers = registry.teachers(backbone.fingerprint, exclude=tenant_ids)
    if not teachers:
        raise ConfigError(
            f"registry {registry.uri} holds no teacher adapters for backbone {backbone.name!r} "
            f"(tenants {tenant_ids} excluded): stage 2 needs at least one; onboard some tenants first"
        )
    tenants: list[dict[str, Any]] = []
    for e in entries:  # each tuned tenant gets its own teachers, chosen as onboarding would choose them
        recipe = space.apply(e.recipe(base_config))
        job = TenantJob(e.id, _absolute(str(e.data)), recipe)
        data = load_job_data(job, options.storage_options) if options.teacher_selection.uses_data else None
        selection = choose_from_registry(
            registry, teachers, e.id, backbone, options.teacher_selection, data, recipe.max_length
        )
        emit(TuneEvent("teachers", detail={"tenant": e.id, **selection.lineage()}))
        tenants.append(
            {
                "id": e.id,
                "data": job.data,
                "recipe": recipe.to_dict(),
                "teachers": [[c.tenant_id, int(c.version or 0)] for c in selection.chosen],
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
    storage_uri = _absolute(storage_uri)
    stage1 = _stage1_all(tenants, options, backbone.fingerprint, registry, storage_uri, name, emit)

    resources, use_gpu = _worker_resources(options, len(tenants))
    context = {
        "name": name,
        "tenants": [{**t, "stage1": stage1[t["id"]]["uri"]} for t in tenants],
        "backbone": options.backbone,
        "backbone_fingerprint": backbone.fingerprint,
        "registry": registry.uri,
        "registry_options": registry.storage_options,
        "storage_uri": storage_uri,
        "storage_options": options.storage_options,
        "resources": resources,
        "use_gpu": use_gpu,
    }
    trainable = tune.with_resources(tune.with_parameters(_trial_driver, context=context), {"CPU": DRIVER_CPU})
    storage_path, storage_fs = _run_storage(storage_uri, options.storage_options)
    experiment = f"{storage_path.rstrip('/')}/{name}"
    max_t = space.max_epochs(base_config)
    callbacks: list[Any] = [_Events(emit, max_t)]
    if tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs):
        emit(TuneEvent("resuming", detail={"path": experiment}))
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True, storage_filesystem=storage_fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(space),
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
    trials = [_trial_outcome(grid[i], space, max_t) for i in range(len(grid))]
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


def _param_space(space: SearchSpace) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for p in space.params:
        section, key = p.path.split(".")
        low, high = float(p.low or 0.0), float(p.high or 0.0)
        if p.distribution == "loguniform":
            domain = tune.loguniform(low, high)
        elif p.distribution == "uniform":
            domain = tune.uniform(low, high)
        elif p.distribution == "int":
            domain = tune.randint(int(low), int(high) + 1)
        else:
            domain = tune.choice(list(p.values))
        nested.setdefault(section, {})[key] = domain
    return nested


def _values(config: Mapping[str, Any], space: SearchSpace) -> dict[str, Any]:
    """A trial's nested config -> {dotted path: value} for the searched settings."""
    out = {}
    for path in space.paths:
        section, key = path.split(".")
        value = (config.get(section) or {}).get(key)
        if value is not None or path == "stage2.patience":
            out[path] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """numpy scalars (from the searchers) -> Python numbers, so recipes and JSON hold plain values."""
    return value.item() if value is not None and hasattr(value, "item") else value


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


def _trial_outcome(result: Any, space: SearchSpace, max_t: int) -> TrialOutcome:
    metrics = result.metrics or {}
    error = None
    if result.error is not None:
        lines = [line for line in str(result.error).strip().splitlines() if line.strip()]
        error = f"{type(result.error).__name__}: {lines[-1] if lines else ''}"
    epochs = int(metrics.get("training_iteration", 0) or 0)
    value = metrics.get(METRIC)
    params = _values(result.config or {}, space)
    planned = int(params.get("stage2.epochs") or max_t)
    return TrialOutcome(
        trial_id=str(metrics.get("trial_id") or Path(result.path).name),
        params=params,
        status="ERROR" if error else "TERMINATED",
        val_accuracy=None if value is None else float(value),
        epochs_run=epochs,
        stopped_early=error is None and 0 < epochs < planned,
        per_tenant={k: float(v) for k, v in (metrics.get("per_tenant") or {}).items()},
        test_accuracy=None if metrics.get("test_accuracy") is None else float(metrics["test_accuracy"]),
        error=error,
    )


class _Events(tune.Callback):
    """Forwards trial progress to the caller's event sink (the CLI prints it)."""

    def __init__(self, emit: EventSink, max_t: int) -> None:
        self.emit, self.max_t = emit, max_t

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.emit(TuneEvent("started", trial.trial_id, {"config": trial.config}))

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        detail = {k: result.get(k) for k in ("training_iteration", METRIC, "epoch_val_accuracy", "loss")}
        self.emit(TuneEvent("epoch", trial.trial_id, detail))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        done = int(last.get("training_iteration", 0) or 0)
        planned = int((trial.config.get("stage2") or {}).get("epochs") or self.max_t)
        status = "finished" if done >= planned else "stopped"
        if status == "stopped":
            _release(last.get("placement_group"))
        self.emit(TuneEvent(status, trial.trial_id, {"epochs": done, METRIC: last.get(METRIC)}))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        _release((trial.last_result or {}).get("placement_group"))
        self.emit(TuneEvent("failed", trial.trial_id, {"error": str(getattr(trial, "error_file", ""))}))


def _release(group_hex: str | None) -> None:
    """Remove the worker placement group of a trial that Tune stopped early.

    Stopping a trial kills its driver, and with it the Train controller; Train's own clean-up of the workers'
    placement group (a detached actor that asks the state API whether the controller died) cannot find its
    cluster when several Ray instances run on one host, and the group's CPUs would stay reserved, starving the
    next trials. Removing it here, from the Tune driver, is safe: the run it belonged to is over."""
    if not group_hex:
        return
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table

    try:
        state = placement_group_table().get(group_hex, {}).get("state")
        if state not in (None, "REMOVED"):
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group_hex)))
        log.info("placement group %s of a stopped trial: was %s, released", group_hex[:12], state)
    except Exception as exc:  # best effort: the group may be gone already
        log.warning("could not release placement group %s: %s", group_hex, exc)


# ------------------------------------------------------------------------------------------------------ stage 1


def _stage1_all(
    tenants: list[dict[str, Any]],
    options: TuneOptions,
    backbone_fingerprint: str,
    registry: Registry,
    storage_uri: str,
    name: str,
    emit: EventSink,
) -> dict[str, dict[str, Any]]:
    """Stage 1 of every tenant, trained once (Ray tasks, in parallel) or found in the experiment's storage."""
    out: dict[str, dict[str, Any]] = {}
    pending = {}
    resources, use_gpu = _worker_resources(options, len(tenants))
    task = ray.remote(_stage1_task).options(
        num_cpus=resources.get("CPU", 0),
        num_gpus=resources.get("GPU", 0),
        resources={k: v for k, v in resources.items() if k not in ("CPU", "GPU")} or None,
    )
    for t in tenants:
        uri = f"{storage_uri.rstrip('/')}/{name}/stage1/{t['id']}"
        files = _read_files(uri, options.storage_options)
        if files is not None:
            meta = json.loads(files[CONFIG])
            out[t["id"]] = {"uri": uri, "val_accuracy": meta["metrics"]["validation"]["accuracy"]}
            emit(TuneEvent("stage1", detail={"tenant": t["id"], "reused": uri}))
            continue
        emit(TuneEvent("stage1", detail={"tenant": t["id"], "training": True}))
        spec = {
            "tenant": t,
            "backbone": options.backbone,
            "fingerprint": backbone_fingerprint,
            "storage_options": options.storage_options,
            "use_gpu": use_gpu,
        }
        pending[t["id"]] = (uri, task.remote(spec))
    for tenant_id, (uri, ref) in pending.items():
        files = ray.get(ref)
        _write_files(uri, files, options.storage_options)
        meta = json.loads(files[CONFIG])
        out[tenant_id] = {"uri": uri, "val_accuracy": meta["metrics"]["validation"]["accuracy"]}
        emit(TuneEvent("stage1", detail={"tenant": tenant_id, "val_accuracy": out[tenant_id]["val_accuracy"]}))
    return out


def _stage1_task(spec: dict[str, Any]) -> dict[str, bytes]:
    """A Ray task: train one tenant's stage 1, return it as artifact files (method `adapter`)."""
    import torch

    from adistill.artifacts import artifact_files
    from adistill.backbone import load_backbone
    from adistill.jobs import TenantJob, load_job_data
    from adistill.recipes.stage1 import train_adapter
    from adistill.recipes.train import TrainResult

    device = "cuda" if spec["use_gpu"] and torch.cuda.is_available() else "cpu"
    backbone = load_backbone(spec["backbone"], device, spec["storage_options"])
    _check_fingerprint(backbone.fingerprint, spec["fingerprint"], spec["backbone"])
    tenant = spec["tenant"]
    cfg = RecipeConfig.from_dict(tenant["recipe"]).replace(method="adapter")
    job = TenantJob(tenant["id"], tenant["data"], cfg)
    data = load_job_data(job, spec["storage_options"])
    model, fit = train_adapter(backbone, data, cfg)
    metrics = {"validation": {"accuracy": fit.best_val_accuracy}, "best_epoch": {"stage1": fit.best_epoch}}
    record = {"stage": "stage1", "source": job.data, "fingerprint": data.fingerprint()}
    return artifact_files(tenant["id"], TrainResult(model, metrics, {"stage1": fit}), backbone, cfg, record)


def _absolute(uri: str) -> str:
    """Workers run in their own folders: local paths become absolute (URIs with a scheme are left alone)."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def _run_storage(storage_uri: str, storage_options: dict[str, Any]) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for a RunConfig: a local folder as is, a remote URI (s3://...) through
    fsspec with the same options as the registry, wrapped for pyarrow."""
    if "://" not in storage_uri or storage_uri.startswith("file://"):
        return _absolute(storage_uri), None
    import pyarrow.fs

    try:
        fs, root = fsspec.core.url_to_fs(storage_uri, **storage_options)
    except (ImportError, ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"storage path {storage_uri!r}: cannot open its filesystem: {exc}") from exc
    return root.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _check_fingerprint(found: str, expected: str, spec: str | None) -> None:
    if found != expected:
        raise ConfigError(
            f"backbone {spec!r} on this node has fingerprint {found[:12]}, the driver's has {expected[:12]}: "
            "every node must load the same weights"
        )


def _read_files(uri: str, storage_options: dict[str, Any]) -> dict[str, bytes] | None:
    fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    paths = {name: f"{root}/{name}" for name in (WEIGHTS, CONFIG)}
    if not all(fs.exists(p) for p in paths.values()):
        return None
    return {name: fs.cat_file(p) for name, p in paths.items()}


def _write_files(uri: str, files: dict[str, bytes], storage_options: dict[str, Any]) -> None:
    fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    fs.makedirs(root, exist_ok=True)
    for name in (WEIGHTS, CONFIG):  # the config last: its presence means the folder is complete
        fs.pipe_file(f"{root}/{name}", files[name])


# ------------------------------------------------------------------------------------------------------ trials


def _trial_driver(config: dict[str, Any], context: dict[str, Any]) -> None:
    """A Tune trial: one Ray Train run of stage 2 with this trial's settings, one worker per tuned tenant."""
    train: Any = ray.train  # Train V2 classes (ray's annotations still name some V1 ones)
    trial_id = tune.get_context().get_trial_id()
    storage_path, storage_fs = _run_storage(
        f"{context['storage_uri'].rstrip('/')}/{context['name']}-train", context["storage_options"]
    )
    trainer = ray.train.torch.TorchTrainer(
        _trial_worker,
        train_loop_config={"config": config, "context": context},
        scaling_config=train.ScalingConfig(
            num_workers=len(context["tenants"]),
            use_gpu=context["use_gpu"],
            resources_per_worker=context["resources"],
        ),
        run_config=train.RunConfig(
            name=f"trial-{trial_id}",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            callbacks=[_MeanReport()],
            logging_config=train.LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.fit()


class _MeanReport(TuneReportCallback):
    """One Tune result per round of worker reports: numbers averaged over the workers (tenants), plus each
    tenant's own `val_accuracy` under `per_tenant`."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        merged: dict[str, Any] = {}
        for key in metrics[0]:
            values = [m.get(key) for m in metrics]
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                merged[key] = sum(values) / len(values)  # type: ignore[arg-type]
        merged["per_tenant"] = {str(m.get("tenant")): m.get(METRIC) for m in metrics}
        merged["placement_group"] = metrics[0].get("placement_group")
        super().after_report(run_context, [merged], checkpoint)


def _trial_worker(loop_config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: stage 2 of one tenant (the worker's rank picks it), a report after every epoch."""
    from adistill.artifacts import artifact_from_files
    from adistill.backbone import load_backbone
    from adistill.jobs import TenantJob, load_job_data
    from adistill.recipes.evaluate import accuracy
    from adistill.recipes.stage2 import distill
    from adistill.registry import Registry

    context = loop_config["context"]
    tenant = context["tenants"][ray.train.get_context().get_world_rank()]
    device = ray.train.torch.get_device()
    backbone = load_backbone(context["backbone"], device, context["storage_options"])
    _check_fingerprint(backbone.fingerprint, context["backbone_fingerprint"], context["backbone"])
    values: dict[str, Any] = {}
    for section, settings in loop_config["config"].items():
        values.update({f"{section}.{k}": v for k, v in settings.items()})
    recipe = RecipeConfig.from_dict(tenant["recipe"])
    data = _merge_values(recipe, values)
    cfg = RecipeConfig.from_dict(data)
    job = TenantJob(tenant["id"], tenant["data"], cfg)
    tenant_data = load_job_data(job, context["storage_options"])
    files = _read_files(tenant["stage1"], context["storage_options"])
    if files is None:
        raise AdistillError(f"stage 1 of {tenant['id']!r} is missing from {tenant['stage1']}")
    stage1 = artifact_from_files(files, backbone, f"stage 1 of {tenant['id']!r}").model
    stage1.requires_grad_(True).train()
    registry = Registry(context["registry"], context["registry_options"])
    teachers = [registry.get(t, backbone, int(v)).as_teacher().adapters for t, v in tenant["teachers"]]

    epochs = cfg.stage2.epochs
    group = ray.util.get_current_placement_group()
    sent: list[dict[str, Any]] = []

    def send(metrics: dict[str, Any]) -> None:
        sent.append(metrics)
        ray.train.report(metrics)

    def progress(event: dict[str, object]) -> None:
        metrics = {
            "tenant": tenant["id"],
            "epoch": event["epoch"],
            METRIC: event["best"],
            "epoch_val_accuracy": event["val_accuracy"],
            "loss": event["loss"],
            "placement_group": group.id.hex() if group is not None else None,
        }
        if int(event["epoch"]) < epochs:  # type: ignore[call-overload]
            send(metrics)
        else:
            sent.append(metrics)  # the last one waits for the test accuracy below

    student, fit = distill(backbone, tenant_data, cfg, stage1, teachers, progress)
    last = sent.pop() if sent and sent[-1]["epoch"] == epochs else None
    while len(sent) < epochs - 1:  # stopped by `patience`: every worker reports `epochs` times all the same
        send(
            {
                **(sent[-1] if sent else {}),
                "tenant": tenant["id"],
                "epoch": len(sent) + 1,
                METRIC: fit.best_val_accuracy,
            }
        )
    final = {**(last or sent[-1]), "epoch": epochs, METRIC: fit.best_val_accuracy}
    if len(tenant_data.test):
        final["test_accuracy"] = accuracy(backbone, student, tenant_data.test, cfg.max_length)
    send(final)


def _merge_values(recipe: RecipeConfig, values: dict[str, Any]) -> dict[str, Any]:
    data = recipe.to_dict()
    for path, value in values.items():
        section, key = path.split(".")
        data[section][key] = _plain(value)
    return data


__all__ = ["TrialOutcome", "TuneEvent", "TuneOptions", "TuneOutcome", "save_recipe", "tune_tenants"]
