"""Baselines built from the same parts: `fusion` (AdapterFusion kept at inference) and `finetune`. The fusion over
the teachers and the tenant's own adapter is also stage 2's teacher (`recipes/stage2.py`)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from adistill.adapters import AdapterSet
from adistill.backbone import Backbone
from adistill.config import RecipeConfig
from adistill.data import TenantData
from adistill.fusion import FusionSet
from adistill.heads import Head
from adistill.model import Batch, TenantModel
from adistill.recipes.evaluate import accuracy
from adistill.recipes.loop import FitResult, Progress, fit
from adistill.recipes.stage1 import encode_train


def teacher_fusion(backbone: Backbone, teachers: list[AdapterSet], own: AdapterSet, seed: int) -> FusionSet:
    """A fusion over frozen copies of the teachers and of the tenant's own stage-1 adapter."""
    members = [copy.deepcopy(a) for a in [*teachers, own]]
    generator = torch.Generator().manual_seed(seed + 1)
    return FusionSet(members, backbone.num_layers, backbone.hidden_size, generator).to(backbone.device)


def _fit_ce(
    stage: str,
    backbone: Backbone,
    model: TenantModel,
    data: TenantData,
    cfg: RecipeConfig,
    progress: Progress | None,
) -> FitResult:
    def step(batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model.logits(backbone, batch.input_ids, batch.attention_mask), batch.labels)

    train_cfg = cfg.finetune if stage == "finetune" else cfg.stage2
    validate = lambda: accuracy(backbone, model, data.validation, cfg.max_length)  # noqa: E731
    return fit(
        stage,
        model,
        step,
        validate,
        encode_train(backbone, data, model.labels, cfg.max_length),
        train_cfg,
        cfg.seed,
        progress,
    )


def train_fusion(
    backbone: Backbone,
    data: TenantData,
    cfg: RecipeConfig,
    stage1: TenantModel,
    teachers: list[AdapterSet],
    progress: Progress | None = None,
) -> tuple[TenantModel, FitResult]:
    """AdapterFusion: fusion over the frozen teachers + the tenant's stage-1 adapter, trained with its head."""
    assert isinstance(stage1.adapters, AdapterSet)
    fusion = teacher_fusion(backbone, teachers, stage1.adapters, cfg.seed)
    model = TenantModel("fusion", copy.deepcopy(stage1.head), fusion)
    return model, _fit_ce("fusion", backbone, model, data, cfg, progress)


def train_finetune(
    backbone: Backbone, data: TenantData, cfg: RecipeConfig, progress: Progress | None = None
) -> tuple[TenantModel, FitResult]:
    """The whole encoder trained for this tenant: an accuracy upper bound and a storage worst case."""
    encoder = copy.deepcopy(backbone.model).requires_grad_(True)
    head = Head(backbone.hidden_size, data.labels, cfg.pooling, torch.Generator().manual_seed(cfg.seed))
    model = TenantModel("finetune", head, encoder=encoder).to(backbone.device)
    return model, _fit_ce("finetune", backbone, model, data, cfg, progress)
