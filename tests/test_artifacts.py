import json
from pathlib import Path

import pytest
import torch
from helpers import fast_config
from torch.utils.flop_counter import FlopCounterMode

from adistill.backbone import Backbone, load_backbone
from adistill.data import read_tenant_data
from adistill.errors import BackboneMismatch, CorruptArtifact, InvalidTenantId
from adistill.recipes import train_tenant
from adistill.recipes.evaluate import predict_probs
from adistill.store.artifact import CONFIG, WEIGHTS, load_artifact, save_artifact


@pytest.fixture(scope="module")
def trained(tiny: Backbone, tenants_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One artifact per method, the distill/fusion ones with two teachers."""
    root = tmp_path_factory.mktemp("artifacts")
    out: dict[str, Path] = {}
    teachers = []
    for name in ("bank", "travel"):
        cfg = fast_config("adapter", epochs=2)
        r = train_tenant(tiny, read_tenant_data(str(tenants_dir / f"{name}.parquet")), cfg)
        out[name] = save_artifact(r.files(name, tiny, cfg, {"source": name}), root / name)
        teachers.append(load_artifact(out[name], tiny).as_teacher())
    data = read_tenant_data(str(tenants_dir / "new.parquet"))
    for method in ("adapter", "distill", "fusion", "finetune"):
        cfg = fast_config(method, epochs=2)
        r = train_tenant(tiny, data, cfg, teachers)
        out[method] = save_artifact(r.files("new", tiny, cfg, {"source": "new"}), root / method)
    return out


def test_round_trip_is_exact(tiny: Backbone, tenants_dir: Path, trained: dict[str, Path]) -> None:
    texts = read_tenant_data(str(tenants_dir / "new.parquet")).test.texts
    for method in ("adapter", "distill", "fusion", "finetune"):
        a = load_artifact(trained[method], tiny)
        b = load_artifact(trained[method], tiny)
        assert a.method == method and a.model.labels == sorted(set(a.model.labels))
        assert torch.equal(predict_probs(tiny, a.model, texts, 32), predict_probs(tiny, b.model, texts, 32))
        files = {p.name: p.read_bytes() for p in trained[method].iterdir()}
        # re-serialising the loaded weights gives the same tensors
        from safetensors.torch import load as st_load

        saved = st_load(files[WEIGHTS])
        assert all(torch.equal(saved[k], v) for k, v in a.model.state_dict().items())


def test_distill_artifact_is_inference_clean(tiny: Backbone, trained: dict[str, Path]) -> None:
    from safetensors.torch import load as st_load

    keys = {m: set(st_load((trained[m] / WEIGHTS).read_bytes())) for m in ("adapter", "distill", "fusion")}
    assert keys["distill"] == keys["adapter"]
    assert not any(k.startswith(("adapters.layers.0.ffn.query", "fusion", "teacher")) for k in keys["distill"])
    assert any(".query." in k for k in keys["fusion"])
    meta = json.loads((trained["distill"] / CONFIG).read_text())
    assert [t["tenant_id"] for t in meta["teachers"]] == ["bank", "travel"]
    assert meta["fusion"] is None
    assert meta["parameters"]["added"] == json.loads((trained["adapter"] / CONFIG).read_text())["parameters"]["added"]

    batch = tiny.tokenize(["pay my bill", "book a flight"], 32)

    def flops(method: str) -> int:
        model = load_artifact(trained[method], tiny).model
        with FlopCounterMode(display=False) as counter:
            model.logits(tiny, batch["input_ids"], batch["attention_mask"])
        return counter.get_total_flops()

    assert flops("distill") == flops("adapter")
    assert flops("fusion") > flops("adapter")


def test_metadata_records_lineage_and_checksums(trained: dict[str, Path]) -> None:
    meta = json.loads((trained["distill"] / CONFIG).read_text())
    for key in (
        "adapter",
        "backbone",
        "labels",
        "method",
        "hyperparameters",
        "teachers",
        "data",
        "metrics",
        "files",
    ):
        assert key in meta
    assert meta["adapter"]["kind"] == "seq_bn" and meta["adapter"]["bottleneck"] == 12
    assert len(meta["backbone"]["fingerprint"]) == 64
    assert meta["hyperparameters"]["distill"]["temperature"] == 2.0
    assert meta["files"][WEIGHTS]["bytes"] == (trained["distill"] / WEIGHTS).stat().st_size


def test_loading_onto_another_backbone_fails(other_tiny_path: Path, trained: dict[str, Path]) -> None:
    other = load_backbone(str(other_tiny_path))
    with pytest.raises(BackboneMismatch, match="fingerprint"):
        load_artifact(trained["adapter"], other)


@pytest.mark.parametrize(
    "damage",
    ["flip_byte", "truncate", "drop_weights", "bad_json", "foreign_json", "wrong_shape_checksummed"],
)
def test_corrupt_artifacts_are_refused(tiny: Backbone, trained: dict[str, Path], tmp_path: Path, damage: str) -> None:
    import shutil

    from adistill.store.artifact import sha256

    folder = tmp_path / "a"
    shutil.copytree(trained["adapter"], folder)
    weights, config = folder / WEIGHTS, folder / CONFIG
    if damage == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "drop_weights":
        weights.unlink()
    elif damage == "bad_json":
        config.write_text("{not json")
    elif damage == "foreign_json":
        config.write_text(json.dumps({"hello": "world"}))
    else:  # checksums fine, but the weights are another tenant's shape
        from safetensors.torch import save as st_save

        fake = st_save({"x": torch.zeros(3)})
        weights.write_bytes(fake)
        meta = json.loads(config.read_text())
        meta["files"][WEIGHTS] = {"sha256": sha256(fake), "bytes": len(fake)}
        config.write_text(json.dumps(meta))
    with pytest.raises(CorruptArtifact):
        load_artifact(folder, tiny)


def test_bad_tenant_id_and_existing_out_are_refused(tiny: Backbone, tenants_dir: Path, tmp_path: Path) -> None:
    cfg = fast_config("adapter", epochs=1)
    r = train_tenant(tiny, read_tenant_data(str(tenants_dir / "bank.parquet")), cfg)
    for bad in ("../x", "a/b", "", "Upper", "x" * 64):
        with pytest.raises(InvalidTenantId):
            r.files(bad, tiny, cfg, {})
    files = r.files("ok", tiny, cfg, {})
    save_artifact(files, tmp_path / "ok")
    with pytest.raises(FileExistsError):
        save_artifact(files, tmp_path / "ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no temporary folders left behind
