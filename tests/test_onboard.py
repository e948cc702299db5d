"""Onboarding on Ray Train: `adistill onboard` end to end on the shared local Ray instance and the tiny encoder.

Each Train run costs seconds of actor start-up on 2 cores, so tests batch their tenants: one S3 test covers the
first batch, the teachers of the second batch, a bad tenant among good ones and the skip of published tenants.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import (
    PYTHON,
    cli_env,
    fast_config,
    free_ports,
    kill_cli_when,
    run_cli,
    tenant_folder,
    write_intents_csv,
)

from adistill.backbone import Backbone
from adistill.cli import main
from adistill.store.names import WEIGHTS
from adistill.store.registry import Registry


def recipe_yaml(folder: Path, method: str = "distill", epochs: int = 2) -> Path:
    path = folder / f"recipe-{method}-{epochs}.yaml"
    path.write_text(yaml.safe_dump(fast_config(method, epochs=epochs).to_dict()))
    return path


def manifest(folder: Path, name: str, tenants: dict[str, Path | str]) -> str:
    path = folder / name
    path.write_text(yaml.safe_dump({"tenants": [{"id": k, "data": str(v)} for k, v in tenants.items()]}))
    return str(path)


def s3_args(bucket: Any) -> list[str]:
    opts = bucket.storage_options
    return [
        f"--storage-option=key={opts['key']}",
        f"--storage-option=secret={opts['secret']}",
        f"--storage-option=client_kwargs.endpoint_url={opts['client_kwargs']['endpoint_url']}",
    ]


def onboard(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    """Run `adistill onboard` in-process; (exit code, outcomes from --json, stdout + stderr)."""
    out_json = Path(argv[argv.index("--json") + 1])
    code, out, err = run_cli(capsys, "onboard", *argv)
    outcomes = json.loads(out_json.read_text()) if out_json.exists() else []
    return code, outcomes, out + err


def by_id(outcomes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["tenant_id"]: o for o in outcomes}


@pytest.mark.slow
def test_onboard_to_s3_then_teachers_bad_tenant_and_skip(
    ray_local: Any,
    s3_moto: Any,
    tiny_path: Path,
    tiny: Backbone,
    tenants_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = s3_moto.uri("registry")
    common = [
        "--registry",
        uri,
        "--backbone",
        str(tiny_path),
        "--config",
        str(recipe_yaml(tmp_path)),
        "--storage-path",
        s3_moto.uri("runs"),  # Train checkpoints on S3 too (storage_filesystem)
        "--max-concurrent",
        "3",
        "--resources-per-tenant",
        '{"CPU": 1}',
        *s3_args(s3_moto),
    ]
    first = {n: tenants_dir / f"{n}.parquet" for n in ("bank", "travel", "home")}
    code, outcomes, text = onboard(
        capsys, manifest(tmp_path, "first.yaml", first), *common, "--json", str(tmp_path / "1.json")
    )
    assert code == 0, text
    assert {o["tenant_id"]: (o["status"], o["version"]) for o in outcomes} == {n: ("published", 1) for n in first}
    assert "3 published, 0 skipped, 0 failed" in text
    assert "bank: stage1 epoch 2/2" in text  # per-tenant progress lines
    assert "[3/3 tenants, " in text and "/h, ETA 0s]" in text  # the batch's progress on each tenant's last line
    assert "bank: teachers note=no teachers: stage 1 alone, published as method 'adapter'" in text
    registry = Registry(uri, s3_moto.storage_options)
    assert registry.tenants() == ["bank", "home", "travel"]
    assert registry.meta("bank")["method"] == "adapter"  # distill with no teacher yet says what it is
    before = {n: registry.get_files(n) for n in first}

    # Second batch: two new tenants learn from the first three; one tenant's data is unusable.
    write_intents_csv(tmp_path / "shop.csv", ["pay_bill", "recipe", "hotel"], per_label=20, seed=5)
    pq.write_table(pa.Table.from_pylist([{"text": "only one label", "label": "a"}] * 4), tmp_path / "broken.parquet")
    # `new` is a folder: its labelled rows and 12 queries its users typed, without labels
    new = tenant_folder(tenants_dir / "new.parquet", tmp_path / "new", unlabeled=12, name="unlabeled.jsonl")
    second = {
        "new": new,
        "broken": tmp_path / "broken.parquet",
        "shop": tmp_path / "shop.csv",
    }
    second_yaml = manifest(tmp_path, "second.yaml", second)
    doc = yaml.safe_load(Path(second_yaml).read_text())
    doc["tenants"][2].update(text_column="query", label_column="category")  # shop's CSV names its own columns
    Path(second_yaml).write_text(yaml.safe_dump(doc))
    code, outcomes, text = onboard(capsys, second_yaml, *common, "--json", str(tmp_path / "2.json"))
    assert code == 1, text
    got = by_id(outcomes)
    assert got["broken"]["status"] == "failed" and "DataError" in got["broken"]["error"]
    assert "at least 2 are needed" in got["broken"]["error"]
    assert "2 published, 0 skipped, 1 failed" in text
    assert "broken" not in registry.tenants()
    assert "broken: failed error=DataError" in text  # found by the driver's data check, before any model loaded
    assert registry.meta("shop")["data"]["columns"] == {"text": "query", "label": "category"}
    assert "no out-of-scope threshold for 1 tenant(s) (shop)" in text  # its CSV has no oos rows
    for tenant in ("new", "shop"):
        assert got[tenant]["status"] == "published"
        meta = registry.meta(tenant)
        lineage = sorted((t["tenant_id"], t["version"], t["sha256"]) for t in meta["teachers"])
        assert lineage == sorted((n, 1, registry.get(n, tiny, 1).sha256) for n in first)
        assert meta["method"] == "distill" and "stage2" in meta["metrics"]["seconds"]
        assert meta["metrics"].get("unlabeled_examples") == (12 if tenant == "new" else None)  # stage 2 used them
        assert meta["teacher_selection"]["strategy"] == "similar"  # the default selector, k = 10 >= 3 candidates
        assert sorted(meta["teacher_selection"]["chosen"]) == sorted(first)
        assert registry.get(tenant, tiny).model.adapters is not None
    assert {n: registry.get_files(n) for n in first} == before  # the teachers' bytes are unchanged

    # Re-running the first batch trains nothing: same data, recipe and backbone are already published.
    code, outcomes, text = onboard(
        capsys, manifest(tmp_path, "first.yaml", first), *common, "--json", str(tmp_path / "3.json")
    )
    assert code == 0, text
    assert {o["tenant_id"]: (o["status"], o["version"]) for o in outcomes} == {n: ("skipped", 1) for n in first}
    assert all(registry.versions(n) == [1] for n in first)


def test_a_recipe_recorded_before_a_field_existed_is_the_same_recipe() -> None:
    """A published tenant is skipped when its recorded recipe equals the job's: a field added since (at its default)
    must not retrain every published tenant; a changed value, an unknown key or no recipe must."""
    from adistill.config import RecipeConfig
    from adistill.onboard_plan import _same_recipe

    cfg = RecipeConfig()
    older = cfg.to_dict()
    del older["distill"]["teacher"], older["transfer"]  # recorded before these existed
    assert _same_recipe(older, cfg) and _same_recipe(cfg.to_dict(), cfg)
    assert not _same_recipe(older, cfg.replace(distill=cfg.distill.replace(teacher="fitted")))
    assert not _same_recipe({**older, "stage9": {}}, cfg) and not _same_recipe(None, cfg)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"tenants": [{"id": "bank", "data": "missing.parquet"}]}, "not found"),
        ({"tenants": [{"id": "bank", "data": "bank.parquet"}, {"id": "bank", "data": "bank.parquet"}]}, "duplicate"),
        ({"tenants": [{"id": "Bad/Id", "data": "bank.parquet"}]}, "invalid tenant id"),
        ("tenants: [unclosed", "invalid YAML"),
    ],
    ids=["missing-data", "duplicate-ids", "bad-id", "bad-yaml"],
)
def test_bad_manifest_fails_before_any_training(
    content: Any, expected: str, tenants_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bank.parquet").write_bytes((tenants_dir / "bank.parquet").read_bytes())
    path = tmp_path / "manifest.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    registry, runs = tmp_path / "registry", tmp_path / "runs"
    code = main(["onboard", str(path), "--registry", str(registry), "--storage-path", str(runs)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("adistill onboard: error: manifest") and expected in err, err
    assert len(err.strip().splitlines()) == 1
    assert not registry.exists() and not runs.exists()  # nothing was touched, let alone trained


@pytest.mark.slow
def test_killed_driver_resumes_without_retraining_published(
    ray_local: Any, tiny_path: Path, tenants_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenants = {n: tenants_dir / f"{n}.parquet" for n in ("bank", "travel", "home")}
    path = manifest(tmp_path, "m.yaml", tenants)
    registry_dir, runs = tmp_path / "registry", tmp_path / "runs"
    args = [
        str(path),
        "--registry",
        str(registry_dir),
        "--backbone",
        str(tiny_path),
        "--config",
        str(recipe_yaml(tmp_path, "adapter", epochs=300)),  # seconds per tenant: the kill lands mid-batch
        "--storage-path",
        str(runs),
        "--workers",
        "1",
        "--resources-per-worker",
        '{"CPU": 1}',
    ]
    registry = Registry(str(registry_dir))
    gcs = ray_local.get_runtime_context().gcs_address
    # The driver dies mid-batch, its Train runs with it, once the first tenant is published.
    kill_cli_when(["onboard", *args], gcs, lambda: bool(registry.tenants()), "first tenant published", 240)
    published = {n: registry.get_files(n) for n in registry.tenants()}
    assert 1 <= len(published) < 3

    code, outcomes, text = onboard(capsys, *args, "--json", str(tmp_path / "out.json"))
    assert code == 0, text
    got = by_id(outcomes)
    for tenant in tenants:
        assert got[tenant]["status"] == ("skipped" if tenant in published else "published")
        assert registry.versions(tenant) == [1]  # nothing published twice
    assert {n: registry.get_files(n) for n in published} == published  # and nothing retrained


def test_a_finished_but_unpublished_tenant_is_published_without_training(
    tiny: Backbone, tiny_path: Path, tenants_dir: Path, tmp_path: Path
) -> None:
    """A driver that died between a worker finishing a tenant and publishing it: the rerun publishes the finished
    artifact from the run's checkpoints, with no Ray work at all."""
    from adistill.data import read_tenant_data
    from adistill.distributed.onboard import OnboardOptions, onboard_manifest
    from adistill.manifest import load_manifest
    from adistill.onboard_plan import plan_batch
    from adistill.recipes import train_tenant
    from adistill.recipes.tenant import TenantJob, data_record
    from adistill.store.checkpoints import RunFolder

    registry = Registry(str(tmp_path / "registry"))
    loaded = load_manifest(manifest(tmp_path, "m.yaml", {"bank": tenants_dir / "bank.parquet"}))
    cfg = fast_config("adapter", epochs=1)
    [plan], _ = plan_batch(loaded, registry, tiny, cfg, None, {}, lambda e: None)
    data = read_tenant_data(plan.job.data)
    files = train_tenant(tiny, data, cfg).files(
        "bank", tiny, cfg, data_record(TenantJob("bank", plan.job.data, cfg), data)
    )
    RunFolder(str(tmp_path / "runs"), plan.run_name).write("done", files)
    events: list[str] = []
    options = OnboardOptions(backbone=str(tiny_path), storage_path=str(tmp_path / "runs"))
    [outcome] = onboard_manifest(loaded, registry, cfg, None, options, lambda e: events.append(e.status))
    assert (outcome.status, outcome.version) == ("published", 1) and "resumed" in events and "running" not in events
    assert registry.get_files("bank")[WEIGHTS] == files[WEIGHTS]  # the finished weights, not retrained ones
    assert RunFolder(str(tmp_path / "runs"), plan.run_name).read("done") is None  # checkpoints go once published


