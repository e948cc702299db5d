"""Bottleneck adapters: one tenant's set (a route for `encoder.encode`), and a bank of many for mixed batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adistill.config import AdapterConfig


class Bottleneck(nn.Module):
    """x + U·relu(D·x): the up-projection starts at zero, so a fresh adapter is the identity."""

    def __init__(self, hidden: int, bottleneck: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=0.02, generator=generator)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def code(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck activation a = relu(D·x + d), (..., r)."""
        return F.relu(self.down(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.code(x))


class AdapterSet(nn.Module):
    """One tenant's adapters: a `Bottleneck` per (layer, site). Called as a route: `adapters(layer, site, x)`."""

    def __init__(
        self, num_layers: int, hidden: int, config: AdapterConfig, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.config = config
        r = config.bottleneck(hidden)
        self.layers = nn.ModuleList(
            nn.ModuleDict({site: Bottleneck(hidden, r, generator) for site in config.sites}) for _ in range(num_layers)
        )

    def site(self, layer: int, site: str) -> Bottleneck | None:
        sites: nn.ModuleDict = self.layers[layer]  # type: ignore[assignment]
        return sites[site] if site in sites else None  # type: ignore[return-value]

    def forward(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        adapter = self.site(layer, site)
        return x if adapter is None else adapter(x)


class AdapterBank:
    """Adapters of many tenants (same shape) stacked per site, gathered per batch row.

    Slots are rows of preallocated tensors; `put` copies one tenant's `AdapterSet` into a slot. `route(slots)`
    returns a route where row b of the batch goes through the adapter in `slots[b]`, as one `bmm` per site.
    """

    def __init__(
        self,
        num_layers: int,
        hidden: int,
        config: AdapterConfig,
        capacity: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = config
        self.capacity = capacity
        r = config.bottleneck(hidden)
        self.sites = [(layer, site) for layer in range(num_layers) for site in config.sites]

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        self.down_w = {k: zeros(capacity, hidden, r) for k in self.sites}
        self.down_b = {k: zeros(capacity, r) for k in self.sites}
        self.up_w = {k: zeros(capacity, r, hidden) for k in self.sites}
        self.up_b = {k: zeros(capacity, hidden) for k in self.sites}

    @property
    def bytes_per_slot(self) -> int:
        return sum(t[0].numel() * t.element_size() for d in self._tables() for t in d.values())

    def _tables(self) -> tuple[dict[tuple[int, str], torch.Tensor], ...]:
        return (self.down_w, self.down_b, self.up_w, self.up_b)

    @torch.no_grad()
    def put(self, slot: int, adapters: AdapterSet) -> None:
        if adapters.config != self.config:
            raise ValueError(f"adapter shape {adapters.config} does not fit a bank of {self.config}")
        for layer, site in self.sites:
            b = adapters.site(layer, site)
            assert b is not None
            self.down_w[layer, site][slot].copy_(b.down.weight.T)
            self.down_b[layer, site][slot].copy_(b.down.bias)
            self.up_w[layer, site][slot].copy_(b.up.weight.T)
            self.up_b[layer, site][slot].copy_(b.up.bias)

    def route(self, slots: torch.Tensor) -> BankRoute:
        return BankRoute(self, slots)


class BankRoute:
    """Row b of the batch through the bank's adapter in slot `slots[b]`."""

    def __init__(self, bank: AdapterBank, slots: torch.Tensor) -> None:
        self.bank = bank
        self.slots = slots

    def __call__(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        key = (layer, site)
        if key not in self.bank.down_w:
            return x
        s, bank = self.slots, self.bank
        a = F.relu(torch.baddbmm(bank.down_b[key][s].unsqueeze(1), x, bank.down_w[key][s]))  # (B, T, r)
        return torch.baddbmm(bank.up_b[key][s].unsqueeze(1), a, bank.up_w[key][s]) + x  # (B, T, H)
