"""`adistill tune`: search-space validation (no Ray) and small searches on the shared local Ray instance.

Teachers are tiny adapters published into a local-folder registry; every trial is a Ray Train run of stage 2 on
the tiny encoder, so each search costs a few seconds of actor start-up per trial on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, fast_config, kill_cli_when, run_cli, tenant_folder

from adistill.backbone import Backbone
from adistill.cli import main
from adistill.config import RecipeConfig
from adistill.errors import ConfigError
from adistill.recipes.tenant import TenantJob, run_job
from adistill.store.registry import Registry
from adistill.tune_space import load_space, space_from_dict

SMOKE = ROOT / "tune_spaces" / "smoke.yaml"


# ------------------------------------------------------------------------------------------- space files, no Ray


def write_space(folder: Path, data: dict[str, Any], name: str = "space.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_spaces_load() -> None:
    distill = load_space(ROOT / "tune_spaces" / "distill.yaml")
    assert {"distill.temperature", "distill.alpha", "distill.beta", "distill.gamma", "stage2.lr"} <= set(distill.paths)
    tau = next(p for p in distill.params if p.path == "distill.temperature")
    assert (tau.distribution, tau.low, tau.high) == ("loguniform", 1.0, 20.0)
    smoke = load_space(SMOKE)
    assert smoke.samples == 3 and smoke.asha.grace_period == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"params": {"distill.alpha": {"uniform": [0, 1]}}, "trials": 3}, "unknown key(s) ['trials']"),
        ({"params": {"distill.tau": {"uniform": [1, 2]}}}, "unknown parameter(s) ['distill.tau']"),
        ({"params": {"stage1.lr": {"uniform": [0.1, 0.2]}}}, "unknown parameter(s) ['stage1.lr']"),
        ({"params": {"distill.alpha": {"normal": [0, 1]}}}, "params.distill.alpha: unknown distribution 'normal'"),
        ({"params": {"distill.alpha": {"uniform": [0, 2]}}}, "params.distill.alpha: value 2 makes an invalid recipe"),
        ({"params": {"distill.temperature": {"loguniform": [0, 20]}}}, "loguniform needs low > 0"),
        ({"params": {"distill.temperature": {"uniform": [5, 1]}}}, "low must be below high"),
        ({"params": {"stage2.epochs": {"uniform": [1, 5]}}}, "an integer setting takes"),
        ({"params": {"stage2.lr": {"choice": []}}}, "choice needs a non-empty list"),
        ({"params": {}}, "'params' must be a non-empty mapping"),
        (
            {"params": {"distill.alpha": {"uniform": [0, 1]}}, "fixed": {"stage9": {}}},
            "fixed: unknown key(s) ['stage9']",
        ),
        (
            {"params": {"distill.alpha": {"uniform": [0, 1]}}, "fixed": {"distill": {"alpha": 0.5}}},
            "fixed.distill.alpha: also in params",
        ),
        ({"params": {"distill.alpha": {"uniform": [0, 1]}}, "asha": {"grace_period": 0}}, "asha.grace_period"),
    ],
)
def test_bad_space_files_fail_fast_naming_the_key(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    path = write_space(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_cli_refuses_a_bad_space_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = write_space(tmp_path, {"params": {"distill.temperature": {"loguniform": [1, 20]}}, "trails": 3})
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"tenants": [{"id": "new", "data": str(tmp_path)}]}))
    code = main(["tune", str(manifest), "--tenant", "new", "--space", str(space), "--registry", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1
    assert "unknown key(s) ['trails']" in err and "space.yaml" in err


@pytest.mark.parametrize(
    ("tenant_args", "message"),
    [
        (["--tenants", "new,ghost"], "no tenant 'ghost'"),
        (["--tenant", "new", "--tenants", "new,home"], "exactly one of --tenant ID or --tenants"),
        ([], "exactly one of --tenant ID or --tenants"),
        (["--tenants", "new", "--teacher-k", "0"], "teacher selection k must be >= 1"),
    ],
)
def test_cli_refuses_bad_tenants_and_selectors_before_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tenant_args: list[str], message: str
) -> None:
    manifest = tmp_path / "m.yaml"
    tenants = [{"id": t, "data": str(tmp_path)} for t in ("new", "home")]
    manifest.write_text(yaml.safe_dump({"tenants": tenants}))
    argv = ["tune", str(manifest), *tenant_args, "--space", str(SMOKE), "--registry", str(tmp_path / "r")]
    code = main(argv)
    assert code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_space_applies_fixed_then_values_and_checks_membership() -> None:
    space = space_from_dict(
        {
            "params": {"distill.temperature": {"loguniform": ["1e-1", 10]}, "stage2.epochs": {"int": [2, 4]}},
            "fixed": {"stage2": {"lr": 0.01}},
        }
    )
    cfg = space.apply(RecipeConfig(method="adapter"), {"distill.temperature": 3.0, "stage2.epochs": 3})
    assert (cfg.method, cfg.distill.temperature, cfg.stage2.epochs, cfg.stage2.lr) == ("distill", 3.0, 3, 0.01)
    assert space.contains({"distill.temperature": 3.0, "stage2.epochs": 4})
    assert not space.contains({"distill.temperature": 30.0, "stage2.epochs": 3})
    assert not space.contains({"distill.temperature": 3.0})
    assert space.max_epochs(RecipeConfig()) == 4


# ------------------------------------------------------------------------------------------- searches on Ray


@pytest.fixture(scope="module")
def registry_with_teachers(
    tiny_path: Path, tiny: Backbone, tenants_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    uri = str(tmp_path_factory.mktemp("tune-registry"))
    registry = Registry(uri)
    for name in ("bank", "travel"):
        job = TenantJob(name, str(tenants_dir / f"{name}.parquet"), fast_config("adapter", epochs=3))
        files, _ = run_job(job, tiny, [])
        registry.publish(name, files)
    return uri


@pytest.fixture(scope="module")
def tune_manifest(tenants_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tune-manifest") / "tenants.yaml"
    tenants = [{"id": t, "data": str(tenants_dir / f"{t}.parquet")} for t in ("new", "home")]
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path


def smoke_argv(manifest: Path, registry: str, tiny_path: Path, tmp_path: Path) -> list[str]:
    """`adistill tune` for tenant `new` with the smoke space; runs, --json and --save-config under tmp_path."""
    return [
        *["tune", str(manifest), "--tenant", "new", "--space", str(SMOKE), "--registry", registry],
        *["--backbone", str(tiny_path), "--storage-path", str(tmp_path / "runs")],
        *["--json", str(tmp_path / "tune.json"), "--save-config", str(tmp_path / "best.yaml")],
    ]


def test_a_recipe_of_another_adapter_shape_is_refused_before_ray(
    registry_with_teachers: str,
    tune_manifest: Path,
    tiny_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Teachers of reduction 4, a recipe of reduction 2: one line naming both shapes, and no Ray run started."""
    space = write_space(
        tmp_path, {"params": {"distill.alpha": {"uniform": [0, 1]}}, "fixed": {"adapter": {"reduction_factor": 2}}}
    )
    argv = smoke_argv(tune_manifest, registry_with_teachers, tiny_path, tmp_path)
    argv[argv.index(str(SMOKE))] = str(space)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "reduction 2" in err[0] and "reduction 4" in err[0] and "differs from the teachers'" in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_smoke_search_finds_a_best_config_inside_the_space_and_saves_a_recipe(
    ray_local: Any,
    registry_with_teachers: str,
    tune_manifest: Path,
    tenants_dir: Path,
    tiny_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, recipe = tmp_path / "tune.json", tmp_path / "best.yaml"
    new = tenant_folder(tenants_dir / "new.parquet", tmp_path / "new", unlabeled=12)  # with 12 queries, no labels
    manifest = tmp_path / "tenants.yaml"
    entries = [
        {**e, "data": str(new)} if e["id"] == "new" else e for e in yaml.safe_load(tune_manifest.read_text())["tenants"]
    ]
    manifest.write_text(yaml.safe_dump({"tenants": entries}))
    argv = [
        *smoke_argv(manifest, registry_with_teachers, tiny_path, tmp_path),
        "--teacher-select",
        "random",
        "--teacher-k",
        "1",
    ]
    code, stdout, stderr = run_cli(capsys, *argv)
    text = stdout + stderr
    assert code == 0, text
    report = json.loads(out.read_text())
    space = load_space(SMOKE)
    assert len(report["trials"]) == 3
    assert all(t["status"] == "TERMINATED" for t in report["trials"])
    assert space.contains(report["best_params"])
    best = report["best_config"]
    assert {"temperature", "alpha", "beta", "gamma", "lr", "epochs"} <= set(best)
    assert best["temperature"] == report["best_params"]["distill.temperature"]
    assert best["lr"] == report["best_params"]["stage2.lr"]
    assert report["best_metric"] == max(t["val_accuracy"] for t in report["trials"])
    assert 0.0 <= report["best_metric"] <= 1.0
    assert all(t["unlabeled_examples"] == {"new": 12} for t in report["trials"])  # every trial's stage 2 used them
    assert set(report["stage1_val_accuracy"]) == {"new"}
    selection = report["teacher_selection"]["new"]  # stage 2 of every trial used the one teacher chosen
    assert selection["strategy"] == "random" and len(selection["chosen"]) == 1 and selection["considered"] >= 2

    # The saved recipe is an ordinary recipe file: train/onboard --config accept it.
    cfg = RecipeConfig.from_yaml(recipe)
    assert cfg.method == "distill"
    assert cfg.distill.temperature == best["temperature"] and cfg.distill.alpha == best["alpha"]
    assert cfg.stage2.lr == best["lr"] and cfg.adapter.reduction_factor == 4  # `fixed` carried over

    # Same command again: the deterministic name resumes the finished experiment; nothing is retrained.
    code, stdout, stderr = run_cli(capsys, *argv)
    text = stdout + stderr
    assert code == 0, text
    again = json.loads(out.read_text())
    assert again["name"] == report["name"] and again["best_params"] == report["best_params"]
    assert "resuming" in text and "reused" in text


@pytest.mark.slow
def test_asha_stops_trials_in_a_bad_region(
    ray_local: Any,
    registry_with_teachers: str,
    tune_manifest: Path,
    tiny_path: Path,
    tmp_path: Path,
) -> None:
    from adistill.distributed.tune import TuneOptions, tune_tenants
    from adistill.manifest import load_manifest

    # Stage 1 learns little (1 epoch); stage 2 learns at lr 0.05 and not at all at lr 1e-7.
    space = space_from_dict(
        {
            "params": {"stage2.lr": {"choice": [1.0e-7, 0.05]}},
            "fixed": {
                "adapter": {"reduction_factor": 4},
                "stage1": {"epochs": 1, "lr": 0.05, "batch_size": 16, "patience": None},
                "stage2": {"epochs": 4, "batch_size": 16, "patience": None},
            },
            "asha": {"grace_period": 1, "reduction_factor": 2},
        },
        name="asha",
    )
    options = TuneOptions(
        backbone=str(tiny_path),
        samples=3,
        max_concurrent=2,
        scheduler="asha",
        search="random",
        storage_path=str(tmp_path / "runs"),
        seed=5,  # draws lr 0.05, 0.05, 1e-7: the bad trial starts after a good one has set the rungs
    )
    outcome = tune_tenants(
        load_manifest(tune_manifest), ["new", "home"], space, Registry(registry_with_teachers), options=options
    )
    trials = outcome.trials
    assert len(trials) == 3 and all(t.status == "TERMINATED" for t in trials)
    stopped = [t for t in trials if t.stopped_early]
    assert stopped, [(t.params, t.val_accuracy, t.epochs_run) for t in trials]
    assert all(t.params["stage2.lr"] == 1.0e-7 for t in stopped)
    assert outcome.best_params == {"stage2.lr": 0.05}
    assert all(set(t.per_tenant) == {"new", "home"} for t in trials)  # one shared config, mean over two tenants
    assert outcome.best_metric > max(t.val_accuracy or 0 for t in stopped)


@pytest.mark.slow
def test_a_killed_search_resumes_and_finishes_with_every_trial(
    ray_local: Any,
    registry_with_teachers: str,
    tune_manifest: Path,
    tiny_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The driver of a search is killed once its first trial reported; the same command resumes the experiment
    (Tuner.restore), reuses stage 1 and ends with all the asked trials."""
    runs = tmp_path / "runs"
    argv = [
        *smoke_argv(tune_manifest, registry_with_teachers, tiny_path, tmp_path),
        *["--name", "interrupted", "--samples", "4", "--max-concurrent", "1", "--scheduler", "fifo"],
    ]
    gcs = ray_local.get_runtime_context().gcs_address

    def reported() -> bool:
        return any(p.stat().st_size for p in (runs / "interrupted").glob("*/result.json"))

    # The driver dies mid-search, its trials with it; generous timeout: a loaded 2-core machine starts actors slowly.
    kill_cli_when(argv, gcs, reported, "trial report", 480)
    assert not (tmp_path / "tune.json").exists()

    code, stdout, stderr = run_cli(capsys, *argv)
    text = stdout + stderr
    assert code == 0, text
    assert "resuming" in text and "reused" in text  # Tuner.restore, and stage 1 read back, not retrained
    report = json.loads((tmp_path / "tune.json").read_text())
    assert len(report["trials"]) == 4 and all(t["status"] == "TERMINATED" for t in report["trials"])
    assert len({t["trial_id"] for t in report["trials"]}) == 4