# A worker SIGKILLed mid-tenant (requeued, published exactly once, under serving load): tests/test_faults.py, fault 4.


def test_queue_hands_out_each_tenant_once_and_requeues_a_silent_workers_tenant() -> None:
    """The queue actor's rules, as a plain object: leases, heartbeats, first result wins, attempts bounded."""
    from adistill.distributed.onboard_worker import DONE, TenantQueue, TenantTask

    tasks = [TenantTask(n, f"/{n}", {}, f"run-{n}", []) for n in ("a", "b")]
    queue = TenantQueue(tasks, max_attempts=2, lease_s=0.05)
    first = queue.next("w1")
    second = queue.next("w2")
    assert isinstance(first, TenantTask) and isinstance(second, TenantTask) and first.tenant_id != second.tenant_id
    assert queue.next("w2") is None  # nothing pending, both in flight
    assert queue.finish("w2", second.tenant_id, {"f": b""}, None, {})
    time.sleep(0.1)  # w1 falls silent: its tenant goes back to the queue
    again = queue.next("w3")
    assert isinstance(again, TenantTask) and again.tenant_id == first.tenant_id
    assert queue.finish("w3", first.tenant_id, {"f": b""}, None, {})
    assert not queue.finish("w1", first.tenant_id, {"f": b""}, None, {})  # a late duplicate is ignored
    assert queue.next("w3") == DONE
    statuses = [(m.tenant_id, m.status) for m in queue.drain()]
    assert statuses.count((first.tenant_id, "trained")) == 1 and (first.tenant_id, "requeued") in statuses

    stubborn = TenantQueue([TenantTask("c", "/c", {}, "run-c", [])], max_attempts=1, lease_s=0.0)
    assert isinstance(stubborn.next("w1"), TenantTask)
    time.sleep(0.01)
    assert stubborn.next("w2") == DONE  # its only attempt died with its worker: it fails, it is not retried
    [message] = stubborn.drain()
    assert message.status == "failed" and "died" in str(message.error)


