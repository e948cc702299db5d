"""Builders shared by tests: tenants with random (non-zero) weights, so equality checks can fail."""

from __future__ import annotations

import torch

from adistill.adapters import AdapterSet
from adistill.backbone import Backbone
from adistill.config import AdapterConfig
from adistill.fusion import FusionSet
from adistill.heads import Head
from adistill.model import TenantModel


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def random_tenant(
    backbone: Backbone, seed: int, num_labels: int = 3, method: str = "adapter", kind: str = "seq_bn"
) -> TenantModel:
    cfg = AdapterConfig(kind=kind, reduction_factor=4)  # type: ignore[arg-type]
    head = Head(backbone.hidden_size, [f"t{seed}_l{i}" for i in range(num_labels)])
    if method == "fusion":
        members = [AdapterSet(backbone.num_layers, backbone.hidden_size, cfg) for _ in range(3)]
        for i, m in enumerate(members):
            randomise(m, seed * 100 + i)
        adapters: AdapterSet | FusionSet = FusionSet(members, backbone.num_layers, backbone.hidden_size)
        randomise(adapters.layers, seed, 0.05)
    else:
        adapters = AdapterSet(backbone.num_layers, backbone.hidden_size, cfg)
        randomise(adapters, seed)
    randomise(head, seed + 7, 1.0)
    return TenantModel(method, head, adapters).eval()
