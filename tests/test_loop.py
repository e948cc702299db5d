"""recipes/loop.py: which weights a stage keeps (`TrainConfig.keep`) and when it stops."""

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from adistill.config import RecipeConfig, TrainConfig
from adistill.errors import ConfigError
from adistill.model import Batch
from adistill.recipes.loop import fit
from adistill.tune_space import space_from_dict


class _Rows:
    """Eight rows of a noisy linear target, one batch of four at a time."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(8, 3, generator=g), torch.randn(8, generator=g)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        order = torch.randperm(8, generator=generator)
        for i in range(0, 8, batch_size):
            rows = order[i : i + batch_size]
            yield Batch(self.x[rows], torch.ones(len(rows), 1), self.y[rows], rows)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.Linear(3, 1)
        self.frozen = nn.Parameter(torch.tensor([0.1, 0.2, 0.3]), requires_grad=False)


def _run(
    keep: str, scores: list[float], patience: int | None = None, ties: str = "earlier"
) -> tuple[_Model, list[dict], object, float]:
    """Train with validation accuracies `scores` in turn; every epoch's weights are recorded as it is validated."""
    model, seen = _Model(), list[dict[str, torch.Tensor]]()
    start = model.trained.weight.detach().clone()

    def step(batch: Batch) -> torch.Tensor:
        return ((model.trained(batch.input_ids)[:, 0] + model.frozen.sum() - batch.labels) ** 2).mean()

    def validate() -> float:
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return scores[len(seen) - 1] if len(seen) <= len(scores) else -1.0  # -1: the extra call for `average`

    cfg = TrainConfig(epochs=len(scores), lr=0.05, batch_size=4, patience=patience, keep=keep, ties=ties)  # type: ignore[arg-type]
    result = fit("test", model, step, validate, _Rows(), cfg, seed=0)
    assert not torch.equal(model.trained.weight, start)
    return model, seen, result, float(model.frozen.sum())


def _equal(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_keep_best_restores_the_best_validation_epoch() -> None:
    model, seen, result, _ = _run("best", [0.5, 0.9, 0.7, 0.8])
    assert _equal(model, seen[1]) and result.best_epoch == 2 and result.best_val_accuracy == 0.9
    assert not _equal(model, seen[3])


def test_ties_later_keeps_the_latest_epoch_matching_the_best_and_counts_patience_from_it() -> None:
    scores = [0.5, 0.9, 0.7, 0.9, 0.8, 0.8, 0.95]
    model, seen, result, _ = _run("best", scores, patience=2)
    assert result.best_epoch == 2 and result.epochs_run == 4 and _equal(model, seen[1])  # the first 0.9, stopped at 4
    model, seen, result, _ = _run("best", scores, patience=2, ties="later")
    assert result.best_epoch == 4 and result.epochs_run == 6 and _equal(model, seen[3])  # the second 0.9, stopped at 6
    assert not _equal(model, seen[1])


def test_keep_last_returns_the_last_epoch_and_its_validation_accuracy() -> None:
    model, seen, result, _ = _run("last", [0.5, 0.9, 0.7, 0.8])
    assert _equal(model, seen[3]) and result.best_epoch == 4 and result.best_val_accuracy == 0.8


def test_keep_average_returns_the_mean_of_every_epoch_trained_weights_only() -> None:
    model, seen, result, frozen = _run("average", [0.5, 0.9, 0.7, 0.8])
    epochs = seen[:4]  # the fifth call validates the averaged weights
    for name in ("trained.weight", "trained.bias"):
        assert torch.equal(model.state_dict()[name], sum(s[name] for s in epochs) / 4)  # type: ignore[operator]
    assert frozen == pytest.approx(0.6) and torch.equal(model.frozen, epochs[0]["frozen"])
    assert len(seen) == 5 and result.best_val_accuracy == -1.0  # the averaged weights' own validation accuracy
    assert result.best_epoch == 4 and result.epochs_run == 4


def test_patience_stops_early_and_average_covers_the_epochs_run() -> None:
    model, seen, result, _ = _run("average", [0.5, 0.9, 0.7, 0.8, 0.95, 0.99], patience=2)
    assert result.epochs_run == 4 and len(seen) == 5  # stopped two epochs after the best (2)
    weight = sum(s["trained.weight"] for s in seen[:4]) / 4
    assert torch.equal(model.trained.weight, weight)  # type: ignore[arg-type]


def test_keep_is_validated_and_round_trips_through_a_recipe() -> None:
    with pytest.raises(ConfigError, match="keep must be one of"):
        RecipeConfig.from_dict({"stage2": {"keep": "median"}})
    with pytest.raises(ConfigError, match="ties must be one of"):
        RecipeConfig.from_dict({"stage2": {"ties": "random"}})
    assert RecipeConfig().stage2.ties == "later" and RecipeConfig().stage1.ties == "earlier"
    assert RecipeConfig.from_dict({"stage2": {"epochs": 5}}).stage2.ties == "later"  # older recipes: the default
    cfg = RecipeConfig.from_dict({"stage2": {"keep": "average", "patience": None}})
    assert cfg.stage2.keep == "average" and RecipeConfig.from_dict(cfg.to_dict()) == cfg


def test_tune_spaces_may_search_the_stopping_rule() -> None:
    space = space_from_dict({"params": {"stage2.keep": {"choice": ["best", "average"]}}})
    assert space.apply(RecipeConfig(), {"stage2.keep": "average"}).stage2.keep == "average"
    with pytest.raises(ConfigError, match=r"stage2\.keep"):
        space_from_dict({"params": {"stage2.keep": {"choice": ["best", "median"]}}})