def test_stage1_checkpoint_resume_matches_a_straight_run(tiny: Backbone, tenants_dir: Path) -> None:
    """The resume path (stage 1 restored from its checkpoint) gives what `train_tenant` gives."""
    import torch

    from adistill.data import read_tenant_data
    from adistill.recipes import train_tenant
    from adistill.recipes.resume import train_resumable
    from adistill.store.artifact import Teacher

    cfg = fast_config("distill", epochs=2)
    teacher_data = read_tenant_data(str(tenants_dir / "bank.parquet"))
    teacher_model = train_tenant(tiny, teacher_data, fast_config("adapter", epochs=1)).model
    teachers = [Teacher("bank", teacher_model.adapters, 1, "x")]  # type: ignore[arg-type]
    data = read_tenant_data(str(tenants_dir / "new.parquet"))
    saved: dict[str, Any] = {}
    straight = train_resumable("new", tiny, data, cfg, teachers, on_stage1=lambda files: saved.update(files))
    events: list[dict[str, object]] = []
    resumed = train_resumable("new", tiny, data, cfg, teachers, events.append, saved_stage1=saved)
    assert events[0] == {"stage": "resumed", "from": "stage1 checkpoint"}
    assert all(e["stage"] != "stage1" for e in events)  # stage 1 was not trained again
    reference = train_tenant(tiny, data, cfg, teachers)
    for other in (resumed, reference):
        for (name, a), (_, b) in zip(straight.model.state_dict().items(), other.model.state_dict().items()):
            assert torch.allclose(a, b, atol=1e-6), name
        assert other.metrics["validation"] == pytest.approx(straight.metrics["validation"])
    other_data = read_tenant_data(str(tenants_dir / "home.parquet"))
    fresh: list[dict[str, object]] = []
    train_resumable("home", tiny, other_data, cfg, teachers, fresh.append, saved_stage1=saved)
    assert fresh[0]["stage"] == "stage1"  # another tenant's data: the checkpoint is not used


