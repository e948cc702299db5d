import pytest
import torch

from adistill.adapters import AdapterSet, Bottleneck
from adistill.backbone import Backbone, check_supported
from adistill.config import AdapterConfig
from adistill.encoder import encode
from adistill.errors import ConfigError

TEXTS = [
    "pay my bill please",
    "what is the weather",
    "play a song",
    "a much longer query about the hotel room now",
]


@pytest.fixture(params=["bert", "roberta"])
def backbone(request: pytest.FixtureRequest, tiny: Backbone, tiny_roberta: Backbone) -> Backbone:
    return tiny if request.param == "bert" else tiny_roberta


def test_walk_equals_library_forward(backbone: Backbone) -> None:
    batch = backbone.tokenize(TEXTS, 32)
    ref = backbone.model(**batch).last_hidden_state
    ours = encode(backbone.model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["seq_bn", "houlsby"])
def test_fresh_adapter_leaves_output_unchanged(backbone: Backbone, kind: str) -> None:
    batch = backbone.tokenize(TEXTS, 32)
    adapters = AdapterSet(backbone.num_layers, backbone.hidden_size, AdapterConfig(kind=kind))  # type: ignore[arg-type]
    base = encode(backbone.model, batch["input_ids"], batch["attention_mask"])
    adapted = encode(backbone.model, batch["input_ids"], batch["attention_mask"], adapters)
    torch.testing.assert_close(adapted, base)
    # ...and a trained (non-zero) adapter does change it, at every site the kind defines
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(std=0.1)
    changed = encode(backbone.model, batch["input_ids"], batch["attention_mask"], adapters)
    assert not torch.allclose(changed, base)
    assert [sorted(d.keys()) for d in adapters.layers] == [sorted(AdapterConfig(kind=kind).sites)] * 2  # type: ignore[arg-type]


def test_adapter_shape_follows_reduction_factor() -> None:
    adapters = AdapterSet(2, 64, AdapterConfig(reduction_factor=8))
    b = adapters.site(0, "ffn")
    assert isinstance(b, Bottleneck) and b.down.out_features == 8
    assert adapters.site(0, "attn") is None


def test_encoder_stays_frozen(backbone: Backbone) -> None:
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_refuses_non_bert_models() -> None:
    with pytest.raises(ConfigError, match="not a BERT-family encoder"):
        check_supported(torch.nn.Linear(2, 2))
