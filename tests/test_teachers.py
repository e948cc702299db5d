"""Teacher selection: bounded, deterministic, never the tenant itself, bad candidates skipped."""

import logging
from pathlib import Path

import pytest
import torch
from conftest import fast_config

from adistill.artifacts import artifact_files, load_artifact, save_artifact
from adistill.backbone import Backbone
from adistill.data import read_tenant_data
from adistill.errors import ConfigError, CorruptArtifact
from adistill.jobs import TenantJob, data_record
from adistill.recipes import train_tenant
from adistill.teachers import (
    Candidate,
    SelectionConfig,
    centroid_probe_accuracy,
    choose,
    data_embedding,
    make_probe,
    select_teachers,
)


def synthetic(n: int, dim: int = 8, seed: int = 0) -> list[Candidate]:
    g = torch.Generator().manual_seed(seed)
    return [
        Candidate(f"t{i:04d}", 1, {"data": {"embedding": torch.randn(dim, generator=g).tolist()}}) for i in range(n)
    ]


@pytest.mark.parametrize("strategy", ["random", "similar"])
def test_k_distinct_never_self_and_deterministic(strategy: str) -> None:
    pool = synthetic(1000)
    me = pool[17]
    cfg = SelectionConfig(strategy=strategy, k=10, seed=3)  # type: ignore[arg-type]
    a = select_teachers(pool, cfg, tenant_id=me.tenant_id, embedding=me.embedding)
    b = select_teachers(pool, cfg, tenant_id=me.tenant_id, embedding=me.embedding)
    ids = [c.tenant_id for c in a.chosen]
    assert len(ids) == 10 == len(set(ids)) and me.tenant_id not in ids
    assert ids == [c.tenant_id for c in b.chosen]
    assert a.lineage()["considered"] == 999


def test_similar_prefers_close_tenants() -> None:
    pool = synthetic(50)
    target = torch.tensor(pool[5].meta["data"]["embedding"])
    near = Candidate("near", 1, {"data": {"embedding": (target + 0.01).tolist()}})
    sel = select_teachers([*pool, near], SelectionConfig("similar", k=2), tenant_id=pool[5].tenant_id, embedding=target)
    assert sel.chosen[0].tenant_id == "near" and sel.scores["near"] > 0.99


def test_all_is_capped_and_candidates_without_embedding_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="above the cap"):
        select_teachers(synthetic(40), SelectionConfig("all", max_all=32))
    assert len(select_teachers(synthetic(5), SelectionConfig("all")).chosen) == 5
    pool = [*synthetic(4), Candidate("no-embedding", 1, {"data": {}})]
    with caplog.at_level(logging.WARNING):
        sel = select_teachers(pool, SelectionConfig("similar", k=10), embedding=torch.ones(8))
    assert "no-embedding" not in [c.tenant_id for c in sel.chosen] and "not ranked" in caplog.text
    with pytest.raises(ConfigError):
        SelectionConfig("best")  # type: ignore[arg-type]


def test_centroid_probe_scores_separable_features_higher() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    separable = torch.tensor([[1.0, 0], [0.9, 0.1], [1, 0.2], [0, 1], [0.1, 0.9], [0.2, 1]])
    mixed = torch.tensor([[1.0, 0], [0, 1], [1, 0.2], [0.1, 0.9], [1, 0.1], [0.2, 1]])
    assert centroid_probe_accuracy(separable, labels) == 1.0
    assert centroid_probe_accuracy(mixed, labels) < 1.0


def test_probe_selection_on_real_adapters_skips_a_corrupt_candidate(
    tiny: Backbone, tenants_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dirs, candidates = {}, []
    for name in ("bank", "travel", "home"):
        job = TenantJob(name, str(tenants_dir / f"{name}.parquet"), fast_config("adapter", epochs=3))
        data = read_tenant_data(job.data)
        result = train_tenant(tiny, data, job.config)
        files = artifact_files(name, result, tiny, job.config, data_record(job, data, tiny))
        dirs[name] = save_artifact(files, tmp_path / name)
        candidates.append(Candidate(name, 1, load_artifact(dirs[name], tiny).meta))
    assert len(candidates[0].meta["data"]["embedding"]) == tiny.hidden_size

    new = read_tenant_data(str(tenants_dir / "new.parquet"))
    (dirs["home"] / "adapter.safetensors").write_bytes(b"broken")

    def load(c: Candidate):  # type: ignore[no-untyped-def]
        return load_artifact(dirs[c.tenant_id], tiny).as_teacher().adapters

    probe = make_probe(tiny, new.train.texts, new.train.labels, load)
    embedding = torch.tensor(data_embedding(tiny, new.train.texts))
    with caplog.at_level(logging.WARNING):
        sel = select_teachers(candidates, SelectionConfig("probe", k=3), "new", embedding, probe)
    assert [c.tenant_id for c in sel.chosen] == sorted(sel.scores, key=lambda t: -sel.scores[t])
    assert "home" not in sel.scores and "skipped" in caplog.text
    assert set(sel.scores) == {"bank", "travel"} and all(0 <= s <= 1 for s in sel.scores.values())
    with pytest.raises(CorruptArtifact):
        load(candidates[2])


def test_onboarding_driver_chooses_k_teachers_from_registry_metadata(
    tiny: Backbone, tenants_dir: Path, tmp_path: Path
) -> None:
    from adistill.onboard import choose_teachers
    from adistill.registry import Registry

    registry = Registry(str(tmp_path / "registry"))
    for name in ("bank", "travel", "home"):
        job = TenantJob(name, str(tenants_dir / f"{name}.parquet"), fast_config("adapter", epochs=1))
        data = read_tenant_data(job.data)
        result = train_tenant(tiny, data, job.config)
        registry.publish(name, artifact_files(name, result, tiny, job.config, data_record(job, data, tiny)))
    published = tuple(registry.teachers(tiny.fingerprint))
    job = TenantJob("new", str(tenants_dir / "new.parquet"), fast_config("distill"))
    chosen, lineage = choose_teachers(job, published, registry, tiny, SelectionConfig("similar", k=2), {})
    assert len(chosen) == 2 and all(v == 1 for _, v in chosen)
    assert lineage["strategy"] == "similar" and lineage["considered"] == 3 and len(lineage["scores"]) == 2
    chosen_probe, lineage_probe = choose_teachers(job, published, registry, tiny, SelectionConfig("probe", k=1), {})
    assert len(chosen_probe) == 1 and lineage_probe["strategy"] == "probe"
    with pytest.raises(ConfigError, match="above the cap"):
        choose_teachers(job, published, registry, tiny, SelectionConfig("all", max_all=2), {})


def test_choose_needs_the_new_tenants_queries_only_for_data_driven_selectors(tiny: Backbone) -> None:
    pool = synthetic(5, dim=tiny.hidden_size)
    with pytest.raises(ConfigError, match="training queries"):
        choose(pool, SelectionConfig("similar", k=2), "new", tiny, [], [], lambda c: None)
    sel = choose(pool, SelectionConfig("random", k=2, seed=1), "new", tiny, [], [], lambda c: None)
    assert len(sel.chosen) == 2
    texts, labels = ["pay my bill", "card declined"], ["a", "b"]
    sel = choose(pool, SelectionConfig("similar", k=3), "new", tiny, texts, labels, lambda c: None)
    assert len(sel.chosen) == 3 and set(sel.scores) == {c.tenant_id for c in sel.chosen}


def test_only_similar_and_probe_need_the_new_tenants_data() -> None:
    assert [SelectionConfig(s).uses_data for s in ("all", "random", "similar", "probe")] == [False, False, True, True]
