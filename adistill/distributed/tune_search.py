"""Pieces of `adistill tune` that speak Ray Tune's language: the search space, progress callbacks, trial outcomes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from adistill.distributed.common import short_error
from adistill.distributed.tune_trials import METRIC, plain
from adistill.tune_space import NULLABLE, SearchSpace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneEvent:
    """A progress line: status is stage1/started/epoch/finished/stopped/failed."""

    status: str
    trial_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]  # {dotted path: value}
    status: str  # TERMINATED, ERROR
    val_accuracy: float | None
    epochs_run: int
    stopped_early: bool
    per_tenant: dict[str, float] = field(default_factory=dict)
    test_accuracy: float | None = None
    error: str | None = None
    unlabeled_examples: dict[str, int] = field(default_factory=dict)  # per tenant, when its stage 2 used them

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


EventSink = Callable[[TuneEvent], None]


def param_space(space: SearchSpace) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for p in space.params:
        section, key = p.path.split(".")
        low, high = float(p.low or 0.0), float(p.high or 0.0)
        if p.distribution == "loguniform":
            domain = tune.loguniform(low, high)
        elif p.distribution == "uniform":
            domain = tune.uniform(low, high)
        elif p.distribution == "int":
            domain = tune.randint(int(low), int(high) + 1)
        else:
            domain = tune.choice(list(p.values))
        nested.setdefault(section, {})[key] = domain
    return nested


def trial_values(config: Mapping[str, Any], space: SearchSpace) -> dict[str, Any]:
    """A trial's nested config -> {dotted path: value} for the searched settings."""
    out = {}
    for path in space.paths:
        section, key = path.split(".")
        value = (config.get(section) or {}).get(key)
        if value is not None or path in NULLABLE:
            out[path] = plain(value)
    return out


def trial_outcome(result: Any, space: SearchSpace, max_t: int) -> TrialOutcome:
    metrics = result.metrics or {}
    error = None if result.error is None else short_error(result.error)
    epochs = int(metrics.get("training_iteration", 0) or 0)
    value = metrics.get(METRIC)
    params = trial_values(result.config or {}, space)
    planned = int(params.get("stage2.epochs") or max_t)
    return TrialOutcome(
        trial_id=str(metrics.get("trial_id") or Path(result.path).name),
        params=params,
        status="ERROR" if error else "TERMINATED",
        val_accuracy=None if value is None else float(value),
        epochs_run=epochs,
        stopped_early=error is None and 0 < epochs < planned,
        per_tenant={k: float(v) for k, v in (metrics.get("per_tenant") or {}).items()},
        test_accuracy=None if metrics.get("test_accuracy") is None else float(metrics["test_accuracy"]),
        error=error,
        unlabeled_examples={k: int(v) for k, v in (metrics.get("unlabeled_examples") or {}).items()},
    )


class Events(tune.Callback):
    """Forwards trial progress to the caller's event sink (the CLI prints it)."""

    def __init__(self, emit: EventSink, max_t: int) -> None:
        self.emit, self.max_t = emit, max_t

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.emit(TuneEvent("started", trial.trial_id, {"config": trial.config}))

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        detail = {k: result.get(k) for k in ("training_iteration", METRIC, "epoch_val_accuracy", "loss")}
        self.emit(TuneEvent("epoch", trial.trial_id, detail))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        done = int(last.get("training_iteration", 0) or 0)
        planned = int((trial.config.get("stage2") or {}).get("epochs") or self.max_t)
        status = "finished" if done >= planned else "stopped"
        if status == "stopped":
            release(last.get("placement_group"))
        self.emit(TuneEvent(status, trial.trial_id, {"epochs": done, METRIC: last.get(METRIC)}))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        release((trial.last_result or {}).get("placement_group"))
        self.emit(TuneEvent("failed", trial.trial_id, {"error": str(getattr(trial, "error_file", ""))}))


def release(group_hex: str | None) -> None:
    """Remove the worker placement group of a trial that Tune stopped early.

    Stopping a trial kills its driver, and with it the Train controller; Train's own clean-up of the workers'
    placement group (a detached actor that asks the state API whether the controller died) cannot find its
    cluster when several Ray instances run on one host, and the group's CPUs would stay reserved, starving the
    next trials. Removing it here, from the Tune driver, is safe: the run it belonged to is over."""
    if not group_hex:
        return
    from ray.util.placement_group import PlacementGroup, placement_group_table

    try:
        state = placement_group_table().get(group_hex, {}).get("state")
        if state not in (None, "REMOVED"):
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_hex)))
        log.info("placement group %s of a stopped trial: was %s, released", group_hex[:12], state)
    except Exception as exc:  # best effort: the group may be gone already
        log.warning("could not release placement group %s: %s", group_hex, exc)
