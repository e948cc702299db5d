"""`train_tenant`: one tenant, any method, config and data in, a trained `TenantModel` and its metrics out."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from adistill.backbone import Backbone
from adistill.config import RecipeConfig
from adistill.data import OOS_LABEL, TenantData
from adistill.errors import ConfigError
from adistill.model import TenantModel
from adistill.recipes.baselines import train_finetune, train_fusion
from adistill.recipes.evaluate import calibrate, evaluate
from adistill.recipes.loop import FitResult, Progress
from adistill.recipes.stage1 import train_adapter
from adistill.recipes.stage2 import distill
from adistill.recipes.transfer import TransferInputs, transfer_inputs
from adistill.store.artifact import Teacher, artifact_files

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: TenantModel
    metrics: dict[str, Any]
    stages: dict[str, FitResult] = field(default_factory=dict)
    teachers: list[Teacher] = field(default_factory=list)

    def files(
        self,
        tenant_id: str,
        backbone: Backbone,
        cfg: RecipeConfig,
        data: dict[str, Any],
        version: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, bytes]:
        """This result as artifact files (`adistill.store.artifact.artifact_files`)."""
        return artifact_files(tenant_id, self.model, backbone, cfg, data, self.metrics, self.teachers, version, extra)


def train_tenant(
    backbone: Backbone,
    data: TenantData,
    cfg: RecipeConfig,
    teachers: list[Teacher] | tuple[Teacher, ...] = (),
    progress: Progress | None = None,
    stage1: tuple[TenantModel, FitResult] | None = None,
) -> TrainResult:
    """Train one tenant with `cfg.method`; teachers are used by `distill` and `fusion` only. `distill` without
    teachers is stage 1 alone, recorded as method `adapter` (the recipe in the metadata still says `distill`).

    `stage1` (a trained stage-1 model and its fit) skips stage 1: onboarding resumes from its checkpoint."""
    teachers = list(teachers) if cfg.method in ("distill", "fusion") else []
    for t in teachers:
        if t.adapters.config != cfg.adapter:
            raise ConfigError(
                f"teacher {t.tenant_id!r} has adapter {t.adapters.config}, the new tenant uses {cfg.adapter}; "
                "teachers must share the adapter shape"
            )
    if cfg.method == "fusion" and not teachers:
        raise ConfigError("method 'fusion' needs at least one teacher")
    stages: dict[str, FitResult] = {}
    transfer = TransferInputs([], "none")
    if cfg.method == "finetune":
        model, stages["finetune"] = train_finetune(backbone, data, cfg, progress)
    else:
        model, stages["stage1"] = stage1 if stage1 is not None else train_adapter(backbone, data, cfg, progress)
        adapters = [t.adapters for t in teachers]
        if cfg.method == "fusion":
            model, stages["fusion"] = train_fusion(backbone, data, cfg, model, adapters, progress)
        elif cfg.method == "distill" and teachers:
            transfer = transfer_inputs(backbone, data, cfg)
            model, stages["stage2"] = distill(backbone, data, cfg, model, adapters, progress, transfer)
        elif cfg.method == "distill":  # stage 1 alone is an adapter, and the artifact says so
            log.warning("no teachers: 'distill' is stage 1 alone for this tenant; its artifact's method is 'adapter'")
            model.method = "adapter"
    if data.unlabeled and transfer.source != "unlabeled":
        log.warning(
            "%s: %d unlabelled queries not used: only stage 2 of 'distill' (with teachers) learns from them",
            data.source,
            len(data.unlabeled),
        )
    model.max_length = cfg.max_length
    model.oos_threshold = calibrate(backbone, model, data.validation, cfg.max_length)
    if model.oos_threshold is None:
        log.warning(
            "%s: no out-of-scope threshold: the validation data has no %r rows, so predictions never flag a query "
            "as out of scope; add %r rows to the validation (or training) data to calibrate one",
            data.source,
            OOS_LABEL,
            OOS_LABEL,
        )
    metrics: dict[str, Any] = {
        "validation": evaluate(backbone, model, data.validation, cfg.max_length),
        "train_examples": len(data.train),
        "seconds": {name: round(r.seconds, 2) for name, r in stages.items()},
        "best_epoch": {name: r.best_epoch for name, r in stages.items()},
        **transfer.metrics(),
    }
    if len(data.test):
        metrics["test"] = evaluate(backbone, model, data.test, cfg.max_length)
    return TrainResult(model, metrics, stages, teachers)
