"""Multi-tenant batched inference: one encoder forward for a batch whose rows belong to many tenants.

Rows of tenants with plain adapters (`adapter`, `distill`) share one forward: each row goes through its own
tenant's adapter, gathered from an `AdapterBank` (one bank per adapter shape, slots reused LRU). Rows of
`fusion` and `finetune` tenants run a forward per tenant. Each tenant's head then scores its own rows.

`predict(..., between_layers=f)` calls `f()` after each encoder layer of a shared forward; `f` may call `predict`
again (a short batch run inside a long one: adistill.inference.encoder_service). The slots of a forward in progress
are pinned, so a nested batch never evicts them; a nested batch that would need one raises `BankBusy`.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from adistill.adapters import AdapterBank, AdapterSet
from adistill.backbone import Backbone
from adistill.config import AdapterConfig
from adistill.encoder import encode
from adistill.model import TenantModel


@dataclass
class Prediction:
    labels: list[tuple[str, float]]  # top-k (label, probability), best first
    out_of_scope: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": [{"label": y, "score": round(p, 6)} for y, p in self.labels],
            "out_of_scope": self.out_of_scope,
        }


@dataclass(frozen=True)
class BankUsage:
    """One adapter bank's occupancy: `name` is `<kind>_r<reduction factor>` (e.g. `seq_bn_r16`); `loads` counts
    tenants copied into its slots since the engine started (growing fast: `bank_slots` is too small)."""

    name: str
    used: int
    capacity: int
    loads: int


class BankBusy(RuntimeError):
    """Every slot of an adapter bank holds a tenant of a forward in progress: a nested batch must wait."""


class _SlotBank:
    """An `AdapterBank` plus which tenant (by weights key) sits in which slot, least recently used first, and which
    slots forwards in progress use (pinned: never evicted)."""

    def __init__(self, bank: AdapterBank) -> None:
        self.bank = bank
        self.slots: OrderedDict[str, int] = OrderedDict()
        self.pinned: dict[str, int] = {}  # weights key -> forwards in progress using it
        self.loads = 0

    def slot(self, model: TenantModel) -> int:
        if model.key in self.slots:
            self.slots.move_to_end(model.key)
            return self.slots[model.key]
        if len(self.slots) < self.bank.capacity:
            slot = len(self.slots)
        else:
            victim = next((key for key in self.slots if key not in self.pinned), None)
            if victim is None:
                raise BankBusy(f"all {self.bank.capacity} slots of the bank are in use by a forward in progress")
            slot = self.slots.pop(victim)
        assert isinstance(model.adapters, AdapterSet)
        self.bank.put(slot, model.adapters)
        self.slots[model.key] = slot
        self.loads += 1
        return slot

    @contextmanager
    def pinned_slots(self, models: list[TenantModel]) -> Iterator[list[int]]:
        """The slots of `models`, each pinned as soon as it is assigned (so the next assignment cannot evict it) until
        the block ends."""
        keys: set[str] = set()
        try:
            slots = []
            for model in models:
                slots.append(self.slot(model))
                if model.key not in keys:
                    keys.add(model.key)
                    self.pinned[model.key] = self.pinned.get(model.key, 0) + 1
            yield slots
        finally:
            for key in keys:
                self.pinned[key] -= 1
                if not self.pinned[key]:
                    del self.pinned[key]


class Engine:
    """Batched inference for many tenants on one shared, frozen encoder."""

    def __init__(self, backbone: Backbone, bank_slots: int = 256, bank_bytes: int | None = None) -> None:
        """`bank_slots` caps each adapter bank's tenants; `bank_bytes`, if given, also caps each bank's bytes."""
        if bank_slots < 1:
            raise ValueError(f"bank_slots must be >= 1, got {bank_slots}")
        if bank_bytes is not None and bank_bytes < 1:
            raise ValueError(f"bank_bytes must be >= 1 or None, got {bank_bytes}")
        self.backbone = backbone
        self.bank_slots = bank_slots
        self.bank_bytes = bank_bytes
        self.banks: dict[AdapterConfig, _SlotBank] = {}

    def slot_bytes(self, config: AdapterConfig) -> int:
        """Device bytes one tenant of this adapter shape takes in a bank."""
        b = self.backbone
        r = config.bottleneck(b.hidden_size)
        per_site = 2 * b.hidden_size * r + r + b.hidden_size
        dtype = next(b.model.parameters()).dtype
        return b.num_layers * len(config.sites) * per_site * torch.empty((), dtype=dtype).element_size()

    def capacity(self, config: AdapterConfig) -> int:
        """Slots of the bank for this adapter shape: `bank_slots`, fewer if `bank_bytes` is smaller."""
        if self.bank_bytes is None:
            return self.bank_slots
        return max(1, min(self.bank_slots, self.bank_bytes // self.slot_bytes(config)))

    def bank_usage(self) -> list[BankUsage]:
        """Every adapter bank's slots in use, capacity and loads (safe to call while a forward runs)."""
        return [
            BankUsage(f"{cfg.kind}_r{cfg.reduction_factor}", len(b.slots), b.bank.capacity, b.loads)
            for cfg, b in list(self.banks.items())  # the forward thread may add a bank meanwhile
        ]

    def _bank(self, config: AdapterConfig) -> _SlotBank:
        if config not in self.banks:
            b = self.backbone
            bank = AdapterBank(
                b.num_layers,
                b.hidden_size,
                config,
                self.capacity(config),
                b.device,
                next(b.model.parameters()).dtype,
            )
            self.banks[config] = _SlotBank(bank)
        return self.banks[config]

    def _tokenize(self, texts: list[str], models: list[TenantModel]) -> list[list[int]]:
        ids: list[list[int]] = [[] for _ in texts]
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, m in enumerate(models):
            by_length[m.max_length].append(i)
        for max_length, rows in by_length.items():
            enc = self.backbone.tokenizer([texts[i] for i in rows], truncation=True, max_length=max_length)
            for i, row_ids in zip(rows, enc["input_ids"]):
                ids[i] = row_ids
        return ids

    def _pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(x) for x in ids)
        pad = int(self.backbone.tokenizer.pad_token_id or 0)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        device = self.backbone.device
        return input_ids.to(device), mask.to(device)

    @torch.no_grad()
    def forward_seconds(self, rows: int, repeats: int = 3, text: str = "how do i reset my password") -> float:
        """The fastest of `repeats` encoder forwards of `rows` copies of a short text (after one to warm up): what a
        batch of that many rows costs on this device, for the batch queue's limit under contention."""
        input_ids, mask = self._pad([self.backbone.tokenizer(text)["input_ids"]] * rows)
        best = float("inf")
        for i in range(repeats + 1):
            start = time.perf_counter()
            encode(self.backbone.model, input_ids, mask)
            if input_ids.is_cuda:
                torch.cuda.synchronize(input_ids.device)
            if i:
                best = min(best, time.perf_counter() - start)
        return best

    @torch.no_grad()
    def predict(
        self,
        texts: list[str],
        models: list[TenantModel],
        top_k: int = 3,
        between_layers: Callable[[], None] | None = None,
    ) -> list[Prediction]:
        """Row i of `texts` is answered by `models[i]`; returns one `Prediction` per row, in order. `between_layers`:
        see the module docstring."""
        if len(texts) != len(models):
            raise ValueError(f"{len(texts)} texts but {len(models)} tenant models")
        if not texts:
            return []
        ids = self._tokenize(texts, models)
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, m in enumerate(models):
            shared = isinstance(m.adapters, AdapterSet) and m.encoder is None
            groups[m.adapters.config if shared else m.key].append(i)  # type: ignore[union-attr]
        out: list[Prediction | None] = [None] * len(texts)
        for key, rows in groups.items():
            for chunk in self._chunks(rows, models, self.capacity(key)) if isinstance(key, AdapterConfig) else [rows]:
                self._run(chunk, ids, models, top_k, out, between_layers)
        return [p for p in out if p is not None]

    def _chunks(self, rows: list[int], models: list[TenantModel], capacity: int) -> list[list[int]]:
        """Split rows so no chunk needs more distinct tenants than the bank has slots."""
        chunks: list[list[int]] = [[]]
        seen: set[str] = set()
        for i in rows:
            if models[i].key not in seen and len(seen) == capacity:
                chunks.append([])
                seen = set()
            seen.add(models[i].key)
            chunks[-1].append(i)
        return chunks

    def _run(
        self,
        rows: list[int],
        ids: list[list[int]],
        models: list[TenantModel],
        top_k: int,
        out: list[Prediction | None],
        between_layers: Callable[[], None] | None = None,
    ) -> None:
        input_ids, mask = self._pad([ids[i] for i in rows])
        first = models[rows[0]]
        if isinstance(first.adapters, AdapterSet) and first.encoder is None:
            bank = self._bank(first.adapters.config)
            with bank.pinned_slots([models[i] for i in rows]) as slots:
                route = bank.bank.route(torch.tensor(slots, device=input_ids.device))
                hidden = encode(self.backbone.model, input_ids, mask, route, between_layers)
        else:
            hidden = first.hidden(self.backbone, input_ids, mask)
        by_model: dict[str, list[int]] = defaultdict(list)
        for pos, i in enumerate(rows):
            by_model[models[i].key].append(pos)
        for positions in by_model.values():
            model = models[rows[positions[0]]]
            index = torch.tensor(positions, device=hidden.device)
            probs = model.head(hidden[index], mask[index]).float().softmax(-1).cpu()
            top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
            threshold = model.oos_threshold
            for j, pos in enumerate(positions):
                pairs = [(model.labels[k], float(p)) for p, k in zip(top.values[j], top.indices[j])]
                oos = threshold is not None and pairs[0][1] < threshold
                out[rows[pos]] = Prediction(pairs, oos)
