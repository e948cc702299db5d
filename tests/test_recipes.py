"""Recipes on a tiny encoder: they learn, they are reproducible, and stage 2 never changes a teacher."""

from pathlib import Path

import pytest
import torch
from helpers import fast_config

from adistill.adapters import AdapterSet
from adistill.backbone import Backbone
from adistill.config import DistillConfig
from adistill.data import read_tenant_data
from adistill.errors import ConfigError
from adistill.fusion import FusionSet
from adistill.recipes import train_tenant
from adistill.recipes.evaluate import predict_probs
from adistill.store.artifact import load_artifact, save_artifact


@pytest.fixture(scope="module")
def teacher_dirs(tiny: Backbone, tenants_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("teachers")
    out = []
    for name in ("bank", "travel", "home"):
        data = read_tenant_data(str(tenants_dir / f"{name}.parquet"))
        cfg = fast_config("adapter", epochs=4)
        result = train_tenant(tiny, data, cfg)
        out.append(save_artifact(result.files(name, tiny, cfg, {"source": name}), root / name))
    return out


def test_stage1_learns(tiny: Backbone, tenants_dir: Path) -> None:
    data = read_tenant_data(str(tenants_dir / "bank.parquet"))
    result = train_tenant(tiny, data, fast_config("adapter", epochs=25))
    assert result.metrics["validation"]["accuracy"] >= 0.8  # chance is 1/3
    assert result.metrics["test"]["accuracy"] >= 0.7
    assert result.model.oos_threshold is not None  # validation has out-of-scope rows


def test_training_is_reproducible(tiny: Backbone, tenants_dir: Path) -> None:
    data = read_tenant_data(str(tenants_dir / "bank.parquet"))
    a = train_tenant(tiny, data, fast_config("adapter", epochs=2)).model.state_dict()
    b = train_tenant(tiny, data, fast_config("adapter", epochs=2)).model.state_dict()
    c = train_tenant(tiny, data, fast_config("adapter", epochs=2, seed=1)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_distill_leaves_teachers_untouched_and_keeps_only_the_student(
    tiny: Backbone, tenants_dir: Path, teacher_dirs: list[Path], tmp_path: Path
) -> None:
    before = {p: {f.name: f.read_bytes() for f in p.iterdir()} for p in teacher_dirs}
    teachers = [load_artifact(p, tiny) for p in teacher_dirs]
    probe = ["pay my bill", "book a flight", "play a song now"]
    preds_before = [predict_probs(tiny, t.model, probe, 32) for t in teachers]
    weights_before = [{k: v.clone() for k, v in t.model.state_dict().items()} for t in teachers]

    data = read_tenant_data(str(tenants_dir / "new.parquet"))
    cfg = fast_config("distill", epochs=3, distill=DistillConfig(gamma=0.1))
    result = train_tenant(tiny, data, cfg, [t.as_teacher() for t in teachers])
    assert "stage2" in result.stages
    assert isinstance(result.model.adapters, AdapterSet)  # the student alone, no fusion
    assert result.model.method == "distill"
    assert [t["tenant_id"] for t in (t.lineage() for t in result.teachers)] == ["bank", "travel", "home"]

    # teachers: bytes on disk, weights in memory and predictions are all unchanged
    assert before == {p: {f.name: f.read_bytes() for f in p.iterdir()} for p in teacher_dirs}
    for t, w in zip(teachers, weights_before):
        assert all(torch.equal(v, w[k]) for k, v in t.model.state_dict().items())
    for t, p in zip(teachers, preds_before):
        assert torch.equal(predict_probs(tiny, t.model, probe, 32), p)


def test_stage2_trains_fusion_and_student(tiny: Backbone, tenants_dir: Path, teacher_dirs: list[Path]) -> None:
    """The paper's trainable set: Q, K, V, W_F and φ_N (with W_N) change; teachers do not."""
    from adistill.recipes.baselines import teacher_fusion
    from adistill.recipes.stage1 import train_adapter

    data = read_tenant_data(str(tenants_dir / "new.parquet"))
    cfg = fast_config("distill", epochs=2)
    stage1, _ = train_adapter(tiny, data, cfg)
    teachers = [load_artifact(p, tiny).as_teacher().adapters for p in teacher_dirs]
    fusion = teacher_fusion(tiny, teachers, stage1.adapters, cfg.seed)  # type: ignore[arg-type]
    assert sum(p.numel() for p in fusion.parameters() if p.requires_grad) == sum(
        p.numel() for p in fusion.layers.parameters()
    )
    from adistill.recipes.stage2 import distill

    student, fit = distill(tiny, data, cfg, stage1, teachers)
    assert fit.steps > 0
    moved = [not torch.equal(a, b) for a, b in zip(student.parameters(), stage1.parameters())]
    assert any(moved) and fit.best_epoch >= 1  # the student is a stage-2 epoch, never the stage-1 weights


def test_fusion_baseline_keeps_fusion_at_inference(tiny: Backbone, tenants_dir: Path, teacher_dirs: list[Path]) -> None:
    data = read_tenant_data(str(tenants_dir / "new.parquet"))
    teachers = [load_artifact(p, tiny).as_teacher() for p in teacher_dirs]
    result = train_tenant(tiny, data, fast_config("fusion", epochs=2), teachers)
    assert isinstance(result.model.adapters, FusionSet)
    assert len(result.model.adapters.adapters) == 4  # 3 teachers + its own stage-1 adapter


def test_finetune_baseline_trains_its_own_encoder(tiny: Backbone, tenants_dir: Path) -> None:
    data = read_tenant_data(str(tenants_dir / "bank.parquet"))
    result = train_tenant(tiny, data, fast_config("finetune", epochs=2))
    assert result.model.encoder is not None and result.model.adapters is None
    shared = dict(tiny.model.named_parameters())
    assert any(not torch.equal(p, shared[n]) for n, p in result.model.encoder.named_parameters())


def test_method_needs_matching_teachers(tiny: Backbone, tenants_dir: Path, teacher_dirs: list[Path]) -> None:
    from adistill.config import AdapterConfig

    data = read_tenant_data(str(tenants_dir / "new.parquet"))
    with pytest.raises(ConfigError, match="at least one teacher"):
        train_tenant(tiny, data, fast_config("fusion"))
    teachers = [load_artifact(teacher_dirs[0], tiny).as_teacher()]
    cfg = fast_config("distill").replace(adapter=AdapterConfig(reduction_factor=8))
    with pytest.raises(ConfigError, match="share the adapter shape"):
        train_tenant(tiny, data, cfg, teachers)
    # distill with no teachers yet (the platform's first tenant) is stage 1 alone, and says so: method adapter
    result = train_tenant(tiny, data, fast_config("distill", epochs=1))
    assert result.model.method == "adapter" and "stage2" not in result.stages


@pytest.mark.parametrize("kind", ["seq_bn", "houlsby"])
def test_roberta_encoders_train_and_round_trip(
    tiny_roberta: Backbone, tenants_dir: Path, tmp_path: Path, kind: str
) -> None:
    from adistill.config import AdapterConfig

    data = read_tenant_data(str(tenants_dir / "bank.parquet"))
    cfg = fast_config("adapter", epochs=2).replace(adapter=AdapterConfig(kind=kind, reduction_factor=4))  # type: ignore[arg-type]
    result = train_tenant(tiny_roberta, data, cfg)
    path = save_artifact(result.files("bank", tiny_roberta, cfg, {}), tmp_path / "bank")
    loaded = load_artifact(path, tiny_roberta)
    texts = data.test.texts
    assert torch.equal(
        predict_probs(tiny_roberta, loaded.model, texts, 32), predict_probs(tiny_roberta, result.model, texts, 32)
    )
