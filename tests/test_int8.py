"""The int8 CPU backbone: the encoder's linear layers dynamically quantized, artifacts and fingerprints unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from serving_helpers import tenant_files

from adistill.backbone import Backbone, load_backbone
from adistill.cli import main
from adistill.errors import ConfigError
from adistill.inference.engine import Engine
from adistill.inference.serve_config import ServeConfig
from adistill.store.artifact import artifact_from_files, save_artifact

TEXTS = ["please pay my bill", "what is the weather", "book a flight to paris now", "play a song", "hotel room"]


def linear_kinds(backbone: Backbone) -> dict[str, int]:
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear

    kinds = {"fp32": 0, "int8": 0}
    for m in backbone.model.encoder.modules():
        if isinstance(m, QuantizedLinear):
            kinds["int8"] += 1
        elif isinstance(m, torch.nn.Linear):
            kinds["fp32"] += 1
    return kinds


def test_int8_quantizes_the_linear_layers_and_keeps_the_fingerprint(tiny: Backbone, tiny_path: Path) -> None:
    int8 = load_backbone(str(tiny_path), precision="int8")
    assert (tiny.precision, int8.precision) == ("fp32", "int8")
    layers = tiny.num_layers * 6  # q, k, v, attention output, intermediate, output
    assert linear_kinds(tiny) == {"fp32": layers, "int8": 0}
    assert linear_kinds(int8) == {"fp32": 0, "int8": layers}  # every one of them
    assert int8.fingerprint == tiny.fingerprint  # artifacts trained on the fp32 encoder still load


def test_an_fp32_artifact_answers_about_the_same_on_the_int8_backbone(tiny: Backbone, tiny_path: Path) -> None:
    int8 = load_backbone(str(tiny_path), precision="int8")
    files = tenant_files(tiny, "acme", seed=3, num_labels=5)
    models = {b.precision: artifact_from_files(files, b, "acme").model for b in (tiny, int8)}
    answers = {
        p: Engine(b).predict(TEXTS, [models[p]] * len(TEXTS), top_k=5) for p, b in (("fp32", tiny), ("int8", int8))
    }
    for a, b in zip(answers["fp32"], answers["int8"]):
        scores_a, scores_b = dict(a.labels), dict(b.labels)
        assert scores_a.keys() == scores_b.keys()
        assert max(abs(scores_a[k] - scores_b[k]) for k in scores_a) < 0.05  # quantization noise, not another model
    with torch.no_grad():
        ids = tiny.tokenize(TEXTS, 16)
        h32 = tiny.model(**ids).last_hidden_state
        h8 = int8.model(**{k: v for k, v in int8.tokenize(TEXTS, 16).items()}).last_hidden_state
    assert not torch.equal(h32, h8)  # really quantized


def test_bad_precisions_are_refused(tiny_path: Path) -> None:
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_backbone(str(tiny_path), precision="fp16")
    with pytest.raises(ConfigError, match="CPU only"):
        load_backbone(str(tiny_path), device="cuda", precision="int8")
    with pytest.raises(ConfigError, match="precision must be fp32 or int8"):
        ServeConfig.from_dict({"registry": "./r", "precision": "int4"})
    with pytest.raises(ConfigError, match="CPU only"):
        ServeConfig.from_dict({"registry": "./r", "precision": "int8", "device": "cuda"})


def test_predict_and_evaluate_take_precision(
    tiny: Backbone, tiny_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = save_artifact(tenant_files(tiny, "acme", seed=4), tmp_path / "acme")
    lines = {}
    for precision in ("fp32", "int8"):
        argv = ["predict", "--artifact", str(folder), "--backbone", str(tiny_path), "--precision", precision]
        assert main([*argv, *TEXTS]) == 0
        lines[precision] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines["int8"]) == len(TEXTS)
    for a, b in zip(lines["fp32"], lines["int8"]):
        assert abs(a["labels"][0]["score"] - b["labels"][0]["score"]) < 0.05


def test_serve_refuses_haproxy_without_the_binary_or_on_a_joined_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "registry").mkdir()
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "no-haproxy"))  # Ray's override, broken
    assert main(["serve", "--registry", str(tmp_path / "registry"), "--http-proxy", "haproxy"]) != 0
    assert "needs an HAProxy binary" in capsys.readouterr().err
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH")
    argv = ["serve", "--registry", str(tmp_path / "registry"), "--http-proxy", "haproxy", "--address", "auto"]
    assert main(argv) != 0
    assert "on a cluster set RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in capsys.readouterr().err
