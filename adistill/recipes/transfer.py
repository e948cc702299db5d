"""Stage 2's transfer set: the labelled rows plus unlabelled inputs, batched together.

The inputs are the tenant's unlabelled queries (`TenantData.unlabeled`) or, when it brought none and the recipe opts
in (`transfer.augment`), perturbed copies of its labelled queries (`adistill/augment.py`). Every batch holds up to
`stage2.batch_size` labelled rows first, then `transfer.ratio` times as many transfer rows labelled
`losses.UNLABELED` (or, for the self-training control, with pseudo-labels). An epoch draws at most
`transfer.max_per_epoch` transfer rows (a fresh seeded sample each epoch) and runs until they are used up or every
labelled row has been seen once; labelled rows are reshuffled whenever they run out, so every batch holds some.
Without transfer inputs the batches are exactly the labelled batches stage 2 always had.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from adistill.augment import augment
from adistill.backbone import Backbone
from adistill.config import RecipeConfig, TransferConfig
from adistill.data import TenantData
from adistill.losses import UNLABELED
from adistill.model import Batch, Encoded


@dataclass
class TransferInputs:
    """The texts stage 2 distils on beside the labelled rows, and where they came from."""

    texts: list[str]
    source: str  # "unlabeled", "augmented" or "none"

    def metrics(self) -> dict[str, int]:
        """What an artifact's metrics record about them: `unlabeled_examples` or `augmented_examples`."""
        return {f"{self.source}_examples": len(self.texts)} if self.texts else {}


def transfer_inputs(backbone: Backbone, data: TenantData, cfg: RecipeConfig) -> TransferInputs:
    """The tenant's unlabelled queries; else, when `transfer.augment` opts in, perturbed labelled queries; else none."""
    if data.unlabeled:
        return TransferInputs(list(data.unlabeled), "unlabeled")
    t = cfg.transfer
    if t.augment == "none":
        return TransferInputs([], "none")
    mask = str(backbone.tokenizer.mask_token or "[MASK]")
    return TransferInputs(
        augment(data.train.texts, t.augment, t.augment_copies, t.augment_rate, cfg.seed, mask), "augmented"
    )


class TransferSet:
    """Labelled rows and transfer rows tokenized once; `batches` is what `loop.fit` iterates each epoch."""

    def __init__(
        self,
        backbone: Backbone,
        texts: list[str],
        labels: list[int],
        transfer: list[str],
        cfg: TransferConfig,
        max_length: int,
        targets: list[int] | None = None,
    ) -> None:
        if targets is not None and len(targets) != len(transfer):
            raise ValueError(f"{len(targets)} targets for {len(transfer)} transfer rows")
        targets = targets if targets is not None else [UNLABELED] * len(transfer)
        self.rows = Encoded(backbone, texts + transfer, labels + targets, max_length)
        self.labelled, self.transfer, self.cfg = len(texts), len(transfer), cfg

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        if not self.transfer:  # exactly the labelled batches of a plain stage
            yield from self.rows.batches(batch_size, generator)
            return
        drawn = _order(self.transfer, generator)[: self.cfg.max_per_epoch or self.transfer]
        per_batch = max(1, round(self.cfg.ratio * batch_size))
        width = min(batch_size, self.labelled)
        steps = max(math.ceil(self.labelled / width), math.ceil(len(drawn) / per_batch))
        stream: list[int] = []
        while len(stream) < steps * width:  # labelled rows, reshuffled each time they run out
            stream += _order(self.labelled, generator)
        for step in range(steps):
            extra = [self.labelled + i for i in drawn[step * per_batch : (step + 1) * per_batch]]
            yield self.rows.batch(stream[step * width : (step + 1) * width] + extra)


def hide_tokens(mask: torch.Tensor, first: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """A copy of the attention `mask` in which rows `first:` (the transfer rows) lose each word-piece with probability
    `rate` (noisy student: the student sees less of the query than its teacher). A row's first and last tokens
    ([CLS], [SEP]) always stay, and a row that would lose every word-piece between them keeps them all."""
    out = mask.clone()
    rows = out[first:]
    if rate <= 0 or rows.numel() == 0:
        return out
    lengths = rows.sum(1, keepdim=True)
    pos = torch.arange(rows.shape[1], device=rows.device).unsqueeze(0)
    inner = (pos > 0) & (pos < lengths - 1)
    drop = (torch.rand(rows.shape, generator=generator) < rate).to(rows.device) & inner
    drop[(drop == inner).all(1)] = False  # nothing of the query would be left
    rows[drop] = 0
    return out


def _order(n: int, generator: torch.Generator | None) -> list[int]:
    return torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
