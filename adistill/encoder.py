"""One forward pass of a BERT-family encoder with adapters routed in explicitly.

Library classes are not patched: this module walks the encoder's own sub-modules in the order BertLayer
runs them, and at each adapter *site* calls `route(layer, site, x)`. The route decides what an adapter
is for this call: nothing (bare encoder), one tenant's adapter, a per-row bank of many tenants' adapters,
or a fusion over several adapters. The tenant choice is therefore an argument of the forward, never state.

    attention:  x = LN(route(l, "attn", Wo·SelfAttn(h)) + h)
    ffn:        h = LN(route(l, "ffn", W2·act(W1·x)) + x)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask


class Route(Protocol):
    """Maps the output of a sub-layer at (layer, site) to its adapted value; identity means no adapter."""

    def __call__(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor: ...


def no_adapter(layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
    """The bare encoder."""
    return x


def encode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    route: Route = no_adapter,
    between_layers: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Last hidden states (B, T, H) of `model` with adapters applied through `route`; `between_layers()`, if given,
    is called after each layer (the serving engine runs short batches there: adistill.inference.engine)."""
    h = model.embeddings(input_ids=input_ids)  # type: ignore[operator]
    mask = create_bidirectional_mask(config=model.config, inputs_embeds=h, attention_mask=attention_mask)
    for i, layer in enumerate(model.encoder.layer):  # type: ignore[union-attr, arg-type]
        attn = layer.attention
        a = attn.output.dropout(attn.output.dense(attn.self(h, attention_mask=mask)[0]))
        x = attn.output.LayerNorm(route(i, "attn", a) + h)
        f = layer.output.dropout(layer.output.dense(layer.intermediate(x)))
        h = layer.output.LayerNorm(route(i, "ffn", f) + x)
        if between_layers is not None:
            between_layers()
    return h


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) -> (B, H): masked mean over tokens, or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
