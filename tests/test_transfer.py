"""Stage 2's transfer set (issue 17): unlabelled queries in the tenant data format, the masked loss, the batches,
stage 2 and the controls on a tiny encoder, augmentation, and the recipe/tune fields."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from helpers import fast_config, make_rows, random_tenant, write_tenant

from adistill.augment import KINDS, augment, perturb
from adistill.backbone import Backbone
from adistill.config import DistillConfig, RecipeConfig, TrainConfig, TransferConfig
from adistill.data import few_shot, read_tenant_data
from adistill.errors import ConfigError, DataError
from adistill.losses import UNLABELED, distillation_loss
from adistill.model import Encoded
from adistill.recipes import train_tenant
from adistill.recipes.self_training import pseudo_labels, self_train
from adistill.recipes.stage1 import train_adapter
from adistill.recipes.stage2 import distill
from adistill.recipes.transfer import (
    NeighbourTargets,
    TransferInputs,
    TransferSet,
    hide_tokens,
    neighbour_index,
    transfer_inputs,
)
from adistill.store.artifact import Teacher
from adistill.tune_space import space_from_dict

LABELS = ["pay_bill", "flight", "music", "alarm"]


def unlabeled_rows(n_per_label: int = 10, seed: int = 9) -> list[dict[str, str]]:
    rows = make_rows(LABELS, n_per_label, seed, "u")
    return [{"text": f"{r['text']} number {i}", "label": "", "split": "unlabeled"} for i, r in enumerate(rows)]


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def with_unlabeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `new` tenant of conftest with 40 unlabelled queries in its one file."""
    path = write_tenant(tmp_path_factory.mktemp("u") / "plain.parquet", LABELS, seed=4)
    rows = pq.read_table(path).to_pylist() + unlabeled_rows()
    return write_rows(path.parent / "with-unlabeled.parquet", rows)


# ------------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_unlabeled_split_rows_are_read_in_every_format(tmp_path: Path, suffix: str) -> None:
    labelled = make_rows(LABELS, 6, 0, "train") + make_rows(LABELS, 3, 0, "validation")
    extra = [{"text": f"unlabelled query {i}", "label": "", "split": "unlabeled"} for i in range(5)]
    data = read_tenant_data(str(write_rows(tmp_path / f"t{suffix}", labelled + extra)))
    assert data.unlabeled == [f"unlabelled query {i}" for i in range(5)]
    assert len(data.train) == 24 and data.labels == sorted(LABELS)  # unlabelled rows never become training rows


def test_an_unlabeled_file_in_a_folder_is_read_with_the_text_column_only(tmp_path: Path) -> None:
    rows = make_rows(LABELS, 6, 0, "train")
    write_rows(tmp_path / "t" / "train.csv", [{"query": r["text"], "intent": r["label"]} for r in rows])
    write_rows(tmp_path / "t" / "unlabeled.jsonl", [{"query": f"q {i}", "source": "logs"} for i in range(7)])
    data = read_tenant_data(f"file://{tmp_path / 't'}", text_column="query", label_column="intent")
    assert data.unlabeled == [f"q {i}" for i in range(7)]
    write_rows(tmp_path / "t" / "unlabeled.jsonl", [{"text": "q"}])
    with pytest.raises(DataError, match=r"unlabeled.jsonl: missing column 'query'"):
        read_tenant_data(str(tmp_path / "t"), text_column="query", label_column="intent")


