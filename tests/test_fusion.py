import pytest
import torch

from adistill.adapters import AdapterSet
from adistill.config import AdapterConfig
from adistill.fusion import FusionLayer, FusionSet


def random_adapters(n: int, hidden: int = 32, seed: int = 0) -> list[AdapterSet]:
    g = torch.Generator().manual_seed(seed)
    sets = [AdapterSet(2, hidden, AdapterConfig(reduction_factor=4), g) for _ in range(n)]
    with torch.no_grad():
        for s in sets:
            for p in s.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sets


@pytest.mark.parametrize("n", [1, 3, 10])
def test_factored_form_equals_plain_form(n: int) -> None:
    torch.manual_seed(n)
    layer = FusionLayer(32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    members = [s.site(0, "ffn") for s in random_adapters(n)]
    x = torch.randn(3, 5, 32)
    fast = layer(x, members)  # type: ignore[arg-type]
    plain = layer.forward_plain(x, members)  # type: ignore[arg-type]
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)
    # same gradients for the trainable Q, K, V (in float64, so rounding cannot hide or fake a difference)
    layer.double()
    members = [m.double() for m in members]  # type: ignore[union-attr]
    x = x.double()
    grads = []
    for fn in (layer.forward, layer.forward_plain):
        layer.zero_grad()
        fn(x, members).square().sum().backward()  # type: ignore[arg-type]
        # the key bias adds the same score to every adapter: no effect, and the factored form never uses it
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_value_starts_as_identity_and_weights_sum_to_one() -> None:
    layer = FusionLayer(32)
    torch.testing.assert_close(layer.value.weight, torch.eye(32))
    members = [s.site(0, "ffn") for s in random_adapters(4)]
    x = torch.randn(2, 3, 32)
    out, weights = layer.forward_with_weights(x, members)  # type: ignore[arg-type]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    # V = I: the fused output is the attention-weighted mix of the adapters' outputs
    mix = torch.einsum("btn,nbth->bth", weights, torch.stack([m(x) for m in members]))  # type: ignore[misc]
    torch.testing.assert_close(out, mix, atol=1e-5, rtol=1e-5)


def test_fusion_set_freezes_members_and_checks_shapes() -> None:
    members = random_adapters(3)
    fusion = FusionSet(members, 2, 32)
    assert not any(p.requires_grad for p in fusion.adapters.parameters())
    assert all(p.requires_grad for p in fusion.layers.parameters())
    other = AdapterSet(2, 32, AdapterConfig(reduction_factor=8))
    with pytest.raises(ValueError, match="one shape"):
        FusionSet([*members, other], 2, 32)
    with pytest.raises(ValueError, match="at least one"):
        FusionSet([], 2, 32)
