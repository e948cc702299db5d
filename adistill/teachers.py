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
from typing import TYPE_CHECKING, Any, Literal

import torch

from adistill.backbone import Backbone
from adistill.config import TEACHER_STRATEGIES
from adistill.errors import AdistillError, ConfigError
from adistill.model import Encoded

if TYPE_CHECKING:
    from adistill.data import TenantData
    from adistill.registry import Registry

log = logging.getLogger(__name__)

Strategy = Literal["all", "random", "similar", "probe"]
STRATEGIES: tuple[str, ...] = TEACHER_STRATEGIES


@dataclass(frozen=True)
class SelectionConfig:
    strategy: Strategy = "similar"
    k: int = 10
    max_all: int = 32
    probe_pool: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"teacher selection must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"teacher selection k must be >= 1, got {self.k!r}")
        if self.max_all < 1 or self.probe_pool < 1:
            raise ConfigError("max_all and probe_pool must be >= 1")

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


def choose(
    candidates: list[Candidate],
    cfg: SelectionConfig,
    tenant_id: str | None,
    backbone: Backbone,
    texts: list[str],
    labels: list[str],
    load: Callable[[Candidate], Any],
    max_length: int = 32,
) -> Selection:
    """`select_teachers` for a new tenant given its training data: computes its data embedding (`similar`,
    `probe`) and the probe (`probe`, which loads the shortlist's adapters with `load`) only when needed."""
    embedding, probe = None, None
    if cfg.uses_data:
        if not texts:
            raise ConfigError(f"teacher selection {cfg.strategy!r} needs the new tenant's training queries")
        embedding = torch.tensor(data_embedding(backbone, texts, max_length))
    if cfg.strategy == "probe":
        probe = make_probe(backbone, texts, labels, load, max_length)
    return select_teachers(candidates, cfg, tenant_id, embedding, probe)


def choose_from_registry(
    registry: Registry,
    published: Iterable[tuple[str, int]],
    tenant_id: str,
    backbone: Backbone,
    cfg: SelectionConfig,
    data: TenantData | None,
    max_length: int = 32,
) -> Selection:
    """`choose` among published (tenant id, version) pairs: ranking reads their metadata only; a candidate whose
    metadata is unreadable is skipped with a warning. `data` (the new tenant's) may be None for `all`/`random`."""
    candidates = []
    for tenant, version in published:
        try:
            candidates.append(Candidate(tenant, version, registry.meta(tenant, version)))
        except AdistillError as exc:
            log.warning("teacher candidate %s v%s skipped: %s", tenant, version, exc)

    def load(c: Candidate) -> Any:
        return registry.get(c.tenant_id, backbone, c.version).as_teacher().adapters

    texts, labels = (data.train.texts, data.train.labels) if data is not None else ([], [])
    return choose(candidates, cfg, tenant_id, backbone, texts, labels, load, max_length)


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
