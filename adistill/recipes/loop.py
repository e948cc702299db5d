"""The one training loop every recipe uses: AdamW, seeded shuffling, best epoch by validation accuracy."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from adistill.config import TrainConfig
from adistill.model import Batch

log = logging.getLogger(__name__)

# Called once per epoch with {"stage", "epoch", "epochs", "loss", "val_accuracy", "best", "seconds"} (seconds since
# the stage started).
Progress = Callable[[dict[str, object]], None]


class Batches(Protocol):
    """What a stage trains on: `model.Encoded` (labelled rows) or `recipes.transfer.TransferSet`."""

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]: ...


@dataclass
class FitResult:
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    seconds: float
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)


def fit(
    stage: str,
    modules: nn.Module,
    step_loss: Callable[[Batch], torch.Tensor],
    validate: Callable[[], float],
    train: Batches,
    cfg: TrainConfig,
    seed: int,
    progress: Progress | None = None,
) -> FitResult:
    """Train the trainable parameters of `modules`, restore the weights of the best validation epoch.

    Only trained epochs compete: stage 2 returns its best stage-2 epoch, not the stage-1 weights it started from."""
    params = [p for p in modules.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{stage}: nothing to train")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    best_state = copy.deepcopy(modules.state_dict())
    best_acc, best_epoch, steps, history = -1.0, 0, 0, []
    start = time.perf_counter()
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        total, count = 0.0, 0
        for batch in train.batches(cfg.batch_size, generator):
            loss = step_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count, steps = (
                total + loss.item() * len(batch.labels),
                count + len(batch.labels),
                steps + 1,
            )
        acc = validate()
        history.append({"epoch": epoch, "loss": total / count, "val_accuracy": acc})
        if acc > best_acc:
            best_acc, best_epoch, best_state = acc, epoch, copy.deepcopy(modules.state_dict())
        if progress is not None:
            progress(
                {
                    "stage": stage,
                    "epoch": epoch,
                    "epochs": cfg.epochs,
                    "loss": total / count,
                    "val_accuracy": acc,
                    "best": best_acc,
                    "seconds": round(time.perf_counter() - start, 3),
                }
            )
        log.debug("%s epoch %d loss %.4f val %.4f", stage, epoch, total / count, acc)
        if cfg.patience is not None and epoch - best_epoch >= cfg.patience:
            break
    modules.load_state_dict(best_state)
    seconds = time.perf_counter() - start
    log.info("%s: best val accuracy %.4f at epoch %d of %d (%.1fs)", stage, best_acc, best_epoch, epoch, seconds)
    return FitResult(best_epoch, best_acc, epoch, seconds, steps, history)
