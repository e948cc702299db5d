"""The README's "Your own data in five commands" and its Python example, run as written (issue 14): a CSV whose
columns are `query,category`, the tiny encoder in place of the default backbone (`--backbone`), fewer epochs. The
serve and curl steps run against the in-process Ray Serve app (marked slow); the rest runs everywhere."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, run_cli, write_intents_csv
from serving_helpers import serve_app

from adistill.cli import build_parser
from adistill.store.registry import Registry

LABELS = ["balance", "pay_bill", "weather", "alarm"]


def readme_block(language: str) -> str:
    """The first `language` code block of the README's "Your own data in five commands" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own data in five commands") :]
    section = section[: section.index("\n## ", 1)]
    start = section.index(f"```{language}\n") + len(f"```{language}\n")
    return section[start : section.index("```", start)]


def five_commands() -> list[list[str]]:
    commands = [shlex.split(line, comments=True) for line in readme_block("bash").splitlines() if line.strip()]
    assert len(commands) == 5 and [c[0] for c in commands] == ["head", "adistill", "adistill", "adistill", "curl"]
    return commands


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's folder holding `my-intents.csv` (columns query,category), as the current directory."""
    write_intents_csv(tmp_path / "my-intents.csv", LABELS, ("query", "category"), per_label=15)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def first_three(capsys: pytest.CaptureFixture[str], tiny_path: Path, folder: Path) -> list[list[str]]:
    """Steps 1-3 as written (plus the tiny backbone and 5 epochs): look at the columns, train, publish."""
    head, train, publish, serve, curl = five_commands()
    looked = subprocess.run(head, cwd=folder, capture_output=True, text=True, check=True)
    assert looked.stdout.splitlines()[0] == "query,category"
    code, out, err = run_cli(capsys, *train[1:], "--backbone", str(tiny_path), "--epochs", "5")
    assert code == 0, err
    assert json.loads(out)["tenant_id"] == "my-bank"
    code, out, err = run_cli(capsys, *publish[1:])
    assert code == 0 and out.startswith("published my-bank version 1"), err
    return [serve, curl]


def test_your_own_data_train_publish_predict(
    capsys: pytest.CaptureFixture[str], tiny_path: Path, user_folder: Path
) -> None:
    serve, curl = first_three(capsys, tiny_path, user_folder)
    registry = Registry("registry")
    assert registry.meta("my-bank")["data"]["columns"] == {"text": "query", "label": "category"}
    assert sorted(registry.meta("my-bank")["labels"]) == sorted(LABELS)
    args = build_parser().parse_args(serve[1:])
    assert args.func.__name__ == "cmd_serve" and args.registry == "./registry"
    texts = json.loads(curl[curl.index("-d") + 1])["texts"]
    code, out, _ = run_cli(
        capsys, "predict", "--registry", "./registry", "--tenant", "my-bank", *texts, "--backbone", str(tiny_path)
    )
    assert code == 0 and [json.loads(line)["labels"][0]["label"] in LABELS for line in out.splitlines()] == [True] * 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None, reason="needs curl and bash")
def test_your_own_data_in_five_commands(
    capsys: pytest.CaptureFixture[str], ray_local: Any, tiny_path: Path, user_folder: Path
) -> None:
    from adistill.distributed.serve import ServeConfig

    serve, _ = first_three(capsys, tiny_path, user_folder)
    # Step 4 on the test session's Ray: the app `adistill serve` builds from the README's flags (its registry made
    # absolute as the command does), on the tiny encoder with small replicas.
    args = build_parser().parse_args(serve[1:])
    config: dict[str, Any] = {"registry": str((user_folder / args.registry).resolve())}
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    if "auth" in fields and getattr(args, "auth", None) is not None:
        config["auth"] = args.auth == "on"
    config.update(backbone=str(tiny_path), ray_actor_options={"num_cpus": 0.5})
    with serve_app(config, "adistill-readme") as url:
        raw = [line for line in readme_block("bash").splitlines() if line.strip()][-1]
        line = raw.replace("http://127.0.0.1:8000", url)
        done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120)  # step 5, as pasted
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer.get("tenant_id") == "my-bank" and answer["adapter_version"] == 1, answer
        assert [p["labels"][0]["label"] in LABELS for p in answer["predictions"]] == [True] * 2
        assert all(len(p["labels"]) == 2 for p in answer["predictions"])


def test_the_python_example_runs(tiny_path: Path, user_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = readme_block("python")
    assert "load_backbone()" in code
    exec(compile(code.replace("load_backbone()", f"load_backbone({str(tiny_path)!r})"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().split(" ", 1)
    assert printed[0] == "1" and "'labels'" in printed[1]
    assert Registry("registry").meta("my-bank")["labels"] == sorted(LABELS)