def test_a_folder_on_s3_with_an_unlabeled_file(s3_moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import fsspec

    rows = make_rows(LABELS, 6, 0, "train")
    write_rows(tmp_path / "t" / "train.parquet", rows)
    write_rows(tmp_path / "t" / "unlabeled.jsonl", [{"text": f"q {i}"} for i in range(4)])
    uri = s3_moto.uri("tenants") + "/t"
    fs, path = fsspec.core.url_to_fs(uri, **s3_moto.storage_options)
    fs.put(str(tmp_path / "t"), path, recursive=True)
    data = read_tenant_data(uri, s3_moto.storage_options)
    assert data.unlabeled == [f"q {i}" for i in range(4)] and len(data.train) + len(data.validation) == 24


def test_empty_repeated_and_labelled_unlabeled_texts_are_dropped_with_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    labelled = make_rows(LABELS, 6, 0, "train") + make_rows(LABELS, 3, 0, "test")
    texts = ["new one", "", "   ", "new one", labelled[0]["text"], labelled[-1]["text"], "new two"]
    rows = labelled + [{"text": t, "label": "", "split": "unlabeled"} for t in texts]
    with caplog.at_level(logging.WARNING, logger="adistill.data"):
        data = read_tenant_data(str(write_rows(tmp_path / "t.parquet", rows)))
    assert data.unlabeled == ["new one", "new two"]
    assert "5 of 7 unlabelled texts dropped (2 empty, 3 duplicates or already labelled)" in caplog.text


def test_too_many_unlabeled_texts_is_a_clear_error(tmp_path: Path) -> None:
    rows = make_rows(LABELS, 6, 0, "train") + [{"text": f"q {i}", "label": "", "split": "unlabeled"} for i in range(6)]
    path = str(write_rows(tmp_path / "t.parquet", rows))
    assert len(read_tenant_data(path, max_unlabeled=6).unlabeled) == 6
    with pytest.raises(DataError, match="6 unlabelled texts, more than the 5 a tenant may bring"):
        read_tenant_data(path, max_unlabeled=5)


def test_unlabeled_texts_enter_the_fingerprint_and_survive_few_shot(tmp_path: Path, with_unlabeled: Path) -> None:
    plain = read_tenant_data(str(with_unlabeled.parent / "plain.parquet"))
    data = read_tenant_data(str(with_unlabeled))
    assert len(data.unlabeled) == 40 and data.fingerprint() != plain.fingerprint()
    assert data.train.texts == plain.train.texts
    # data without unlabelled queries keeps the fingerprint it always had (published tenants stay skippable)
    import hashlib

    digest = hashlib.sha256()
    for name in ("train", "validation", "test"):
        split = getattr(plain, name)
        digest.update(json.dumps([name, split.texts, split.labels]).encode())
    assert plain.fingerprint() == digest.hexdigest()
    assert few_shot(data, 2, 0).unlabeled == data.unlabeled


# ------------------------------------------------------------------------------------------------------- loss


def test_unlabeled_rows_get_only_the_teacher_to_student_terms() -> None:
    torch.manual_seed(0)
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, UNLABELED, UNLABELED])
    hs = [torch.randn(5, 3, 6, requires_grad=True)]
    ht = [torch.randn(5, 3, 6)]
    cfg = DistillConfig(alpha=0.3, beta=0.7, gamma=0.2)
    out = distillation_loss(s, t, y, cfg, hs, ht)
    torch.testing.assert_close(out.student_ce, F.cross_entropy(s[:3], y[:3]))
    torch.testing.assert_close(out.teacher_ce, F.cross_entropy(t[:3], y[:3]))
    kd_all = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean") * 4
    torch.testing.assert_close(out.kd, kd_all)  # KD covers every row, labelled or not
    out.total.backward()
    assert t.grad is not None and s.grad is not None and hs[0].grad is not None
    assert torch.all(t.grad[3:] == 0) and torch.all(t.grad[:3] != 0)  # the teacher learns from labels only
    assert torch.all(s.grad[3:] != 0) and torch.all(hs[0].grad[3:] != 0)  # the student learns from the teacher there
    # without the KD and hidden terms an unlabelled row is inert
    s.grad = None
    distillation_loss(s, t, y, DistillConfig(alpha=1.0, beta=0.0)).total.backward()
    assert torch.all(s.grad[3:] == 0)


def test_a_batch_without_labelled_rows_has_zero_ce_not_nan() -> None:
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    out = distillation_loss(s, t, torch.full((3,), UNLABELED), DistillConfig())
    assert out.student_ce == 0 and out.teacher_ce == 0 and torch.isfinite(out.total)


# ---------------------------------------------------------------------------------------------------- batches


