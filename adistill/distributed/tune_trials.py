"""The workers of `adistill tune`: stage 1 once per tuned tenant (Ray tasks), then per trial a Ray Train run of
stage 2 with one worker per tenant, reporting after every epoch."""

from __future__ import annotations

from typing import Any

import ray
import ray.train
import ray.train.torch
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from adistill.config import RecipeConfig
from adistill.distributed.common import TeacherShelf, load_checked_backbone, run_storage
from adistill.errors import AdistillError
from adistill.store.checkpoints import RunFolder

METRIC = "val_accuracy"


def stage1_task(spec: dict[str, Any]) -> dict[str, bytes]:
    """A Ray task: train one tenant's stage 1, return it as artifact files (`recipes.resume.stage1_files`)."""
    import torch

    from adistill.recipes.resume import Stage1, stage1_files
    from adistill.recipes.stage1 import train_adapter
    from adistill.recipes.tenant import TenantJob, load_job_data

    device = "cuda" if spec["use_gpu"] and torch.cuda.is_available() else "cpu"
    backbone = load_checked_backbone(spec["backbone"], device, spec["storage_options"], spec["fingerprint"])
    tenant = spec["tenant"]
    cfg = RecipeConfig.from_dict(tenant["recipe"])
    job = TenantJob(tenant["id"], tenant["data"], cfg, *tenant["columns"])
    data = load_job_data(job, spec["storage_options"])
    return stage1_files(tenant["id"], Stage1(*train_adapter(backbone, data, cfg)), backbone, cfg, data)


# ------------------------------------------------------------------------------------------------------ trials


def trial_driver(config: dict[str, Any], context: dict[str, Any]) -> None:
    """A Tune trial: one Ray Train run of stage 2 with this trial's settings, one worker per tuned tenant."""
    train: Any = ray.train  # Train V2 classes (ray's annotations still name some V1 ones)
    trial_id = ray.tune.get_context().get_trial_id()
    storage_path, storage_fs = run_storage(
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
        used = {str(m.get("tenant")): m["unlabeled_examples"] for m in metrics if "unlabeled_examples" in m}
        if used:  # how many unlabelled queries each tenant's stage 2 trains on
            merged["unlabeled_examples"] = used
        merged["placement_group"] = metrics[0].get("placement_group")
        super().after_report(run_context, [merged], checkpoint)


class _Lockstep:
    """Reports of one worker of a trial. Train's `report` is a barrier across the trial's workers, so every worker
    reports exactly `epochs` times: a tenant that early-stopped repeats its best so far, and the last report waits
    for the test accuracy."""

    def __init__(self, tenant_id: str, epochs: int, unlabeled: int) -> None:
        group = ray.util.get_current_placement_group()
        self.base: dict[str, Any] = {"tenant": tenant_id, "placement_group": group.id.hex() if group else None}
        if unlabeled:  # in every report, as a scheduler may stop the trial after any epoch
            self.base["unlabeled_examples"] = unlabeled  # stage 2 of tune (teachers, `distill`) trains on them all
        self.epochs, self.sent, self.last = epochs, 0, dict(self.base)

    def epoch(self, event: dict[str, object]) -> None:
        if event.get("stage") != "stage2":
            return
        metrics = {"epoch": event["epoch"], METRIC: event["best"], "epoch_val_accuracy": event["val_accuracy"]}
        self.last = {**self.base, **metrics, "loss": event["loss"]}
        if self.sent < self.epochs - 1:
            self.send(self.last)

    def send(self, metrics: dict[str, Any]) -> None:
        self.sent += 1
        ray.train.report(metrics)

    def close(self, best: float, test_accuracy: float | None) -> None:
        while self.sent < self.epochs - 1:  # stopped by `patience`
            self.send({**self.last, "epoch": self.sent + 1, METRIC: best})
        final = {**self.last, "epoch": self.epochs, METRIC: best}
        if test_accuracy is not None:
            final["test_accuracy"] = test_accuracy
        self.send(final)


def _trial_worker(loop_config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: stage 2 of one tenant (the worker's rank picks it) from its shared stage 1, through
    the same recipe as onboarding (`recipes.resume.train_resumable`), a report after every epoch."""
    from adistill.recipes.resume import train_resumable
    from adistill.recipes.tenant import TenantJob, load_job_data

    context = loop_config["context"]
    tenant = context["tenants"][ray.train.get_context().get_world_rank()]
    device = ray.train.torch.get_device()
    backbone = load_checked_backbone(
        context["backbone"], device, context["storage_options"], context["backbone_fingerprint"]
    )
    cfg = RecipeConfig.from_dict(_merge_values(RecipeConfig.from_dict(tenant["recipe"]), loop_config["config"]))
    data = load_job_data(TenantJob(tenant["id"], tenant["data"], cfg, *tenant["columns"]), context["storage_options"])
    stage1 = RunFolder(context["storage_uri"], context["name"], context["storage_options"]).read(tenant["stage1"])
    if stage1 is None:
        raise AdistillError(f"stage 1 of {tenant['id']!r} is missing from the experiment's storage")
    teachers = TeacherShelf(context["teachers"], backbone).get([tuple(p) for p in tenant["teachers"]])
    reports = _Lockstep(tenant["id"], cfg.stage2.epochs, len(data.unlabeled))
    result = train_resumable(tenant["id"], backbone, data, cfg, teachers, reports.epoch, saved_stage1=stage1)
    test = result.metrics.get("test", {}).get("accuracy")
    reports.close(result.stages["stage2"].best_val_accuracy, test)


def _merge_values(recipe: RecipeConfig, config: dict[str, Any]) -> dict[str, Any]:
    """A trial's nested config ({section: {key: value}}) over the tenant's recipe."""
    data = recipe.to_dict()
    for section, settings in config.items():
        for key, value in settings.items():
            data[section][key] = plain(value)
    return data


def plain(value: Any) -> Any:
    """numpy scalars (from the searchers) -> Python numbers, so recipes and JSON hold plain values."""
    return value.item() if value is not None and hasattr(value, "item") else value
