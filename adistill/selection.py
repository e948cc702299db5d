"""Choosing a new tenant's teachers among the published tenants, with a bound `k`.

Ranking reads metadata only (no teacher weights), so it costs milliseconds per thousand candidates:

- `all`: every candidate, refused above `max_all` (stage-2 cost grows with the number of teachers);
- `random`: k candidates, seeded;
- `similar`: the k whose training data is closest to the new tenant's: cosine similarity of the mean
  bare-encoder embedding of each tenant's training queries, stored in every artifact at training time
  (`data.embedding`);
- `probe`: the `similar` shortlist (`probe_pool` × k) re-ranked by a cheap probe on the new tenant's training
  data: leave-one-out nearest-centroid accuracy on the candidate adapter's pooled features. Only the
  shortlist's weights are loaded.

The choice and its scores are recorded in the new tenant's lineage (`teacher_selection` in its metadata).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from adistill.backbone import Backbone
from adistill.config import TEACHER_STRATEGIES, AdapterConfig, Config, RecipeConfig, at_least, require
from adistill.errors import AdistillError, ConfigError
from adistill.model import Encoded
from adistill.store.artifact import Artifact, Teacher

if TYPE_CHECKING:
    from adistill.data import TenantData
    from adistill.store.registry import Registry

log = logging.getLogger(__name__)

Strategy = Literal["all", "random", "similar", "probe"]
STRATEGIES: tuple[str, ...] = TEACHER_STRATEGIES


@dataclass(frozen=True)
class SelectionConfig(Config):
    """How teachers are chosen: `strategy`, `k` of them (`all`: up to `max_all`), `probe` ranks `probe_pool` x k."""

    strategy: Strategy = "similar"
    k: int = 10
    max_all: int = 32
    probe_pool: int = 3
    seed: int = 0

    def check(self) -> None:
        require(self.k >= 1, f"teacher selection k must be >= 1, got {self.k!r}")
        at_least(self, 1, "max_all", "probe_pool")

    @property
    def uses_data(self) -> bool:
        """Whether ranking needs the new tenant's training queries (`similar`, `probe`)."""
        return self.strategy in ("similar", "probe")


@dataclass(frozen=True)
class Candidate:
    """A published tenant that could teach: its id, version and metadata (adapter_config.json)."""

    tenant_id: str
    version: int | None
    meta: dict[str, Any]

    @property
    def adapter(self) -> dict[str, Any]:
        return dict(self.meta.get("adapter") or {})

    @property
    def embedding(self) -> torch.Tensor | None:
        values = (self.meta.get("data") or {}).get("embedding")
        return None if not values else torch.tensor(values, dtype=torch.float32)


@dataclass
class Selection:
    strategy: str
    k: int
    chosen: list[Candidate]
    scores: dict[str, float] = field(default_factory=dict)
    considered: int = 0

    def lineage(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "k": self.k,
            "considered": self.considered,
            "chosen": [c.tenant_id for c in self.chosen],
            "scores": {t: round(s, 6) for t, s in self.scores.items()},
        }

    @property
    def pairs(self) -> tuple[tuple[str, int | None], ...]:
        """The chosen (tenant id, version) pairs; a version is None only for an unpublished artifact folder."""
        return tuple((c.tenant_id, c.version) for c in self.chosen)


# A probe scores candidates on the new tenant's data: {tenant_id: score}, higher is better.
Probe = Callable[[list[Candidate]], dict[str, float]]


def select_teachers(
    candidates: list[Candidate],
    cfg: SelectionConfig,
    tenant_id: str | None = None,
    embedding: torch.Tensor | None = None,
    probe: Probe | None = None,
) -> Selection:
    """Pick at most `cfg.k` distinct candidates (never `tenant_id` itself) by `cfg.strategy`."""
    pool = sorted({c.tenant_id: c for c in candidates if c.tenant_id != tenant_id}.values(), key=lambda c: c.tenant_id)
    if cfg.strategy == "all":
        if len(pool) > cfg.max_all:
            raise ConfigError(
                f"teacher selection 'all' would use {len(pool)} teachers, above the cap of {cfg.max_all}; "
                "use 'similar', 'probe' or 'random' with a bound k, or raise max_all"
            )
        return Selection("all", len(pool), pool, considered=len(pool))
    if cfg.strategy == "random":
        chosen = random.Random(cfg.seed).sample(pool, min(cfg.k, len(pool)))
        return Selection("random", cfg.k, chosen, considered=len(pool))
    if embedding is None:
        raise ConfigError(f"teacher selection {cfg.strategy!r} needs the new tenant's data embedding")
    similarity = rank_by_similarity(pool, embedding)
    if cfg.strategy == "similar":
        chosen = [c for c, _ in similarity[: cfg.k]]
        return Selection("similar", cfg.k, chosen, {c.tenant_id: s for c, s in similarity[: cfg.k]}, len(pool))
    if probe is None:
        raise ConfigError("teacher selection 'probe' needs a probe function")
    shortlist = [c for c, _ in similarity[: cfg.k * cfg.probe_pool]]
    scores = probe(shortlist)
    ranked = sorted((c for c in shortlist if c.tenant_id in scores), key=lambda c: (-scores[c.tenant_id], c.tenant_id))
    chosen = ranked[: cfg.k]
    return Selection("probe", cfg.k, chosen, {c.tenant_id: scores[c.tenant_id] for c in chosen}, len(pool))


