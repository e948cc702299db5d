"""What one tenant runs at inference, and the tokenized batches it runs on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from adistill.adapters import AdapterSet
from adistill.backbone import Backbone
from adistill.encoder import encode, no_adapter
from adistill.fusion import FusionSet
from adistill.heads import Head


class TenantModel(nn.Module):
    """A tenant's inference path on the shared encoder.

    - `adapter` / `distill`: `adapters` is the tenant's `AdapterSet` (one bottleneck per site);
    - `fusion`: `adapters` is a `FusionSet` over frozen adapters (kept at inference);
    - `finetune`: `encoder` is the tenant's own copy of the whole encoder, no adapters.

    `key` identifies these exact weights (an artifact's checksum once saved) for caches and adapter banks.
    """

    def __init__(
        self,
        method: str,
        head: Head,
        adapters: AdapterSet | FusionSet | None = None,
        encoder: nn.Module | None = None,
        oos_threshold: float | None = None,
        key: str | None = None,
        max_length: int = 32,
    ) -> None:
        super().__init__()
        self.method = method
        self.head = head
        self.adapters = adapters
        self.encoder = encoder
        self.oos_threshold = oos_threshold
        self.key = key or uuid.uuid4().hex
        self.max_length = max_length  # texts are truncated to this many tokens

    @property
    def labels(self) -> list[str]:
        return self.head.labels

    def hidden(self, backbone: Backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = self.encoder if self.encoder is not None else backbone.model
        route = self.adapters if self.adapters is not None else no_adapter
        return encode(model, input_ids, attention_mask, route)

    def logits(self, backbone: Backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(backbone, input_ids, attention_mask), attention_mask)

    def inference_parameters(self) -> int:
        """Parameters this tenant adds at inference on top of the shared encoder."""
        return sum(p.numel() for p in self.parameters())


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor | None = None  # each row's index in the `Encoded` it came from


class Encoded:
    """A split tokenized once (no padding); batches are padded to their longest row."""

    def __init__(self, backbone: Backbone, texts: list[str], labels: list[int], max_length: int) -> None:
        self.ids: list[list[int]] = backbone.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.labels = labels
        self.pad_id = int(backbone.tokenizer.pad_token_id or 0)
        self.device = backbone.device

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: list[int]) -> Batch:
        width = max(len(self.ids[i]) for i in index)
        ids = torch.full((len(index), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, : len(self.ids[i])] = 1
        labels = torch.tensor([self.labels[i] for i in index], dtype=torch.long)
        return Batch(ids.to(self.device), mask.to(self.device), labels.to(self.device), torch.tensor(index))

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Shuffled with `generator`, else in length order (fast evaluation)."""
        if generator is not None:
            order = torch.randperm(len(self), generator=generator).tolist()
        else:
            order = sorted(range(len(self)), key=lambda i: len(self.ids[i]))
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size])
