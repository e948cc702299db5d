"""AdapterFusion over N frozen adapters: Q, K, V per site, softmax over adapters, V initialised to identity.

For adapter outputs o_n = x + U_n·a_n + u_n (a_n = relu(D_n·x + d_n), rank r) the plain form is

    w = softmax_n(Q(x) · K(o_n)),      out = Σ_n w_n · V(o_n)                       2·N·H² per token

Because the adapters are frozen and K, V are affine, the same function factors through the bottleneck:

    Q(x)·K(o_n) = Q(x)·(W_K·U_n)·a_n + Q(x)·(W_K·u_n) + [Q(x)·K(x): equal for all n, cancels in softmax]
    Σ_n w_n V(o_n) = V(x + Σ_n w_n (U_n·a_n + u_n))                  (Σ_n w_n = 1)  ~3·N·H·r + 2·H²

`FusionLayer.forward` is the factored form; `forward_plain` is the textbook one (tests check they agree).
"""

from __future__ import annotations

import torch
from torch import nn

from adistill.adapters import AdapterSet, Bottleneck


class FusionLayer(nn.Module):
    def __init__(self, hidden: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=0.02, generator=generator)
                nn.init.zeros_(lin.bias)
            self.value.weight.copy_(torch.eye(hidden))
            nn.init.zeros_(self.value.bias)

    def forward_plain(self, x: torch.Tensor, adapters: list[Bottleneck]) -> torch.Tensor:
        outputs = torch.stack([a(x) for a in adapters])  # (N, B, T, H)
        scores = torch.einsum("bth,nbth->btn", self.query(x), self.key(outputs))
        weights = scores.softmax(-1)
        return torch.einsum("btn,nbth->bth", weights, self.value(outputs))

    def forward(self, x: torch.Tensor, adapters: list[Bottleneck]) -> torch.Tensor:
        return self.forward_with_weights(x, adapters)[0]

    def forward_with_weights(self, x: torch.Tensor, adapters: list[Bottleneck]) -> tuple[torch.Tensor, torch.Tensor]:
        """Factored form. Returns the fused output (B, T, H) and the attention over adapters (B, T, N)."""
        n, r = len(adapters), adapters[0].down.weight.shape[0]
        down_w = torch.cat([a.down.weight for a in adapters]).T  # (H, N·r)
        down_b = torch.cat([a.down.bias for a in adapters])  # (N·r,)
        up_w = torch.cat([a.up.weight.T for a in adapters])  # (N·r, H): rows of U_nᵀ stacked
        up_b = torch.stack([a.up.bias for a in adapters])  # (N, H)
        codes = torch.relu(x @ down_w + down_b)  # a_n for all n: (B, T, N·r)
        q = self.query(x)  # (B, T, H)
        key_up = self.key.weight @ up_w.T  # W_K·U_n for all n: (H, N·r)
        key_bias = up_b @ self.key.weight.T  # W_K·u_n: (N, H)
        scores = ((q @ key_up) * codes).unflatten(-1, (n, r)).sum(-1) + q @ key_bias.T  # (B, T, N)
        weights = scores.softmax(-1)
        weighted_codes = (codes.unflatten(-1, (n, r)) * weights.unsqueeze(-1)).flatten(-2)  # (B, T, N·r)
        mixed = x + weighted_codes @ up_w + weights @ up_b
        return self.value(mixed), weights


class FusionSet(nn.Module):
    """A `FusionLayer` per adapter site over a list of frozen `AdapterSet`s. Called as a route."""

    def __init__(
        self,
        adapters: list[AdapterSet],
        num_layers: int,
        hidden: int,
        generator: torch.Generator | None = None,
        plain: bool = False,
    ) -> None:
        """`plain=True` runs the textbook form (same function, more FLOPs): for tests and benchmarks."""
        super().__init__()
        if not adapters:
            raise ValueError("fusion needs at least one adapter")
        configs = {a.config for a in adapters}
        if len(configs) != 1:
            raise ValueError(f"fusion needs adapters of one shape, got {sorted(map(str, configs))}")
        self.sites = adapters[0].config.sites
        self.adapters = nn.ModuleList(adapters)
        self.adapters.requires_grad_(False)
        self.layers = nn.ModuleList(
            nn.ModuleDict({site: FusionLayer(hidden, generator) for site in self.sites}) for _ in range(num_layers)
        )
        self.plain = plain

    def forward(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        if site not in self.sites:
            return x
        fusion: FusionLayer = self.layers[layer][site]  # type: ignore[index]
        members: list[Bottleneck] = [a.site(layer, site) for a in self.members()]  # type: ignore[misc]
        return (fusion.forward_plain if self.plain else fusion.forward)(x, members)

    def members(self) -> list[AdapterSet]:
        return list(self.adapters)  # type: ignore[arg-type]