class TeacherPool(Protocol):
    """Where candidates come from: the registry (onboard, tune) or artifact folders (`train --teachers`)."""

    def candidates(self) -> list[Candidate]: ...

    def load(self, candidate: Candidate) -> Teacher: ...


class RegistryPool:
    """Published (tenant id, version) pairs; ranking reads their metadata only, weights load on demand. A candidate
    whose metadata is unreadable is skipped with a warning."""

    def __init__(self, registry: Registry, published: Iterable[tuple[str, int]], backbone: Backbone) -> None:
        self.registry, self.published, self.backbone = registry, list(published), backbone

    def candidates(self) -> list[Candidate]:
        out = []
        for tenant, version in self.published:
            try:
                out.append(Candidate(tenant, version, self.registry.meta(tenant, version)))
            except AdistillError as exc:
                log.warning("teacher candidate %s v%s skipped: %s", tenant, version, exc)
        return out

    def load(self, candidate: Candidate) -> Teacher:
        return self.registry.get(candidate.tenant_id, self.backbone, candidate.version).as_teacher()


class ArtifactPool:
    """Artifacts already loaded (e.g. folders given to `adistill train --teachers`), one per tenant."""

    def __init__(self, artifacts: Iterable[Artifact]) -> None:
        self.by_id: dict[str, Artifact] = {}
        for artifact in artifacts:
            if artifact.tenant_id in self.by_id:
                raise ConfigError(f"teachers list tenant {artifact.tenant_id!r} twice; give one version per tenant")
            self.by_id[artifact.tenant_id] = artifact

    def candidates(self) -> list[Candidate]:
        return [Candidate(a.tenant_id, a.version, a.meta) for a in self.by_id.values()]

    def load(self, candidate: Candidate) -> Teacher:
        return self.by_id[candidate.tenant_id].as_teacher()


def adapter_shape(adapter: AdapterConfig | dict[str, Any]) -> str:
    """An adapter shape as people read it: `seq_bn, reduction 16`."""
    if isinstance(adapter, AdapterConfig):
        return str(adapter)
    return f"{adapter.get('kind')}, reduction {adapter.get('reduction_factor')}"


def compatible(candidates: list[Candidate], recipe: RecipeConfig) -> list[Candidate]:
    """The candidates whose adapter shape is the recipe's (stage 2 fuses adapters of one shape). Others are dropped
    with a warning; when there were candidates and none fits, the recipe is refused in one line naming both shapes."""
    want = (recipe.adapter.kind, recipe.adapter.reduction_factor)
    fits = [c for c in candidates if (c.adapter.get("kind"), c.adapter.get("reduction_factor")) == want]
    if candidates and not fits:
        shapes = sorted({adapter_shape(c.adapter) for c in candidates})
        raise ConfigError(
            f"the recipe's adapter ({adapter_shape(recipe.adapter)}) differs from the teachers' "
            f"({'; '.join(shapes)}): stage 2 needs teachers of the same shape; set adapter in the recipe to match"
        )
    if len(fits) < len(candidates):
        dropped = [c.tenant_id for c in candidates if c not in fits]
        log.warning("%d teacher candidate(s) of another adapter shape skipped: %s", len(dropped), dropped)
    return fits


def choose_teachers(
    pool: TeacherPool,
    tenant_id: str,
    backbone: Backbone,
    recipe: RecipeConfig,
    cfg: SelectionConfig,
    data: TenantData | None = None,
) -> Selection:
    """The one entry point (`train`, `onboard`, `tune`): at most `cfg.k` teachers of the recipe's adapter shape for
    `tenant_id`, chosen by `cfg.strategy`. `data` (the new tenant's) is needed by `similar` and `probe` only; the
    data embedding and the probe (which loads the shortlist's weights) are computed only when needed."""
    candidates = compatible(pool.candidates(), recipe)
    embedding, probe = None, None
    if cfg.uses_data:
        if data is None or not data.train.texts:
            raise ConfigError(f"teacher selection {cfg.strategy!r} needs the new tenant's training queries")
        embedding = torch.tensor(data_embedding(backbone, data.train.texts, recipe.max_length))
        if cfg.strategy == "probe":
            probe = make_probe(
                backbone, data.train.texts, data.train.labels, lambda c: pool.load(c).adapters, recipe.max_length
            )
    return select_teachers(candidates, cfg, tenant_id, embedding, probe)


