from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from adistill.config import AdapterConfig, Config, DistillConfig, RecipeConfig, TrainConfig, at_least, from_dict
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
    assert cfg.method == "fusion" and cfg.stage2.lr == 0.001 and cfg.stage2.epochs == 10
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


# ---- One validator (adistill.config.Config) for every configuration class -------------------------------------


@dataclass(frozen=True)
class Leaf(Config):
    size: int = 1
    ratios: dict[str, float] = field(default_factory=dict)
    names: tuple[str, ...] = ()

    def check(self) -> None:
        at_least(self, 1, "size")


@dataclass(frozen=True)
class Branch(Config):
    leaf: Leaf = field(default_factory=lambda: Leaf(size=2, names=("a",)))
    mode: Literal["fast", "safe"] = "fast"


@dataclass(frozen=True)
class Root(Config):
    name: str
    branch: Branch = field(default_factory=Branch)
    extra: Leaf | None = None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RecipeConfig(shots=True), "shots must be an integer or null, got True"),
        (lambda: RecipeConfig(seed=False), "seed must be an integer, got False"),
        (lambda: RecipeConfig(max_length=True), "max_length must be an integer"),
        (lambda: TrainConfig(epochs=True), "epochs must be an integer, got True"),
        (lambda: TrainConfig(batch_size=True), "batch_size must be an integer"),
        (lambda: TrainConfig(patience=True), "patience must be an integer or null"),
        (lambda: TrainConfig(lr=True), "lr must be a number, got True"),
        (lambda: TrainConfig(weight_decay=False), "weight_decay must be a number, got False"),
        (lambda: DistillConfig(alpha=True), "alpha must be a number"),
        (lambda: AdapterConfig(reduction_factor=True), "reduction_factor must be an integer"),
        (
            lambda: RecipeConfig.from_dict({"stage1": {"epochs": True}}),
            r"^stage1\.epochs must be an integer, got True$",
        ),
        (lambda: RecipeConfig.from_dict({"stage2": {"lr": True}}), r"^stage2\.lr must be a number, got True$"),
        (lambda: RecipeConfig.from_dict({"shots": True}), "^shots must be an integer or null, got True$"),
    ],
)
def test_booleans_are_never_numbers(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TrainConfig(epochs=2.0), "epochs must be an integer, got 2.0"),
        (lambda: RecipeConfig.from_dict({"shots": 5.0}), "shots must be an integer or null, got 5.0"),
        (lambda: RecipeConfig.from_dict({"adapter": {"reduction_factor": 8.0}}), r"adapter\.reduction_factor must be"),
        (lambda: DistillConfig(detach_teacher=1), "detach_teacher must be true or false, got 1"),  # type: ignore[arg-type]
        (lambda: TrainConfig(lr=float("nan")), "lr must be a finite number, got nan"),
        (lambda: DistillConfig(temperature=float("inf")), "temperature must be a finite number"),
        (lambda: RecipeConfig(pooling="max"), r"pooling must be one of \['mean', 'cls'\], got 'max'"),  # type: ignore[arg-type]
        (lambda: RecipeConfig(adapter={"kind": "houlsby"}), "adapter must be an AdapterConfig"),  # type: ignore[arg-type]
        (lambda: RecipeConfig(max_length=3), r"max_length must be in \[4, 512\], got 3"),
    ],
)
def test_every_field_is_checked_against_its_annotation(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_yaml_text_where_a_number_belongs_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("stage2: {lr: 1e-4}\n")  # YAML 1.1: a string
    with pytest.raises(ConfigError, match=r"stage2\.lr must be a number, got '1e-4'.*write 1\.0e-4"):
        RecipeConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sede": 1}, r"unknown key\(s\) \['sede'\] in RecipeConfig; expected some of \['adapter', "),
        ({"stage1": {"epoch": 3}}, r"unknown key\(s\) \['epoch'\] in stage1; expected some of \['batch_size', "),
        ({"adapter": {"kind": "seq_bn", "size": 2}}, r"unknown key\(s\) \['size'\] in adapter"),
        ({"stage1": 3}, r"stage1 must be a TrainConfig, got 3"),
    ],
)
def test_unknown_keys_are_errors_at_every_level(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RecipeConfig.from_dict(data)


def test_partial_nested_mappings_override_nested_defaults_at_any_depth() -> None:
    root = Root.from_dict({"name": "r", "branch": {"leaf": {"ratios": {"cpu": 1}}}})
    assert root.branch.leaf == Leaf(size=2, ratios={"cpu": 1}, names=("a",))  # the field's own default, kept
    assert Root.from_dict({"name": "r", "extra": {"names": ["x", "y"]}}).extra == Leaf(names=("x", "y"))
    recipe = RecipeConfig.from_dict({"stage2": {"epochs": 3}, "finetune": {"lr": 1e-4}})
    assert (recipe.stage2.epochs, recipe.stage2.lr, recipe.finetune.patience) == (3, 5e-4, 5)
    assert Root.from_dict(root.to_dict()) == root and RecipeConfig.from_dict(recipe.to_dict()) == recipe
    assert from_dict(Root, {"name": "r"}) == Root("r")  # the module-level function delegates


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, r"missing required key\(s\) \['name'\] in Root"),
        ({"name": "r", "branch": {"leaf": {"size": 0}}}, r"^branch\.leaf\.size must be >= 1, got 0$"),
        ({"name": "r", "branch": {"mode": "slow"}}, r"^branch\.mode must be one of \['fast', 'safe'\], got 'slow'$"),
        ({"name": "r", "extra": {"ratios": {"cpu": True}}}, r"^extra\.ratios\['cpu'\] must be a number, got True$"),
        ({"name": "r", "extra": {"ratios": {1: 1.0}}}, r"^extra\.ratios key 1 must be a string, got 1$"),
        ({"name": "r", "extra": {"names": ["a", 2]}}, r"^extra\.names\[1\] must be a string, got 2$"),
        ({"name": None}, "^name must be a string, got None$"),
        ("name: r", "Root: expected a mapping"),
    ],
)
def test_errors_name_the_field_by_its_dotted_path(data: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Root.from_dict(data)


def test_replace_validates_and_label_prefixes_messages() -> None:
    assert RecipeConfig().replace(seed=3).seed == 3
    with pytest.raises(ConfigError, match="seed must be an integer, got True"):
        RecipeConfig().replace(seed=True)

    @dataclass(frozen=True)
    class Labelled(Config):
        label = "pool config"
        none_means_default = ("sizes",)
        sizes: list[int] = field(default_factory=lambda: [1])

    with pytest.raises(ConfigError, match=r"^pool config: sizes\[0\] must be an integer, got True$"):
        Labelled.from_dict({"sizes": [True]})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['size'\] in pool config"):
        Labelled.from_dict({"size": 1})
    assert Labelled.from_dict({"sizes": None}) == Labelled()  # None means the default, where a class says so
    with pytest.raises(ConfigError, match="must be a list, got None"):
        Root.from_dict({"name": "r", "extra": {"names": None}})  # ...and nowhere else


def test_selection_config_uses_the_same_rules() -> None:
    from adistill.selection import SelectionConfig

    assert SelectionConfig.from_dict({"strategy": "probe", "k": 2}) == SelectionConfig("probe", k=2)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"k": True}, "k must be an integer, got True"),
        ({"k": 2.0}, "k must be an integer, got 2.0"),
        ({"k": 0}, "teacher selection k must be >= 1, got 0"),
        ({"seed": False}, "seed must be an integer, got False"),
        ({"max_all": 0}, "max_all must be >= 1"),
        ({"probe_pool": 0}, "probe_pool must be >= 1"),
        ({"strategy": "best"}, r"strategy must be one of \['all', 'random', 'similar', 'probe'\]"),
        ({"kk": 1}, r"unknown key\(s\) \['kk'\] in SelectionConfig"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            SelectionConfig.from_dict(data)
    with pytest.raises(ConfigError, match="k must be an integer, got True"):
        SelectionConfig(k=True)