def test_without_transfer_rows_the_batches_are_the_labelled_batches(tiny: Backbone) -> None:
    texts = [f"query number {i}" for i in range(21)]
    labels = [i % 3 for i in range(21)]
    plain = Encoded(tiny, texts, labels, 32)
    ours = TransferSet(tiny, texts, labels, [], TransferConfig(), 32)
    a = list(plain.batches(8, torch.Generator().manual_seed(3)))
    b = list(ours.batches(8, torch.Generator().manual_seed(3)))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)


def test_transfer_batches_mix_rows_by_ratio_and_cap_each_epoch(tiny: Backbone) -> None:
    texts, labels = [f"labelled {i}" for i in range(10)], [i % 2 for i in range(10)]
    transfer = [f"unlabelled {i}" for i in range(100)]
    rows = TransferSet(tiny, texts, labels, transfer, TransferConfig(ratio=2.0, max_per_epoch=60), 32)
    generator = torch.Generator().manual_seed(0)
    epochs = [list(rows.batches(4, generator)) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == 8  # 60 drawn / 8 per batch
        for batch in batches:
            labelled = (batch.labels != UNLABELED).tolist()
            assert labelled[:4] == [True] * 4 and not any(labelled[4:])  # 4 labelled first, then up to 8 transfer
        assert sum(int((b.labels == UNLABELED).sum()) for b in batches) == 60
    seen = [{tuple(r) for b in batches for r in b.input_ids[b.labels == UNLABELED].tolist()} for batches in epochs]
    assert seen[0] != seen[1]  # a fresh sample each epoch
    # few transfer rows: the epoch is one pass over the labelled rows
    small = TransferSet(tiny, texts, labels, transfer[:3], TransferConfig(ratio=1.0), 32)
    batches = list(small.batches(4, torch.Generator().manual_seed(0)))
    assert len(batches) == 3 and sum(int((b.labels != UNLABELED).sum()) for b in batches) == 12


# ----------------------------------------------------------------------------------------------- stage 2, controls


def teachers_for(tiny: Backbone) -> list[Teacher]:
    return [Teacher(f"t{i}", random_tenant(tiny, i).adapters) for i in (1, 2)]  # type: ignore[arg-type]


def test_stage2_learns_from_unlabeled_rows_and_records_them(tiny: Backbone, with_unlabeled: Path) -> None:
    data = read_tenant_data(str(with_unlabeled))
    cfg = fast_config("distill", epochs=2, transfer=TransferConfig(ratio=0.25))
    teachers = teachers_for(tiny)
    result = train_tenant(tiny, data, cfg, teachers)
    assert result.metrics["unlabeled_examples"] == 40
    assert result.stages["stage2"].steps == 2 * 10  # 40 unlabelled rows, 4 per batch beside 16 labelled: 10 batches

    stage1, _ = train_adapter(tiny, data, cfg)
    adapters = [t.adapters for t in teachers]
    with_rows, _ = distill(tiny, data, cfg, stage1, adapters)
    without, fit = distill(tiny, data, cfg, stage1, adapters, transfer=TransferInputs([], "none"))
    assert fit.steps == 2 * 5  # 80 labelled rows: 5 batches an epoch
    assert any(not torch.equal(a, b) for a, b in zip(with_rows.parameters(), without.parameters()))
    plain = train_tenant(tiny, read_tenant_data(str(with_unlabeled.parent / "plain.parquet")), cfg, teachers)
    assert "unlabeled_examples" not in plain.metrics


@pytest.mark.parametrize("detach", [True, False])
def test_stage2_with_the_hidden_state_term_over_unlabeled_rows(
    tiny: Backbone, with_unlabeled: Path, detach: bool
) -> None:
    """γ > 0: the hidden-state term covers the unlabelled rows too (teacher side without gradient when detached)."""
    data = read_tenant_data(str(with_unlabeled))
    cfg = fast_config("distill", epochs=1, distill=DistillConfig(gamma=0.1, detach_teacher=detach))
    stage1, _ = train_adapter(tiny, data, cfg)
    student, fit = distill(tiny, data, cfg, stage1, [t.adapters for t in teachers_for(tiny)])
    assert fit.steps == 5 and all(torch.isfinite(torch.tensor(h["loss"])) for h in fit.history)
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), stage1.parameters()))


