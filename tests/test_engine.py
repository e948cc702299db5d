import random

import pytest
import torch
from helpers import random_tenant

from adistill.backbone import Backbone
from adistill.inference.engine import BankBusy, Engine
from adistill.recipes.evaluate import predict_probs

WORDS = [
    "please",
    "pay",
    "my",
    "bill",
    "what",
    "is",
    "the",
    "weather",
    "play",
    "a",
    "song",
    "book",
    "a",
    "flight",
    "to",
    "paris",
    "and",
    "a",
    "hotel",
    "room",
    "now",
]


def texts_for(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 14))) for _ in range(n)]  # varied lengths -> padding


def alone(backbone: Backbone, model, text: str) -> list[tuple[str, float]]:
    probs = predict_probs(backbone, model, [text], model.max_length)[0]
    return sorted(zip(model.labels, probs.tolist()), key=lambda p: -p[1])


@pytest.mark.parametrize("num_tenants", [1, 3, 50])
def test_mixed_batch_equals_each_tenant_alone(tiny: Backbone, num_tenants: int) -> None:
    tenants = [random_tenant(tiny, seed=s, num_labels=2 + s % 5) for s in range(num_tenants)]
    texts = texts_for(64)
    rng = random.Random(num_tenants)
    models = [rng.choice(tenants) for _ in texts]
    predictions = Engine(tiny, bank_slots=64).predict(texts, models, top_k=10)
    for text, model, pred in zip(texts, models, predictions):
        expected = alone(tiny, model, text)
        assert [y for y, _ in pred.labels] == [y for y, _ in expected]
        assert [p for _, p in pred.labels] == pytest.approx([p for _, p in expected], abs=1e-5)


def test_fusion_finetune_and_houlsby_rows_mix_with_adapter_rows(tiny: Backbone) -> None:
    import copy

    tenants = [
        random_tenant(tiny, 1),
        random_tenant(tiny, 2, method="fusion"),
        random_tenant(tiny, 3, kind="houlsby"),
    ]
    finetuned = random_tenant(tiny, 4)
    finetuned.adapters, finetuned.encoder, finetuned.method = None, copy.deepcopy(tiny.model), "finetune"
    with torch.no_grad():
        next(finetuned.encoder.parameters()).add_(0.5)  # its own encoder weights
    tenants.append(finetuned)
    texts = texts_for(24, seed=1)
    models = [tenants[i % len(tenants)] for i in range(len(texts))]
    for text, model, pred in zip(texts, models, Engine(tiny).predict(texts, models, top_k=10)):
        assert [p for _, p in pred.labels] == pytest.approx([p for _, p in alone(tiny, model, text)], abs=1e-5)


def test_bank_smaller_than_batch_tenants_evicts_and_stays_correct(tiny: Backbone) -> None:
    tenants = [random_tenant(tiny, seed=s) for s in range(12)]
    engine = Engine(tiny, bank_slots=4)
    texts = texts_for(36, seed=2)
    models = [tenants[i % 12] for i in range(36)]
    for _ in range(2):
        for text, model, pred in zip(texts, models, engine.predict(texts, models, top_k=3)):
            assert pred.labels[0][0] == alone(tiny, model, text)[0][0]
    bank = next(iter(engine.banks.values()))
    assert bank.loads > 12  # slots were reused


def test_top_k_and_out_of_scope_flag(tiny: Backbone) -> None:
    model = random_tenant(tiny, 5, num_labels=4)
    model.oos_threshold = 1.01  # nothing is that confident
    [pred] = Engine(tiny).predict(["pay my bill"], [model], top_k=2)
    assert len(pred.labels) == 2 and pred.out_of_scope
    model.oos_threshold = 0.0
    [pred] = Engine(tiny).predict(["pay my bill"], [model], top_k=99)
    assert len(pred.labels) == 4 and not pred.out_of_scope
    assert pred.to_dict()["labels"][0].keys() == {"label", "score"}


def test_bank_bounded_by_bytes(tiny: Backbone) -> None:
    tenants = [random_tenant(tiny, seed=s) for s in range(7)]
    config = tenants[0].adapters.config
    probe = Engine(tiny)
    engine = Engine(tiny, bank_slots=64, bank_bytes=3 * probe.slot_bytes(config) + 1)
    assert engine.capacity(config) == 3
    texts = texts_for(21, seed=3)
    models = [tenants[i % 7] for i in range(21)]
    for text, model, pred in zip(texts, models, engine.predict(texts, models, top_k=3)):
        assert pred.labels[0][0] == alone(tiny, model, text)[0][0]
    bank = next(iter(engine.banks.values()))
    assert bank.bank.capacity == 3 and bank.bank.bytes_per_slot == probe.slot_bytes(config)


def test_a_batch_run_between_the_layers_of_another_is_answered_as_alone(tiny: Backbone) -> None:
    """A short batch run inside a forward (between two of its layers) changes neither batch's answers, and the
    slots of the paused forward are never evicted for it: a nested batch that needs one gets BankBusy."""
    tenants = [random_tenant(tiny, seed=s) for s in range(5)]
    engine = Engine(tiny, bank_slots=4)
    texts, nested_texts = texts_for(12, seed=4), texts_for(3, seed=5)
    models = [tenants[i % 3] for i in range(12)]  # 3 tenants: one slot left
    runs: list[object] = []

    def between_layers(nested_models: list) -> None:
        if runs:
            return
        try:
            runs.append(engine.predict(nested_texts, nested_models, top_k=3))
        except BankBusy as exc:
            runs.append(exc)

    # tenants 3 and 4 both new: the paused forward holds 3 of the 4 slots, so only one of them finds a slot
    engine.predict(texts[:1], [tenants[0]], top_k=3)  # warm the bank
    outer = engine.predict(texts, models, 3, lambda: between_layers([tenants[3], tenants[4], tenants[3]]))
    assert isinstance(runs[0], BankBusy)
    for text, model, pred in zip(texts, models, outer):
        assert pred.labels[0][0] == alone(tiny, model, text)[0][0]

    runs.clear()  # one new tenant fits the free slot; tenant 0 is already in the bank
    outer = engine.predict(texts, models, 3, lambda: between_layers([tenants[3], tenants[0], tenants[3]]))
    assert isinstance(runs[0], list)
    for text, model, pred in zip(texts, models, outer):
        assert [p for _, p in pred.labels] == pytest.approx([p for _, p in alone(tiny, model, text)][:3], abs=1e-5)
    for text, model, pred in zip(nested_texts, [tenants[3], tenants[0], tenants[3]], runs[0]):
        assert [p for _, p in pred.labels] == pytest.approx([p for _, p in alone(tiny, model, text)][:3], abs=1e-5)
