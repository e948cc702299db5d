"""Teacher selection: bounded, deterministic, never the tenant itself, bad candidates skipped."""

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fast_config

from adistill.backbone import Backbone
from adistill.data import read_tenant_data
from adistill.errors import ConfigError, CorruptArtifact
from adistill.recipes import train_tenant
from adistill.recipes.tenant import TenantJob, data_record
from adistill.selection import (
    ArtifactPool,
    Candidate,
    RegistryPool,
    SelectionConfig,
    centroid_probe_accuracy,
    choose_teachers,
    data_embedding,
    make_probe,
    select_teachers,
)
from adistill.store.artifact import load_artifact, save_artifact


def synthetic(n: int, dim: int = 8, seed: int = 0) -> list[Candidate]:
    g = torch.Generator().manual_seed(seed)
    return [
        Candidate(f"t{i:04d}", 1, {"data": {"embedding": torch.randn(dim, generator=g).tolist()}, "adapter": SHAPE})
        for i in range(n)
    ]


SHAPE = {"kind": "seq_bn", "reduction_factor": 4}  # as fast_config


class ListPool:
    """A fixed list of candidates (no weights): enough for every selector but `probe`."""

    def __init__(self, candidates: list[Candidate]) -> None:
        self.items = candidates

    def candidates(self) -> list[Candidate]:
        return self.items

    def load(self, candidate: Candidate) -> Any:
        raise AssertionError("no weights to load")


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
        files = result.files(name, tiny, job.config, data_record(job, data, tiny))
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


def test_one_entry_point_chooses_k_teachers_from_registry_metadata(
    tiny: Backbone, tenants_dir: Path, tmp_path: Path
) -> None:
    from adistill.store.registry import Registry

    registry = Registry(str(tmp_path / "registry"))
    for name in ("bank", "travel", "home"):
        job = TenantJob(name, str(tenants_dir / f"{name}.parquet"), fast_config("adapter", epochs=1))
        data = read_tenant_data(job.data)
        result = train_tenant(tiny, data, job.config)
        registry.publish(name, result.files(name, tiny, job.config, data_record(job, data, tiny)))
    pool = RegistryPool(registry, registry.adapters_for(tiny.fingerprint), tiny)
    data = read_tenant_data(str(tenants_dir / "new.parquet"))
    recipe = fast_config("distill")
    sel = choose_teachers(pool, "new", tiny, recipe, SelectionConfig(strategy="similar", k=2), data)
    assert len(sel.pairs) == 2 and all(v == 1 for _, v in sel.pairs)  # published versions, never invented
    lineage = sel.lineage()
    assert lineage["strategy"] == "similar" and lineage["considered"] == 3 and len(lineage["scores"]) == 2
    probe = choose_teachers(pool, "new", tiny, recipe, SelectionConfig(strategy="probe", k=1), data)
    assert len(probe.chosen) == 1 and probe.strategy == "probe"
    with pytest.raises(ConfigError, match="above the cap"):
        choose_teachers(pool, "new", tiny, recipe, SelectionConfig(strategy="all", max_all=2), data)
    # A recipe of another adapter shape is refused in one line naming both shapes, before any training.
    other = recipe.replace(adapter=recipe.adapter.__class__(reduction_factor=2))
    with pytest.raises(ConfigError) as refused:
        choose_teachers(pool, "new", tiny, other, SelectionConfig(strategy="random", k=2), data)
    message = str(refused.value)
    assert "seq_bn, reduction 2" in message and "seq_bn, reduction 4" in message and "\n" not in message


def test_teachers_of_another_shape_are_dropped_when_others_fit(caplog: pytest.LogCaptureFixture) -> None:
    odd = Candidate("odd", 3, {"data": {}, "adapter": {"kind": "houlsby", "reduction_factor": 4}})
    with caplog.at_level(logging.WARNING):
        sel = choose_teachers(
            ListPool([*synthetic(3), odd]), "new", None, fast_config("distill"), SelectionConfig(strategy="all")
        )  # type: ignore[arg-type]
    assert [c.tenant_id for c in sel.chosen] == ["t0000", "t0001", "t0002"] and "another adapter shape" in caplog.text


def test_artifact_pool_refuses_two_versions_of_one_tenant() -> None:
    a = type("A", (), {"tenant_id": "bank"})()
    with pytest.raises(ConfigError, match="twice"):
        ArtifactPool([a, a])  # type: ignore[list-item]


def test_choose_needs_the_new_tenants_queries_only_for_data_driven_selectors(tiny: Backbone) -> None:
    from adistill.data import Split, TenantData

    pool = ListPool(synthetic(5, dim=tiny.hidden_size))
    recipe = fast_config("distill")
    with pytest.raises(ConfigError, match="training queries"):
        choose_teachers(pool, "new", tiny, recipe, SelectionConfig(strategy="similar", k=2))
    sel = choose_teachers(pool, "new", tiny, recipe, SelectionConfig(strategy="random", k=2, seed=1))
    assert len(sel.chosen) == 2
    texts, labels = ["pay my bill", "card declined"], ["a", "b"]
    data = TenantData("inline", Split(texts, labels), Split(), Split())
    sel = choose_teachers(pool, "new", tiny, recipe, SelectionConfig(strategy="similar", k=3), data)
    assert len(sel.chosen) == 3 and set(sel.scores) == {c.tenant_id for c in sel.chosen}


def test_only_similar_and_probe_need_the_new_tenants_data() -> None:
    assert [SelectionConfig(s).uses_data for s in ("all", "random", "similar", "probe")] == [False, False, True, True]