def wait_for_dashboard(port: int, head: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        assert head.poll() is None, f"ray start exited: {log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the dashboard never answered: {log.read_text()[-2000:]}"
        time.sleep(1)


@pytest.mark.slow
def test_ray_job_submit_with_working_dir(tiny_path: Path, tenants_dir: Path, tmp_path: Path) -> None:
    """A real `ray job submit --working-dir` against a head node this test starts (and stops) itself."""
    import shutil
    import tempfile

    bin_dir = Path(PYTHON).parent
    temp_dir = Path(tempfile.mkdtemp(prefix="rayt-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs_port, dashboard_port, client_port, agent_port, metrics_port, runtime_env_port = free_ports(6)
    env = cli_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    work = tmp_path / "job"
    work.mkdir()
    for name in ("bank", "travel"):
        shutil.copy(tenants_dir / f"{name}.parquet", work / f"{name}.parquet")
    (work / "manifest.yaml").write_text(
        yaml.safe_dump(
            {"tenants": [{"id": "bank", "data": "bank.parquet"}, {"id": "travel", "data": "travel.parquet"}]}
        )
    )
    (work / "recipe.yaml").write_text(yaml.safe_dump(fast_config("adapter", epochs=1).to_dict()))
    registry_dir = tmp_path / "registry"
    head_log = (tmp_path / "head.log").open("wb")
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
            "--num-cpus=4",
            f"--ray-client-server-port={client_port}",
            f"--dashboard-agent-listen-port={agent_port}",
            f"--metrics-export-port={metrics_port}",
            f"--runtime-env-agent-port={runtime_env_port}",
        ],
        env=env,
        stdout=head_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped below by its pid, nothing else touched
    )
    try:
        wait_for_dashboard(dashboard_port, head, tmp_path / "head.log")
        job = subprocess.run(
            [
                str(bin_dir / "ray"),
                "job",
                "submit",
                f"--address=http://127.0.0.1:{dashboard_port}",
                f"--working-dir={work}",
                "--",
                "python",
                "-m",
                "adistill",
                "onboard",
                "manifest.yaml",
                "--registry",
                str(registry_dir),
                "--backbone",
                str(tiny_path),
                "--config",
                "recipe.yaml",
                "--storage-path",
                str(tmp_path / "runs"),
                "--resources-per-tenant",
                '{"CPU": 1}',
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "2 published, 0 skipped, 0 failed" in job.stdout
        registry = Registry(str(registry_dir))
        assert registry.tenants() == ["bank", "travel"]
        assert registry.meta("bank")["data"]["source"].endswith("bank.parquet")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # anything of that group still alive
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The driver's decisions, without Ray.


def test_run_names_are_deterministic_and_follow_every_input(tenants_dir: Path) -> None:
    from adistill.onboard_plan import run_name
    from adistill.recipes.tenant import TenantJob

    job = TenantJob("bank", str(tenants_dir / "bank.parquet"), fast_config("distill"))
    name = run_name(job, "fp", (("travel", 1),))
    assert name == run_name(job, "fp", (("travel", 1),)) and name.startswith("adistill-bank-")
    changed = [
        run_name(job, "other-fp", (("travel", 1),)),
        run_name(job, "fp", (("travel", 2),)),
        run_name(job, "fp", ()),
        run_name(TenantJob("bank", job.data, fast_config("distill", epochs=4)), "fp", (("travel", 1),)),
        run_name(TenantJob("bank", str(tenants_dir / "new.parquet"), job.config), "fp", (("travel", 1),)),
    ]
    assert len({name, *changed}) == 6


def test_tenant_recipe_precedence() -> None:
    from adistill.manifest import TenantSpec
    from adistill.onboard_plan import tenant_config

    base = fast_config("distill")
    assert tenant_config(TenantSpec("a", "/d"), base, None) == base
    assert tenant_config(TenantSpec("a", "/d"), base, "adapter").method == "adapter"  # --method
    own = TenantSpec("a", "/d", shots=3, method="fusion")
    assert (tenant_config(own, base, "adapter").method, tenant_config(own, base, "adapter").shots) == ("fusion", 3)
    with_config = TenantSpec("a", "/d", config=fast_config("finetune", epochs=7))
    assert tenant_config(with_config, base, None).stage1.epochs == 7


@pytest.mark.parametrize(
    "changes",
    [
        {"workers": 0},
        {"workers": True},
        {"max_failures": -1},
        {"resources_per_worker": {"CPU": 0}},
        {"resources_per_worker": {"CPU": "1"}},
        {"resources_per_worker": {"CPU": True}},
        {"resources_per_worker": [1]},
    ],
)
def test_bad_options_are_refused(changes: dict[str, Any]) -> None:
    from adistill.distributed.onboard import OnboardOptions
    from adistill.errors import ConfigError

    with pytest.raises(ConfigError):
        OnboardOptions(**changes)


def test_summary_table() -> None:
    from adistill.onboard_plan import TenantOutcome, summary_table

    table = summary_table(
        [
            TenantOutcome("bank", "distill", "published", 2, 0.9123, 12.3, teachers=[("a", 1)]),
            TenantOutcome("home", "adapter", "skipped", 1, 0.5),
            TenantOutcome("broken", "distill", "failed", error="DataError: no labels"),
        ]
    )
    lines = table.splitlines()
    assert lines[0].split() == ["tenant", "method", "status", "version", "accuracy", "time", "teachers", "error"]
    assert lines[1].split() == ["bank", "distill", "published", "2", "0.912", "12.3s", "1"]
    assert "DataError: no labels" in lines[3]
    assert lines[-1] == "1 published, 1 skipped, 1 failed"
