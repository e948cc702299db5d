"""Accuracy, out-of-scope metrics and threshold calibration for one `TenantModel`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from adistill.backbone import Backbone
from adistill.data import Split
from adistill.heads import calibrate_threshold
from adistill.model import Encoded, TenantModel

EVAL_BATCH = 128


# Called after each scored batch with the number of texts in it (a progress bar's `update`).
BatchProgress = Callable[[int], object]


@torch.no_grad()
def predict_logits(
    backbone: Backbone,
    model: TenantModel,
    texts: list[str],
    max_length: int,
    batch_size: int = EVAL_BATCH,
    progress: BatchProgress | None = None,
) -> torch.Tensor:
    """(len(texts), num_labels) logits, in the order of `texts`."""
    encoded = Encoded(backbone, texts, [0] * len(texts), max_length)
    order = sorted(range(len(texts)), key=lambda i: len(encoded.ids[i]))  # similar lengths batch together
    out = torch.zeros(len(texts), len(model.labels))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = encoded.batch(index)
        out[index] = model.logits(backbone, batch.input_ids, batch.attention_mask).float().cpu()
        if progress is not None:
            progress(len(index))
    return out


def predict_probs(
    backbone: Backbone,
    model: TenantModel,
    texts: list[str],
    max_length: int,
    batch_size: int = EVAL_BATCH,
    progress: BatchProgress | None = None,
) -> torch.Tensor:
    """(len(texts), num_labels) probabilities, in the order of `texts`."""
    return predict_logits(backbone, model, texts, max_length, batch_size, progress).softmax(-1)


def accuracy(backbone: Backbone, model: TenantModel, split: Split, max_length: int) -> float:
    """In-scope accuracy (out-of-scope rows are ignored)."""
    split = split.in_scope()
    if not len(split):
        return float("nan")
    index = {y: i for i, y in enumerate(model.labels)}
    gold = torch.tensor([index[y] for y in split.labels])
    pred = predict_probs(backbone, model, split.texts, max_length).argmax(-1)
    return float((pred == gold).float().mean())


def evaluate(
    backbone: Backbone, model: TenantModel, split: Split, max_length: int, progress: BatchProgress | None = None
) -> dict[str, float]:
    """In-scope accuracy; with out-of-scope rows and a threshold also OOS recall and accepted accuracy. Counts
    (`examples`, `oos_examples`) are ints. `progress(n)` is called after each batch of n texts is scored."""
    inside, outside = split.in_scope(), split.out_of_scope()
    metrics: dict[str, float] = {"examples": len(inside), "accuracy": float("nan")}
    if not len(inside):
        return metrics
    index = {y: i for i, y in enumerate(model.labels)}
    probs = predict_probs(backbone, model, inside.texts, max_length, progress=progress)
    correct = probs.argmax(-1) == torch.tensor([index[y] for y in inside.labels])
    metrics["accuracy"] = float(correct.float().mean())
    if model.oos_threshold is not None and len(outside):
        t = model.oos_threshold
        oos_top = predict_probs(backbone, model, outside.texts, max_length, progress=progress).max(-1).values
        metrics["oos_examples"] = len(outside)
        metrics["oos_recall"] = float((oos_top < t).float().mean())
        metrics["in_scope_accepted_accuracy"] = float(((probs.max(-1).values >= t) & correct).float().mean())
    return metrics


def calibrate(backbone: Backbone, model: TenantModel, validation: Split, max_length: int) -> float | None:
    """Out-of-scope threshold from validation data, or None when it has no out-of-scope rows."""
    inside, outside = validation.in_scope(), validation.out_of_scope()
    if not len(outside) or not len(inside):
        return None
    index = {y: i for i, y in enumerate(model.labels)}
    probs = predict_probs(backbone, model, inside.texts, max_length)
    correct = probs.argmax(-1) == torch.tensor([index[y] for y in inside.labels])
    oos_top = predict_probs(backbone, model, outside.texts, max_length).max(-1).values
    return calibrate_threshold(probs.max(-1).values, oos_top, correct)
