"""The two-stage recipe with a checkpoint between the stages: what onboarding and tuning both run.

Stage 1 (the tenant's own adapter) is saved as an ordinary artifact (method `adapter`, its fit and data fingerprint
in the metadata); a later run restores it instead of training it again, as long as the data is the same."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from adistill.backbone import Backbone
from adistill.config import RecipeConfig
from adistill.data import TenantData
from adistill.model import TenantModel
from adistill.recipes.loop import FitResult, Progress
from adistill.recipes.stage1 import train_adapter
from adistill.recipes.train import TrainResult, train_tenant
from adistill.store.artifact import Teacher, artifact_files, artifact_from_files

log = logging.getLogger(__name__)


@dataclass
class Stage1:
    """A trained stage 1: the tenant's adapter + head, and how its training went."""

    model: TenantModel
    fit: FitResult


def stage1_files(
    tenant_id: str, stage1: Stage1, backbone: Backbone, cfg: RecipeConfig, data: TenantData
) -> dict[str, bytes]:
    """Stage 1 as artifact files (method `adapter`), restorable with `restore_stage1`."""
    fit = stage1.fit
    metrics = {"validation": {"accuracy": fit.best_val_accuracy}, "best_epoch": {"stage1": fit.best_epoch}}
    record = {"stage": "stage1", "fingerprint": data.fingerprint()}
    cfg = cfg.replace(method="adapter")
    return artifact_files(tenant_id, stage1.model, backbone, cfg, record, metrics, extra={"stage1_fit": fit.__dict__})


def restore_stage1(files: dict[str, bytes], backbone: Backbone, data: TenantData, where: str) -> Stage1 | None:
    """A saved stage 1 ready to train on; None when it was trained on other data (the data changed under its URI)."""
    artifact = artifact_from_files(files, backbone, where)
    if artifact.meta.get("data", {}).get("fingerprint") != data.fingerprint():
        log.info("%s: trained on other data, not restored", where)
        return None
    model = artifact.model
    model.requires_grad_(True).train()
    return Stage1(model, FitResult(**artifact.meta["stage1_fit"]))


def train_resumable(
    tenant_id: str,
    backbone: Backbone,
    data: TenantData,
    cfg: RecipeConfig,
    teachers: list[Teacher],
    progress: Progress | None = None,
    saved_stage1: dict[str, bytes] | None = None,
    on_stage1: Callable[[dict[str, bytes]], None] | None = None,
) -> TrainResult:
    """`train_tenant` with a checkpoint between stage 1 and the rest: stage 1 is restored from `saved_stage1` when
    it fits this data, else trained and handed to `on_stage1` (as artifact files) before stage 2 starts."""
    if cfg.method == "finetune" or (cfg.method == "distill" and not teachers):
        return train_tenant(backbone, data, cfg, teachers, progress)  # one stage: nothing to resume between
    stage1 = None
    if saved_stage1:
        stage1 = restore_stage1(saved_stage1, backbone, data, f"stage-1 checkpoint of {tenant_id!r}")
        if stage1 is not None and progress is not None:
            progress({"stage": "resumed", "from": "stage1 checkpoint"})
    if stage1 is None:
        stage1 = Stage1(*train_adapter(backbone, data, cfg, progress))
        if cfg.method != "adapter" and on_stage1 is not None:  # `adapter` ends here: nothing to resume into
            on_stage1(stage1_files(tenant_id, stage1, backbone, cfg, data))
    return train_tenant(backbone, data, cfg, teachers, progress, stage1=(stage1.model, stage1.fit))
