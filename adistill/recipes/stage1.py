"""Stage 1 (the `adapter` method): train the new tenant's adapter and head with cross-entropy, encoder frozen."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adistill.adapters import AdapterSet
from adistill.backbone import Backbone
from adistill.config import RecipeConfig
from adistill.data import TenantData
from adistill.heads import Head
from adistill.model import Batch, Encoded, TenantModel
from adistill.recipes.evaluate import accuracy
from adistill.recipes.loop import FitResult, Progress, fit


def encode_train(backbone: Backbone, data: TenantData, labels: list[str], max_length: int) -> Encoded:
    index = {y: i for i, y in enumerate(labels)}
    return Encoded(backbone, data.train.texts, [index[y] for y in data.train.labels], max_length)


def train_adapter(
    backbone: Backbone, data: TenantData, cfg: RecipeConfig, progress: Progress | None = None
) -> tuple[TenantModel, FitResult]:
    generator = torch.Generator().manual_seed(cfg.seed)
    adapters = AdapterSet(backbone.num_layers, backbone.hidden_size, cfg.adapter, generator)
    head = Head(backbone.hidden_size, data.labels, cfg.pooling, generator)
    model = TenantModel("adapter", head, adapters).to(backbone.device)

    def step(batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model.logits(backbone, batch.input_ids, batch.attention_mask), batch.labels)

    result = fit(
        "stage1",
        model,
        step,
        lambda: accuracy(backbone, model, data.validation, cfg.max_length),
        encode_train(backbone, data, head.labels, cfg.max_length),
        cfg.stage1,
        cfg.seed,
        progress,
    )
    return model, result
