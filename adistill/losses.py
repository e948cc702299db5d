"""The stage-2 (AdapterDistillation) loss, as formulated in docs/method.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adistill.config import DistillConfig

UNLABELED = -100  # the label of an unlabelled (transfer-set) row: only the teacher→student terms see it


@dataclass
class DistillLoss:
    total: torch.Tensor
    student_ce: torch.Tensor
    kd: torch.Tensor
    teacher_ce: torch.Tensor
    hidden_mse: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: DistillConfig,
    student_hidden: list[torch.Tensor] | None = None,
    teacher_hidden: list[torch.Tensor] | None = None,
) -> DistillLoss:
    """α·CE(z_S, y) + (1-α)·τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) + β·CE(z_T, y) + γ·Σ_l MSE(h_S,l, h_T,l).

    Rows labelled `UNLABELED` (the transfer set) enter only the KL and hidden-state terms; the two CE terms are
    means over the labelled rows (zero when a batch has none)."""
    tau = cfg.temperature
    labelled = labels != UNLABELED
    student_ce, teacher_ce = (_ce(z, labels, labelled) for z in (student_logits, teacher_logits))
    target = teacher_logits.detach() if cfg.detach_teacher else teacher_logits
    kd = F.kl_div(
        F.log_softmax(student_logits / tau, -1),
        F.log_softmax(target / tau, -1),
        log_target=True,
        reduction="batchmean",
    ) * (tau * tau)
    hidden_mse = student_logits.new_zeros(())
    if cfg.gamma > 0 and student_hidden and teacher_hidden:
        hidden_mse = sum(
            (F.mse_loss(s, t.detach() if cfg.detach_teacher else t) for s, t in zip(student_hidden, teacher_hidden)),
            hidden_mse,
        )
    total = cfg.alpha * student_ce + (1 - cfg.alpha) * kd + cfg.beta * teacher_ce + cfg.gamma * hidden_mse
    return DistillLoss(total, student_ce, kd, teacher_ce, hidden_mse)


def _ce(logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    if not bool(labelled.any()):
        return logits.new_zeros(())
    return F.cross_entropy(logits[labelled], labels[labelled])
