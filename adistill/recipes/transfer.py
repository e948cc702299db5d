"""Stage 2's transfer set: the labelled rows plus unlabelled inputs, batched together.

The inputs are the tenant's unlabelled queries (`TenantData.unlabeled`) or, when it brought none and the recipe opts
in (`transfer.augment`), perturbed copies of its labelled queries (`adistill/augment.py`). Every batch holds up to
`stage2.batch_size` labelled rows first, then `transfer.ratio` times as many transfer rows labelled
`losses.UNLABELED` (or, for the self-training control, with pseudo-labels). An epoch draws at most
`transfer.max_per_epoch` transfer rows (a fresh seeded sample each epoch) and runs until they are used up or every
labelled row has been seen once; labelled rows are reshuffled whenever they run out, so every batch holds some.
Without transfer inputs the batches are exactly the labelled batches stage 2 always had.

`NeighbourTargets` (opt in, `transfer.neighbours`) smooths the teacher's targets on transfer rows over each row's
nearest transfer rows in the frozen encoder's sentence space (`neighbour_index`).
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
from adistill.encoder import encode, pool
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


@torch.no_grad()
def neighbour_index(backbone: Backbone, texts: list[str], k: int, max_length: int, chunk: int = 256) -> torch.Tensor:
    """(len(texts), min(k, len(texts) - 1)) indices of each text's nearest other texts: cosine similarity of the
    frozen encoder's mean-pooled last hidden states (no adapter), computed `chunk` rows at a time."""
    encoded = Encoded(backbone, texts, [0] * len(texts), max_length)
    vectors = torch.zeros(len(texts), backbone.hidden_size)
    for start in range(0, len(texts), chunk):
        batch = encoded.batch(list(range(start, min(start + chunk, len(texts)))))
        hidden = encode(backbone.model, batch.input_ids, batch.attention_mask)
        vectors[start : start + len(batch.labels)] = pool(hidden, batch.attention_mask, "mean").float().cpu()
    vectors = torch.nn.functional.normalize(vectors, dim=-1)
    k = min(k, len(texts) - 1)
    out = torch.zeros(len(texts), max(k, 0), dtype=torch.long)
    for start in range(0, len(texts), chunk):
        sims = vectors[start : start + chunk] @ vectors.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -float("inf")  # never its own neighbour
        out[start : start + chunk] = sims.topk(k, dim=-1).indices
    return out


class NeighbourTargets:
    """Distillation targets on transfer rows smoothed over their neighbours (`transfer.neighbours`).

    With p = softmax(z_T / τ) the teacher's target for a row, the row's target becomes
        p' = (1 - w)·p + w·mean_j p_j      over its neighbours j whose target is known,
    where p_j is row j's target the last time the teacher saw it (this epoch or the one before: no extra teacher
    pass), or, for a frozen teacher (`distill.teacher: fitted`), its target from one pass over every transfer row
    before the first step (`remember`). A row none of whose neighbours has been seen yet keeps p. It is returned as
    logits τ·log p', so the loss's softmax(·/τ) gives back p'. The idea: where the teacher errs on one query, its
    neighbours (queries that read alike, mostly of the same intent) mostly do not. Measured: docs/method.md,
    "Neighbour targets"."""

    def __init__(self, neighbours: torch.Tensor, weight: float, temperature: float, num_labels: int) -> None:
        self.neighbours, self.weight, self.temperature = neighbours, weight, temperature
        self.bank = torch.zeros(len(neighbours), num_labels)
        self.seen = torch.zeros(len(neighbours), dtype=torch.bool)

    def remember(self, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Store the teacher's targets for transfer rows `rows` (indices into the transfer texts); returns them."""
        p = (logits / self.temperature).softmax(-1)
        self.bank[rows] = p.detach().float().cpu()
        self.seen[rows] = True
        return p

    def __call__(self, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Targets (as logits) for transfer rows `rows` given the teacher's logits on them."""
        p = self.remember(rows, logits)
        near = self.neighbours[rows]
        known = self.seen[near].unsqueeze(-1).float()
        count = known.sum(1)
        mean = (self.bank[near] * known).sum(1) / count.clamp(min=1)
        w = self.weight * (count > 0).float()
        mixed = (1 - w.to(p.device)) * p + w.to(p.device) * mean.to(p.device, p.dtype)
        return self.temperature * mixed.clamp_min(1e-12).log()


def _order(n: int, generator: torch.Generator | None) -> list[int]:
    return torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
