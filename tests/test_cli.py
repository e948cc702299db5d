"""The CLI end to end, in-process, on the tiny encoder."""

import json
from pathlib import Path

import pytest
from helpers import run_cli


def test_train_evaluate_predict(
    capsys: pytest.CaptureFixture[str], tiny_path: Path, tenants_dir: Path, tmp_path: Path
) -> None:
    bb = ["--backbone", str(tiny_path)]
    for name in ("bank", "home"):
        code, out, _ = run_cli(
            capsys,
            "train",
            "--data",
            str(tenants_dir / f"{name}.parquet"),
            "--tenant",
            name,
            "--out",
            str(tmp_path / name),
            "--method",
            "adapter",
            "--epochs",
            "2",
            *bb,
        )
        assert code == 0 and json.loads(out)["tenant_id"] == name
    code, out, err = run_cli(
        capsys,
        "train",
        "--data",
        str(tenants_dir / "new.parquet"),
        "--tenant",
        "new",
        "--out",
        str(tmp_path / "new"),
        "--method",
        "distill",
        "--shots",
        "5",
        "--epochs",
        "2",
        "--teachers",
        str(tmp_path / "bank"),
        str(tmp_path / "home"),
        "--teacher-select",
        "similar",
        "--teacher-k",
        "1",
        *bb,
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    selection = meta["teacher_selection"]
    assert selection["strategy"] == "similar" and selection["considered"] == 2 and len(selection["chosen"]) == 1
    assert [t["tenant_id"] for t in meta["teachers"]] == selection["chosen"]
    assert meta["data"]["train_examples"] == 20
    code, out, _ = run_cli(
        capsys,
        "evaluate",
        "--artifact",
        str(tmp_path / "new"),
        "--data",
        str(tenants_dir / "new.parquet"),
        "--json",
        str(tmp_path / "e.json"),
        *bb,
    )
    assert code == 0 and json.loads((tmp_path / "e.json").read_text())["split"] == "test"
    code, out, _ = run_cli(
        capsys, "predict", "--artifact", str(tmp_path / "new"), "--top-k", "2", "pay my bill", "book a flight", *bb
    )
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [x["text"] for x in lines] == ["pay my bill", "book a flight"]
    assert all(len(x["labels"]) == 2 and "out_of_scope" in x for x in lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "../x"], "invalid tenant id"),
        (["--data", "/nonexistent.parquet"], "no such file"),
        (["--teachers", "/nonexistent-dir"], "no such artifact folder"),
        (["--config", "/nonexistent.yaml"], "cannot read config"),
    ],
)
def test_bad_invocations_exit_nonzero_with_one_line_and_write_nothing(
    capsys: pytest.CaptureFixture[str],
    tiny_path: Path,
    tenants_dir: Path,
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    base = {
        "--data": str(tenants_dir / "bank.parquet"),
        "--tenant": "ok",
        "--out": str(tmp_path / "out"),
        "--backbone": str(tiny_path),
        "--epochs": "1",
    }
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    argv = ["train", *[x for kv in base.items() for x in kv]]
    code, _, err = run_cli(capsys, *argv)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_backbone_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "predict", "--artifact", str(tmp_path), "--backbone", "bert-base-uncased", "x")
    assert code == 1 and "not a Hugging Face model folder" in err
