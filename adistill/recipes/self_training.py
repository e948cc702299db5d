"""The self-training control for stage 2's transfer set: the tenant's stage-1 adapter retrained on its own confident
pseudo-labels of the same unlabelled queries, no teachers. If distillation over a transfer set gains only what this
gains, the gain comes from the unlabelled queries, not from the earlier tenants."""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from adistill.backbone import Backbone
from adistill.config import RecipeConfig
from adistill.data import TenantData
from adistill.model import Batch, TenantModel
from adistill.recipes.evaluate import accuracy, calibrate, predict_probs
from adistill.recipes.loop import FitResult, Progress, fit
from adistill.recipes.transfer import TransferSet

log = logging.getLogger(__name__)


def pseudo_labels(
    backbone: Backbone, model: TenantModel, texts: list[str], max_length: int, min_confidence: float
) -> tuple[list[str], list[int]]:
    """The texts `model` labels with a top probability >= `min_confidence`, and those labels (indices)."""
    if not texts:
        return [], []
    top, label = predict_probs(backbone, model, texts, max_length).max(-1)
    keep = (top >= min_confidence).nonzero()[:, 0].tolist()
    return [texts[i] for i in keep], [int(label[i]) for i in keep]


def self_train(
    backbone: Backbone,
    data: TenantData,
    cfg: RecipeConfig,
    stage1: TenantModel,
    progress: Progress | None = None,
    min_confidence: float | None = None,
) -> tuple[TenantModel, FitResult, int]:
    """(model, fit, pseudo-labelled rows): `stage1`'s adapter and head trained further with cross-entropy on the
    labelled rows and its own confident pseudo-labels of `data.unlabeled`, batched like stage 2's transfer set
    (`transfer.ratio`, `transfer.max_per_epoch`) with the stage-2 settings, keeping `transfer.keep`'s weights
    (`RecipeConfig.stage2_over`). `min_confidence` defaults to the out-of-scope threshold calibrated on validation (the
    rows it would answer), else 0.5."""
    if min_confidence is None:
        min_confidence = calibrate(backbone, stage1, data.validation, cfg.max_length) or 0.5
    texts, targets = pseudo_labels(backbone, stage1, data.unlabeled, cfg.max_length, min_confidence)
    log.info("self-training: %d of %d unlabelled rows pseudo-labelled", len(texts), len(data.unlabeled))
    model = TenantModel("adapter", copy.deepcopy(stage1.head), copy.deepcopy(stage1.adapters))
    model.requires_grad_(True).train()
    index = {y: i for i, y in enumerate(model.labels)}
    rows = TransferSet(
        backbone,
        data.train.texts,
        [index[y] for y in data.train.labels],
        texts,
        cfg.transfer,
        cfg.max_length,
        targets=targets,
    )

    def step(batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model.logits(backbone, batch.input_ids, batch.attention_mask), batch.labels)

    validate = lambda: accuracy(backbone, model, data.validation, cfg.max_length)  # noqa: E731
    result = fit("self_training", model, step, validate, rows, cfg.stage2_over(len(texts)), cfg.seed, progress)
    return model, result, len(texts)
