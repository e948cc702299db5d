from pathlib import Path

import pytest

from adistill.config import AdapterConfig, DistillConfig, RecipeConfig, TrainConfig
from adistill.errors import ConfigError, InvalidTenantId
from adistill.tenant_id import validate_tenant_id


def test_defaults_match_the_method_description() -> None:
    cfg = RecipeConfig()
    assert cfg.adapter == AdapterConfig("seq_bn", 16) and cfg.adapter.bottleneck(384) == 24
    assert cfg.distill == DistillConfig(2.0, 0.5, 1.0, 0.0, True)
    assert AdapterConfig("houlsby").sites == ("attn", "ffn")


def test_yaml_partial_override_keeps_other_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("method: fusion\nstage2: {lr: 0.001}\ndistill: {temperature: 4}\n")
    cfg = RecipeConfig.from_yaml(path)
    assert cfg.method == "fusion" and cfg.stage2.lr == 0.001 and cfg.stage2.epochs == 40
    assert cfg.distill.temperature == 4 and cfg.distill.alpha == 0.5
    assert RecipeConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("methd: distill\n", "unknown key"),
        ("distill: {tau: 2}\n", "unknown key.*distill"),
        ("distill: {alpha: 2}\n", "alpha must be in"),
        ("adapter: {kind: lora}\n", "adapter.kind"),
        ("stage1: {epochs: 0}\n", "epochs must be"),
        ("- a\n- b\n", "expected a mapping"),
        ("key: [unclosed\n", "cannot read"),
    ],
)
def test_bad_config_files_fail_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        RecipeConfig.from_yaml(path)


def test_train_config_checks_values() -> None:
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "Upper", "x" * 64, "-lead", "a b", None, 3])
def test_hostile_tenant_ids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidTenantId):
        validate_tenant_id(bad)


def test_good_tenant_ids_pass() -> None:
    for ok in ("a", "banking", "credit-cards_2", "x" * 63):
        assert validate_tenant_id(ok) == ok
