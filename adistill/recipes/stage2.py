"""Stage 2 (the `distill` method): distil a training-only fusion of frozen teachers into the tenant's adapter.

Each batch runs two paths through the frozen encoder E:
  teacher path  E + FusionSet(teachers..., φ_N^first) -> head W_F -> z_T
  student path  E + φ_N                                -> head W_N -> z_S
and minimises `losses.distillation_loss`. Trainable: the fusion's Q, K, V, W_F, φ_N and W_N. Only the
student (φ_N, W_N) is returned: the fusion, W_F and the teachers are dropped, so inference costs one adapter.

With a transfer set (`recipes/transfer.py`) a batch also holds unlabelled rows: they get only the teacher→student
terms, so the teacher path runs on them without gradient (the fusion learns from labelled rows only) unless
`distill.detach_teacher` is off; with `transfer.student_noise` the student sees them with word-pieces hidden, and
with `transfer.neighbours` their targets are mixed with their neighbours' (`NeighbourTargets`). With
`distill.teacher` = `fitted` the fusion is trained first, alone, then frozen: stage 2 then trains only φ_N and W_N.
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
from adistill.losses import UNLABELED, distillation_loss
from adistill.model import Batch, TenantModel
from adistill.recipes.baselines import teacher_fusion, train_fusion
from adistill.recipes.evaluate import accuracy, predict_logits
from adistill.recipes.loop import FitResult, Progress, fit
from adistill.recipes.transfer import (
    NeighbourTargets,
    TransferInputs,
    TransferSet,
    hide_tokens,
    neighbour_index,
    transfer_inputs,
)


class _Recorder:
    """A route that remembers the output of every adapter site it runs (for the hidden-state MSE term)."""

    def __init__(self, route: Route, sites: tuple[str, ...]) -> None:
        self.route, self.sites, self.outputs = route, sites, list[torch.Tensor]()

    def __call__(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        y = self.route(layer, site, x)
        if site in self.sites:
            self.outputs.append(y)
        return y


def distill(
    backbone: Backbone,
    data: TenantData,
    cfg: RecipeConfig,
    stage1: TenantModel,
    teachers: list[AdapterSet],
    progress: Progress | None = None,
    transfer: TransferInputs | None = None,
    fitted_teacher: TenantModel | None = None,
) -> tuple[TenantModel, FitResult]:
    """Stage 2 from `stage1` over `teachers` (none: the fusion holds only the tenant's own adapter). `transfer`: the
    unlabelled inputs (default: `transfer_inputs(backbone, data, cfg)`, the tenant's unlabelled queries).

    With `distill.teacher` = `fitted` the fusion is fitted first (`train_fusion`; or `fitted_teacher`, such a fusion
    already fitted on the same rows) and frozen; the returned fit's seconds then include fitting it."""
    assert isinstance(stage1.adapters, AdapterSet)
    fitted = cfg.distill.teacher == "fitted"
    fit_seconds = 0.0
    if fitted and fitted_teacher is None:
        fitted_teacher, teacher_fit = train_fusion(backbone, data, cfg, stage1, teachers, progress)
        fit_seconds = teacher_fit.seconds
    if fitted:
        assert fitted_teacher is not None
        teacher = copy.deepcopy(fitted_teacher).requires_grad_(False)
    else:
        fusion = teacher_fusion(backbone, teachers, stage1.adapters, cfg.seed)
        teacher = TenantModel("fusion", copy.deepcopy(stage1.head), fusion)
    student = TenantModel("distill", copy.deepcopy(stage1.head), copy.deepcopy(stage1.adapters))
    sites = cfg.adapter.sites
    transfer = transfer if transfer is not None else transfer_inputs(backbone, data, cfg)
    noise = torch.Generator().manual_seed(cfg.seed)  # the student's hidden word-pieces (transfer.student_noise)
    smooth = None
    if cfg.transfer.neighbours > 0 and len(transfer.texts) > 1:
        near = neighbour_index(backbone, transfer.texts, cfg.transfer.neighbours, cfg.max_length)
        smooth = NeighbourTargets(near, cfg.transfer.neighbour_weight, cfg.distill.temperature, len(student.labels))
        if fitted:  # a frozen teacher: every transfer row's target is known before the first step
            logits = predict_logits(backbone, teacher, transfer.texts, cfg.max_length)
            smooth.remember(torch.arange(len(transfer.texts)), logits)
    labelled_rows = len(data.train)  # transfer rows come after the labelled ones in the TransferSet

    def teacher_path(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        route = _Recorder(teacher.adapters, sites)  # type: ignore[arg-type]
        return teacher.head(encode(backbone.model, ids, mask, route), mask), route.outputs

    def step(batch: Batch) -> torch.Tensor:
        labelled = batch.labels != UNLABELED
        n = int(labelled.sum())
        if n < len(labelled):  # labelled rows first, then the transfer rows
            order = torch.cat([labelled.nonzero()[:, 0], (~labelled).nonzero()[:, 0]])
            rows = batch.rows[order.cpu()] if batch.rows is not None else None  # row indices stay on the CPU
            batch = Batch(batch.input_ids[order], batch.attention_mask[order], batch.labels[order], rows)
        ids, mask = batch.input_ids, batch.attention_mask
        if fitted:  # a frozen teacher: targets only
            with torch.no_grad():
                z_t, h_t = teacher_path(ids, mask)
        elif n == len(labelled) or not cfg.distill.detach_teacher:
            z_t, h_t = teacher_path(ids, mask)
        else:  # unlabelled rows only give the teacher's targets: no gradient, no activations kept for them
            z_t, h_t = teacher_path(ids[:n], mask[:n])
            with torch.no_grad():
                z_u, h_u = teacher_path(ids[n:], mask[n:])
            z_t, h_t = torch.cat([z_t, z_u]), [torch.cat([a, b]) for a, b in zip(h_t, h_u)]
        if smooth is not None and n < len(labelled):
            assert batch.rows is not None
            z_t = torch.cat([z_t[:n], smooth(batch.rows[n:] - labelled_rows, z_t[n:])])
        if n < len(labelled) and cfg.transfer.student_noise > 0:
            mask = hide_tokens(mask, n, cfg.transfer.student_noise, noise)
        s_route = _Recorder(student.adapters, sites)  # type: ignore[arg-type]
        z_s = student.head(encode(backbone.model, ids, mask, s_route), mask)
        return distillation_loss(z_s, z_t, batch.labels, cfg.distill, s_route.outputs, h_t).total

    result = fit(
        "stage2",
        student if fitted else nn.ModuleDict({"student": student, "teacher": teacher}),
        step,
        lambda: accuracy(backbone, student, data.validation, cfg.max_length),
        TransferSet(
            backbone, data.train.texts, _label_ids(data, student.labels), transfer.texts, cfg.transfer, cfg.max_length
        ),
        cfg.stage2_over(len(transfer.texts)),
        cfg.seed,
        progress,
    )
    result.seconds += fit_seconds
    return student, result


def _label_ids(data: TenantData, labels: list[str]) -> list[int]:
    index = {y: i for i, y in enumerate(labels)}
    return [index[y] for y in data.train.labels]
