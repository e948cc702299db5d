"""The one training loop every recipe uses: AdamW, seeded shuffling, early stopping on validation accuracy, and the
weights of the best epoch, the last one, or their mean over the epochs (`TrainConfig.keep`)."""

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
    """`best_epoch`: the epoch whose weights were kept (`keep: average`: the last epoch averaged);
    `best_val_accuracy`: the validation accuracy of the weights returned."""

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
    """Train the trainable parameters of `modules`, then load the weights `cfg.keep` names: the best validation
    epoch's, the last epoch's, or the mean over every epoch run of each trained parameter (frozen ones untouched).

    Only trained epochs compete: stage 2 returns its best stage-2 epoch, not the stage-1 weights it started from."""
    params = [p for p in modules.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{stage}: nothing to train")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    best_state = copy.deepcopy(modules.state_dict()) if cfg.keep == "best" else {}
    trained = [name for name, p in modules.named_parameters() if p.requires_grad]
    summed: dict[str, torch.Tensor] = {}  # keep = average: the sum of every epoch's trained weights
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
        if acc > best_acc or (cfg.ties == "later" and acc == best_acc):
            best_acc, best_epoch = acc, epoch
            if cfg.keep == "best":
                best_state = copy.deepcopy(modules.state_dict())
        if cfg.keep == "average":
            _accumulate(summed, modules, trained)
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
    kept_acc, kept_epoch = best_acc, best_epoch
    if cfg.keep == "best":
        modules.load_state_dict(best_state)
    elif cfg.keep == "last":
        kept_acc, kept_epoch = history[-1]["val_accuracy"], epoch
    else:  # average: the mean weights are a model no epoch validated
        modules.load_state_dict({name: total / epoch for name, total in summed.items()}, strict=False)
        kept_acc, kept_epoch = validate(), epoch
    seconds = time.perf_counter() - start
    log.info(
        "%s: kept the %s weights, val accuracy %.4f (best %.4f at epoch %d of %d; %.1fs)",
        stage,
        cfg.keep,
        kept_acc,
        best_acc,
        best_epoch,
        epoch,
        seconds,
    )
    return FitResult(kept_epoch, kept_acc, epoch, seconds, steps, history)


def _accumulate(summed: dict[str, torch.Tensor], modules: nn.Module, names: list[str]) -> None:
    state = modules.state_dict()
    for name in names:
        if name in summed:
            summed[name] += state[name]
        else:
            summed[name] = state[name].detach().clone()
