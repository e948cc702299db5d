"""Stage 2 (the `distill` method): distil a training-only fusion of frozen teachers into the tenant's adapter.

Each batch runs two paths through the frozen encoder E:
  teacher path  E + FusionSet(teachers..., φ_N^first) -> head W_F -> z_T
  student path  E + φ_N                                -> head W_N -> z_S
and minimises `losses.distillation_loss`. Trainable: the fusion's Q, K, V, W_F, φ_N and W_N. Only the
student (φ_N, W_N) is returned: the fusion, W_F and the teachers are dropped, so inference costs one adapter.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from adistill.adapters import AdapterSet
from adistill.backbone import Backbone
from adistill.config import RecipeConfig
from adistill.data import TenantData
from adistill.encoder import Route, encode
from adistill.fusion import FusionSet
from adistill.losses import distillation_loss
from adistill.model import Batch, TenantModel
from adistill.recipes.evaluate import accuracy
from adistill.recipes.loop import FitResult, Progress, fit
from adistill.recipes.stage1 import encode_train


class _Recorder:
    """A route that remembers the output of every adapter site it runs (for the hidden-state MSE term)."""

    def __init__(self, route: Route, sites: tuple[str, ...]) -> None:
        self.route, self.sites, self.outputs = route, sites, list[torch.Tensor]()

    def __call__(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        y = self.route(layer, site, x)
        if site in self.sites:
            self.outputs.append(y)
        return y


def teacher_fusion(backbone: Backbone, teachers: list[AdapterSet], own: AdapterSet, seed: int) -> FusionSet:
    """A fusion over frozen copies of the teachers and of the tenant's own stage-1 adapter."""
    members = [copy.deepcopy(a) for a in [*teachers, own]]
    generator = torch.Generator().manual_seed(seed + 1)
    return FusionSet(members, backbone.num_layers, backbone.hidden_size, generator).to(backbone.device)


def distill(
    backbone: Backbone,
    data: TenantData,
    cfg: RecipeConfig,
    stage1: TenantModel,
    teachers: list[AdapterSet],
    progress: Progress | None = None,
) -> tuple[TenantModel, FitResult]:
    assert isinstance(stage1.adapters, AdapterSet)
    teacher = TenantModel(
        "fusion", copy.deepcopy(stage1.head), teacher_fusion(backbone, teachers, stage1.adapters, cfg.seed)
    )
    student = TenantModel("distill", copy.deepcopy(stage1.head), copy.deepcopy(stage1.adapters))
    sites = cfg.adapter.sites

    def step(batch: Batch) -> torch.Tensor:
        ids, mask = batch.input_ids, batch.attention_mask
        t_route, s_route = _Recorder(teacher.adapters, sites), _Recorder(student.adapters, sites)  # type: ignore[arg-type]
        z_t = teacher.head(encode(backbone.model, ids, mask, t_route), mask)
        z_s = student.head(encode(backbone.model, ids, mask, s_route), mask)
        return distillation_loss(z_s, z_t, batch.labels, cfg.distill, s_route.outputs, t_route.outputs).total

    result = fit(
        "stage2",
        nn.ModuleDict({"student": student, "teacher": teacher}),
        step,
        lambda: accuracy(backbone, student, data.validation, cfg.max_length),
        encode_train(backbone, data, student.labels, cfg.max_length),
        cfg.stage2,
        cfg.seed,
        progress,
    )
    return student, result