def test_methods_that_cannot_use_unlabeled_rows_say_so(
    tiny: Backbone, with_unlabeled: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = read_tenant_data(str(with_unlabeled))
    with caplog.at_level(logging.WARNING, logger="adistill.recipes.train"):
        result = train_tenant(tiny, data, fast_config("adapter", epochs=1))
    assert "40 unlabelled queries not used" in caplog.text and "unlabeled_examples" not in result.metrics


def test_self_training_uses_confident_pseudo_labels_only(tiny: Backbone, with_unlabeled: Path) -> None:
    data = read_tenant_data(str(with_unlabeled))
    cfg = fast_config("distill", epochs=3)
    stage1, _ = train_adapter(tiny, data, cfg)
    texts, targets = pseudo_labels(tiny, stage1, data.unlabeled, cfg.max_length, 0.0)
    assert texts == data.unlabeled and all(0 <= t < len(LABELS) for t in targets)
    assert pseudo_labels(tiny, stage1, data.unlabeled, cfg.max_length, 1.01) == ([], [])
    model, fit, used = self_train(tiny, data, cfg, stage1, min_confidence=0.0)
    assert used == 40 and fit.steps == 3 * 5 and model.method == "adapter"
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), stage1.parameters()))


def test_stages_over_a_transfer_set_keep_the_weights_transfer_keep_names(tiny: Backbone, with_unlabeled: Path) -> None:
    """`transfer.keep` (default `last`) replaces `stage2.keep` for stage 2 and self-training when they train over
    unlabelled rows; stage 2 on the labelled rows alone keeps `stage2.keep`'s weights (the best epoch's)."""
    data = read_tenant_data(str(with_unlabeled))
    stage2 = TrainConfig(epochs=4, lr=0.1, batch_size=16, patience=None)  # a rate at which validation falls back
    cfg = fast_config("distill").replace(stage2=stage2)
    assert RecipeConfig().transfer.keep == "last" and RecipeConfig().stage2.keep == "best"
    assert cfg.stage2_over(40).keep == "last" and cfg.stage2_over(0) == cfg.stage2
    assert cfg.replace(transfer=TransferConfig(keep=None)).stage2_over(40) == cfg.stage2
    stage1, _ = train_adapter(tiny, data, cfg)
    adapters = [t.adapters for t in teachers_for(tiny)]
    kept, fit = distill(tiny, data, cfg, stage1, adapters)
    assert (fit.best_epoch, fit.best_val_accuracy) == (4, fit.history[-1]["val_accuracy"])
    last_cfg = cfg.replace(transfer=TransferConfig(keep=None), stage2=cfg.stage2.replace(keep="last"))
    same, _ = distill(tiny, data, last_cfg, stage1, adapters)  # the same stage, told to keep the last weights
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), same.state_dict().values()))
    best_cfg = cfg.replace(transfer=TransferConfig(keep="best"))
    _, best = distill(tiny, data, best_cfg, stage1, adapters)
    val = [h["val_accuracy"] for h in best.history]
    assert best.best_epoch == val.index(max(val)) + 1 and best.best_val_accuracy == max(val)
    assert best.best_epoch < 4  # this run's best epoch is not its last, so the two rules keep different weights
    _, labelled_only = distill(tiny, data, cfg, stage1, adapters, transfer=TransferInputs([], "none"))
    val = [h["val_accuracy"] for h in labelled_only.history]
    assert labelled_only.best_epoch == val.index(max(val)) + 1
    _, fit, used = self_train(tiny, data, cfg, stage1, min_confidence=0.0)
    assert used == 40 and fit.best_epoch == fit.epochs_run == 4
    _, fit, _ = self_train(tiny, data, best_cfg, stage1, min_confidence=0.0)
    val = [h["val_accuracy"] for h in fit.history]
    assert fit.best_epoch == val.index(max(val)) + 1