def rank_by_similarity(pool: list[Candidate], embedding: torch.Tensor) -> list[tuple[Candidate, float]]:
    """Candidates with an embedding, most similar first (cosine); those without one are skipped, with a warning."""
    usable = [c for c in pool if c.embedding is not None and c.embedding.shape == embedding.shape]
    skipped = len(pool) - len(usable)
    if skipped:
        log.warning("%d candidate(s) have no comparable data embedding and were not ranked", skipped)
    if not usable:
        return []
    matrix = torch.nn.functional.normalize(torch.stack([c.embedding for c in usable]), dim=-1)  # type: ignore[misc]
    sims = (matrix @ torch.nn.functional.normalize(embedding, dim=0)).tolist()
    return sorted(zip(usable, sims), key=lambda cs: (-cs[1], cs[0].tenant_id))


@torch.no_grad()
def data_embedding(backbone: Backbone, texts: list[str], max_length: int = 32, batch_size: int = 128) -> list[float]:
    """Mean bare-encoder embedding (masked mean pooling) of a tenant's training queries, L2-normalised."""
    from adistill.encoder import encode, pool

    encoded = Encoded(backbone, texts, [0] * len(texts), max_length)
    total = torch.zeros(backbone.hidden_size)
    for batch in encoded.batches(batch_size):
        hidden = encode(backbone.model, batch.input_ids, batch.attention_mask)
        total += pool(hidden, batch.attention_mask, "mean").float().sum(0).cpu()
    return [round(x, 5) for x in torch.nn.functional.normalize(total, dim=0).tolist()]


@torch.no_grad()
def centroid_probe_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out nearest-centroid accuracy (cosine) of pooled features: how well they separate the labels."""
    feats = torch.nn.functional.normalize(features.float(), dim=-1)
    classes = labels.unique()
    sums = torch.stack([feats[labels == c].sum(0) for c in classes])  # (C, H)
    counts = torch.stack([(labels == c).sum() for c in classes]).float()  # (C,)
    own = (labels.unsqueeze(1) == classes.unsqueeze(0)).float()  # (N, C)
    centroids = (sums.unsqueeze(0) - own.unsqueeze(-1) * feats.unsqueeze(1)) / (counts - own).clamp(min=1).unsqueeze(-1)
    scores = torch.einsum("nh,nch->nc", feats, torch.nn.functional.normalize(centroids, dim=-1))
    scores = scores.masked_fill((counts - own) == 0, float("-inf"))
    return float((classes[scores.argmax(-1)] == labels).float().mean())


def make_probe(
    backbone: Backbone,
    texts: list[str],
    labels: list[str],
    load: Callable[[Candidate], Any],
    max_length: int = 32,
) -> Probe:
    """A `Probe` scoring each candidate's adapter by `centroid_probe_accuracy` on the new tenant's training data.

    `load(candidate)` returns the candidate's `AdapterSet`; a candidate that fails to load (corrupt, foreign)
    is skipped with a warning and never chosen.
    """
    from adistill.encoder import encode, pool

    index = {y: i for i, y in enumerate(sorted(set(labels)))}
    encoded = Encoded(backbone, texts, [index[y] for y in labels], max_length)
    gold = torch.tensor(encoded.labels)

    @torch.no_grad()
    def probe(candidates: list[Candidate]) -> dict[str, float]:
        scores: dict[str, float] = {}
        for cand in candidates:
            try:
                adapters = load(cand)
            except Exception as exc:  # a bad candidate must not stop selection; it is reported and skipped
                log.warning("teacher candidate %s v%s skipped: %s", cand.tenant_id, cand.version, exc)
                continue
            feats = torch.zeros(len(encoded), backbone.hidden_size)
            order = list(range(len(encoded)))
            for start in range(0, len(order), 128):
                idx = order[start : start + 128]
                batch = encoded.batch(idx)
                hidden = encode(backbone.model, batch.input_ids, batch.attention_mask, adapters)
                feats[idx] = pool(hidden, batch.attention_mask, "mean").float().cpu()
            scores[cand.tenant_id] = centroid_probe_accuracy(feats, gold)
        return scores

    return probe