def test_stage2_without_teachers_is_the_no_teacher_control(tiny: Backbone, with_unlabeled: Path) -> None:
    data = read_tenant_data(str(with_unlabeled))
    cfg = fast_config("distill", epochs=1)
    stage1, _ = train_adapter(tiny, data, cfg)
    student, fit = distill(tiny, data, cfg, stage1, [])  # the fusion holds only the tenant's own adapter
    assert fit.steps > 0 and student.method == "distill"


def test_a_fitted_teacher_is_fitted_first_then_frozen_and_the_student_learns_from_it(
    tiny: Backbone, with_unlabeled: Path
) -> None:
    """distill.teacher = fitted: the fusion is fitted alone on the labelled rows, then frozen; stage 2 trains the
    student only, towards the fitted teacher's outputs on the unlabelled rows."""
    from adistill.recipes.baselines import train_fusion
    from adistill.recipes.evaluate import predict_probs

    data = read_tenant_data(str(with_unlabeled))
    cfg = fast_config("distill", epochs=3, distill=DistillConfig(teacher="fitted", alpha=0.0, beta=0.0))
    stage1, _ = train_adapter(tiny, data, cfg)
    adapters = [t.adapters for t in teachers_for(tiny)]
    teacher, _ = train_fusion(tiny, data, cfg, stage1, adapters)
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}

    def gap(model: object) -> float:  # KL(teacher ‖ model) on the unlabelled rows
        p_t = predict_probs(tiny, teacher, data.unlabeled, cfg.max_length)
        p_m = predict_probs(tiny, model, data.unlabeled, cfg.max_length)  # type: ignore[arg-type]
        return float(F.kl_div(p_m.log(), p_t, reduction="batchmean"))

    student, _ = distill(tiny, data, cfg, stage1, adapters, fitted_teacher=teacher)
    assert all(torch.equal(v, weights[k]) for k, v in teacher.state_dict().items())  # never trained by stage 2
    assert gap(student) < gap(stage1)  # KD only (alpha 0): closer to the teacher where it had no labels

    events: list[dict[str, object]] = []
    fitted_here, fit_here = distill(tiny, data, cfg, stage1, adapters, progress=events.append)
    stages = [e["stage"] for e in events]
    assert stages.index("fusion") < stages.index("stage2") and stages[-1] == "stage2"  # the teacher first
    last = {e["stage"]: float(e["seconds"]) for e in events}  # type: ignore[arg-type]
    assert fit_here.seconds >= last["fusion"] + last["stage2"] - 0.002  # includes fitting the teacher (rounded to ms)
    assert fitted_here.method == "distill" and isinstance(fitted_here.adapters, type(stage1.adapters))
    with pytest.raises(ConfigError, match=r"distill\.teacher must be one of"):
        RecipeConfig.from_dict({"distill": {"teacher": "frozen"}})
    space = space_from_dict({"params": {"distill.teacher": {"choice": ["joint", "fitted"]}}})
    assert space.apply(RecipeConfig(), {"distill.teacher": "fitted"}).distill.teacher == "fitted"
    with pytest.raises(ConfigError, match="a named setting takes"):
        space_from_dict({"params": {"distill.teacher": {"uniform": [0, 1]}}})


@pytest.mark.parametrize("teacher", ["joint", "fitted"])
def test_neighbour_targets_know_every_row_from_the_first_step_only_with_a_frozen_teacher(
    tiny: Backbone, with_unlabeled: Path, teacher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fitted (frozen) teacher labels every transfer row once before stage 2; a joint one as it runs."""
    calls: list[tuple[bool, bool]] = []  # (every row known before this batch, every row known after it)
    call = NeighbourTargets.__call__

    def spy(self: NeighbourTargets, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        before = bool(self.seen.all())
        out = call(self, rows, logits)
        calls.append((before, bool(self.seen.all())))
        return out

    monkeypatch.setattr(NeighbourTargets, "__call__", spy)
    data = read_tenant_data(str(with_unlabeled))
    cfg = fast_config("distill", epochs=2, distill=DistillConfig(teacher=teacher))  # type: ignore[arg-type]
    cfg = cfg.replace(transfer=cfg.transfer.replace(neighbours=3))
    stage1, _ = train_adapter(tiny, data, cfg)
    _, fit = distill(tiny, data, cfg, stage1, [t.adapters for t in teachers_for(tiny)])
    assert calls and all(torch.isfinite(torch.tensor(h["loss"])) for h in fit.history)
    assert calls[0][0] is (teacher == "fitted")
    assert calls[-1][1]  # by the end of the first epoch every transfer row has been seen either way


# -------------------------------------------------------------------------------------------------- augmentation


def test_perturbations_are_seeded_and_never_return_the_original() -> None:
    texts = ["please pay my electricity bill today", "book a flight to paris now", "hi"]
    a = augment(texts, "mixed", 3, 0.3, seed=1)
    assert a == augment(texts, "mixed", 3, 0.3, seed=1) and a != augment(texts, "mixed", 3, 0.3, seed=2)
    assert not set(a) & set(texts) and len(a) == len(set(a))
    import random

    rng = random.Random(0)
    words = texts[0].split()
    assert "[MASK]" in perturb(texts[0], "mask", 0.3, rng)
    assert sorted(perturb(texts[0], "swap", 0.3, rng).split()) == sorted(words)
    dropped = perturb(texts[0], "dropout", 0.5, rng).split()
    assert 1 <= len(dropped) < len(words) and set(dropped) <= set(words)
    assert set(KINDS) == {"dropout", "mask", "swap"}
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(texts[0], "shuffle", 0.3, rng)


def test_augmentation_is_opt_in_and_only_without_unlabeled_rows(tiny: Backbone, with_unlabeled: Path) -> None:
    plain = read_tenant_data(str(with_unlabeled.parent / "plain.parquet"))
    assert transfer_inputs(tiny, plain, fast_config("distill")).texts == []
    cfg = fast_config("distill", epochs=1, transfer=TransferConfig(augment="mask", augment_copies=2))
    inputs = transfer_inputs(tiny, plain, cfg)
    assert inputs.source == "augmented" and 0 < len(inputs.texts) <= 2 * len(plain.train)
    assert all("[MASK]" in t for t in inputs.texts)
    result = train_tenant(tiny, plain, cfg, teachers_for(tiny))
    assert result.metrics["augmented_examples"] == len(inputs.texts)
    assert transfer_inputs(tiny, read_tenant_data(str(with_unlabeled)), cfg).source == "unlabeled"


def test_the_noisy_student_sees_transfer_rows_with_word_pieces_hidden() -> None:
    mask = torch.tensor([[1] * 8, [1] * 8, [1] * 6 + [0] * 2, [1, 1, 0, 0, 0, 0, 0, 0]])
    hidden = hide_tokens(mask, 1, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(hidden[0], mask[0]) and torch.equal(mask[1], torch.ones(8, dtype=torch.long))  # a copy
    assert not bool((hidden > mask).any())  # padding stays padding
    for row, length in ((1, 8), (2, 6)):
        assert hidden[row, 0] == 1 and hidden[row, length - 1] == 1  # [CLS] and [SEP] stay
        assert 1 <= int(hidden[row, 1 : length - 1].sum()) < length - 2  # some word-pieces hidden, never all
    assert torch.equal(hidden[3], mask[3])  # [CLS] [SEP] only: nothing to hide
    everything = hide_tokens(mask, 0, 0.999, torch.Generator().manual_seed(0))
    assert torch.equal(everything[:3, 1:5], mask[:3, 1:5])  # a row that would lose all its word-pieces keeps them
    assert torch.equal(hide_tokens(mask, 1, 0.0, torch.Generator()), mask)


def test_neighbours_are_the_nearest_other_texts_in_the_frozen_encoders_space(tiny: Backbone) -> None:
    texts = ["open my account", "open my account now", "close my account", "what is the weather", "weather today"]
    near = neighbour_index(tiny, texts, 2, 16, chunk=2)  # chunks smaller than the set: the same answer
    assert near.shape == (5, 2) and torch.equal(near, neighbour_index(tiny, texts, 2, 16))
    assert all(i not in near[i].tolist() for i in range(5))  # never its own neighbour
    encoded = Encoded(tiny, texts, [0] * 5, 16)
    with torch.no_grad():  # the same ranking, from the vectors computed here the plain way
        vectors = []
        for i in range(5):
            batch = encoded.batch([i])
            vectors.append(F.normalize(tiny.model(batch.input_ids).last_hidden_state.mean(1)[0], dim=-1))
    sims = torch.stack(vectors) @ torch.stack(vectors).T
    sims.fill_diagonal_(-2)
    assert torch.equal(near, sims.topk(2, dim=-1).indices)
    assert neighbour_index(tiny, texts, 10, 16).shape == (5, 4)  # at most every other text


def test_neighbour_targets_mix_in_the_neighbours_last_known_targets() -> None:
    near = torch.tensor([[1, 2], [0, 2], [0, 1]])
    smooth = NeighbourTargets(near, 0.5, 2.0, 3)
    z0 = torch.tensor([[4.0, 0.0, 0.0]])
    first = smooth(torch.tensor([0]), z0)  # no neighbour seen yet: the teacher's own target
    assert torch.allclose((first / 2.0).softmax(-1), (z0 / 2.0).softmax(-1), atol=1e-6)
    z12 = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    out = smooth(torch.tensor([1, 2]), z12)  # row 1's neighbours 0 and 2 are both known now (2 from this batch)
    p = (torch.cat([z0, z12]) / 2.0).softmax(-1)
    assert torch.allclose((out[0] / 2.0).softmax(-1), 0.5 * p[1] + 0.25 * (p[0] + p[2]), atol=1e-6)
    assert torch.allclose((out[1] / 2.0).softmax(-1), 0.5 * p[2] + 0.25 * (p[0] + p[1]), atol=1e-6)
    z0_again = torch.tensor([[0.0, 0.0, 4.0]])  # the bank keeps each row's latest target
    again = smooth(torch.tensor([0]), z0_again)
    p0 = (z0_again / 2.0).softmax(-1)[0]
    assert torch.allclose((again[0] / 2.0).softmax(-1), 0.5 * p0 + 0.25 * (p[1] + p[2]), atol=1e-6)


@pytest.mark.parametrize(
    "option", [{"student_noise": 0.2}, {"neighbours": 3}], ids=["noisy-student", "neighbour-targets"]
)
def test_stage2_transfer_options_are_seeded_and_act_only_on_transfer_rows(
    tiny: Backbone, with_unlabeled: Path, option: dict[str, float]
) -> None:
    data = read_tenant_data(str(with_unlabeled))
    defaults = fast_config("distill", epochs=1).transfer
    assert (defaults.student_noise, defaults.neighbours) == (0.2, 0)  # noisy student on, neighbour targets off
    cfg = fast_config("distill", epochs=1).replace(transfer=defaults.replace(student_noise=0.0))
    on = cfg.replace(transfer=cfg.transfer.replace(**option))
    stage1, _ = train_adapter(tiny, data, cfg)
    adapters = [t.adapters for t in teachers_for(tiny)]
    plain, _ = distill(tiny, data, cfg, stage1, adapters)
    changed, fit = distill(tiny, data, on, stage1, adapters)
    again, _ = distill(tiny, data, on, stage1, adapters)
    assert fit.steps == 5 and all(torch.isfinite(torch.tensor(h["loss"])) for h in fit.history)
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), changed.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(changed.parameters(), again.parameters()))  # seeded
    labelled_only, _ = distill(tiny, data, on, stage1, adapters, transfer=TransferInputs([], "none"))
    base, _ = distill(tiny, data, cfg, stage1, adapters, transfer=TransferInputs([], "none"))
    assert all(torch.equal(a, b) for a, b in zip(labelled_only.parameters(), base.parameters()))  # no transfer rows


# --------------------------------------------------------------------------------------------- recipe and tuning


def test_transfer_settings_are_validated_recipe_fields() -> None:
    cfg = RecipeConfig.from_dict({"transfer": {"ratio": 4, "max_per_epoch": None, "augment": "swap"}})
    assert (cfg.transfer.ratio, cfg.transfer.max_per_epoch, cfg.transfer.augment) == (4, None, "swap")
    for bad, message in (
        ({"ratio": 0}, r"transfer.ratio must be in \(0, 64\]"),
        ({"max_per_epoch": 0}, "transfer.max_per_epoch must be >= 1"),
        ({"augment": "shuffle"}, "transfer.augment must be one of"),
        ({"augment_rate": 1.0}, r"transfer.augment_rate must be in \(0, 1\)"),
        ({"student_noise": 1.0}, r"transfer.student_noise must be in \[0, 1\)"),
        ({"neighbours": -1}, "transfer.neighbours must be >= 0"),
        ({"neighbour_weight": 0}, r"transfer.neighbour_weight must be in \(0, 1\]"),
        ({"keep": "median"}, "transfer.keep must be one of"),
        ({"ratios": 2}, r"unknown key\(s\) \['ratios'\] in transfer"),
    ):
        with pytest.raises(ConfigError, match=message):
            RecipeConfig.from_dict({"transfer": bad})


def test_tune_spaces_may_search_the_transfer_set() -> None:
    space = space_from_dict(
        {"params": {"transfer.ratio": {"loguniform": [0.5, 8.0]}, "transfer.max_per_epoch": {"choice": [256, None]}}}
    )
    cfg = space.apply(RecipeConfig(), {"transfer.ratio": 2.0, "transfer.max_per_epoch": None})
    assert (cfg.transfer.ratio, cfg.transfer.max_per_epoch) == (2.0, None)
    with pytest.raises(ConfigError, match=r"params.transfer.ratio: value 0.0 makes an invalid recipe"):
        space_from_dict({"params": {"transfer.ratio": {"uniform": [0.0, 2.0]}}})
    near = space_from_dict(
        {"params": {"transfer.neighbours": {"choice": [0, 10]}, "transfer.neighbour_weight": {"uniform": [0.2, 0.8]}}}
    )
    cfg = near.apply(RecipeConfig(), {"transfer.neighbours": 10, "transfer.neighbour_weight": 0.3})
    assert (cfg.transfer.neighbours, cfg.transfer.neighbour_weight) == (10, 0.3)
    keep = space_from_dict({"params": {"transfer.keep": {"choice": ["best", "last", None]}}})
    assert keep.apply(RecipeConfig(), {"transfer.keep": None}).transfer.keep is None
    with pytest.raises(ConfigError, match=r"transfer\.keep"):
        space_from_dict({"params": {"transfer.keep": {"choice": ["last", "median"]}}})
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['transfer.augment_copies'\]"):
        space_from_dict({"params": {"transfer.augment_copies": {"int": [1, 3]}}})


# ------------------------------------------------------------------------------------------------------------ CLI


def test_train_cli_takes_a_folder_with_unlabeled_queries_and_records_them(
    capsys: pytest.CaptureFixture[str], tiny: Backbone, tiny_path: Path, tenants_dir: Path, tmp_path: Path
) -> None:
    import yaml
    from helpers import run_cli

    from adistill.recipes.tenant import TenantJob, run_job
    from adistill.store.registry import Registry

    registry = Registry(str(tmp_path / "registry"))
    job = TenantJob("bank", str(tenants_dir / "bank.parquet"), fast_config("adapter", epochs=1))
    registry.publish("bank", run_job(job, tiny, [])[0])
    rows = pq.read_table(tenants_dir / "new.parquet").to_pylist()
    for split in ("train", "validation", "test"):
        write_rows(tmp_path / "new" / f"{split}.parquet", [r for r in rows if r["split"] == split])
    write_rows(tmp_path / "new" / "unlabeled.csv", [{"text": r["text"]} for r in unlabeled_rows()])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(fast_config("distill", epochs=1).to_dict()))
    code, out, err = run_cli(
        capsys, "train", "--config", str(recipe), "--data", str(tmp_path / "new"), "--tenant", "new",
        "--out", str(tmp_path / "out"), "--teacher-registry", registry.uri, "--backbone", str(tiny_path),
    )  # fmt: skip
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert meta["method"] == "distill"
    assert meta["metrics"]["unlabeled_examples"] == 40 and meta["data"]["unlabeled_examples"] == 40
    assert json.loads(out)["unlabeled_examples"] == 40  # the summary line holds the metrics
