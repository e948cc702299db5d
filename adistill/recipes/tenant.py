"""Train one tenant from a data URI and package it as artifact files: shared by the CLI, onboarding and demo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adistill.backbone import Backbone
from adistill.config import RecipeConfig
from adistill.data import LABEL_COLUMN, TEXT_COLUMN, TenantData, few_shot, read_tenant_data
from adistill.recipes import TrainResult, train_tenant
from adistill.recipes.loop import Progress
from adistill.recipes.train import Teacher
from adistill.selection import data_embedding
from adistill.tenant_id import validate_tenant_id


@dataclass
class TenantJob:
    """One tenant to train: its id, data URI, recipe and the data's column names (`text`/`label` by default)."""

    tenant_id: str
    data: str
    config: RecipeConfig
    text_column: str = TEXT_COLUMN
    label_column: str = LABEL_COLUMN

    def __post_init__(self) -> None:
        validate_tenant_id(self.tenant_id)

    @property
    def columns(self) -> tuple[str, str]:
        """(text column, label column)."""
        return self.text_column, self.label_column


def load_job_data(job: TenantJob, storage_options: dict[str, Any] | None = None) -> TenantData:
    data = read_tenant_data(job.data, storage_options, job.config.seed, *job.columns)
    return few_shot(data, job.config.shots, job.config.seed) if job.config.shots else data


def data_record(job: TenantJob, data: TenantData, backbone: Backbone | None = None) -> dict[str, Any]:
    """What an artifact records about the data it was trained on (the embedding drives teacher selection)."""
    record: dict[str, Any] = {
        "source": job.data,
        "fingerprint": data.fingerprint(),
        "shots": job.config.shots,
        "train_examples": len(data.train),
        "num_labels": len(data.labels),
    }
    if data.unlabeled:
        record["unlabeled_examples"] = len(data.unlabeled)
    if job.columns != (TEXT_COLUMN, LABEL_COLUMN):
        record["columns"] = {"text": job.text_column, "label": job.label_column}
    if backbone is not None:
        record["embedding"] = data_embedding(backbone, data.train.texts, job.config.max_length)
    return record


def run_job(
    job: TenantJob,
    backbone: Backbone,
    teachers: list[Teacher],
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    version: int | None = None,
    extra: dict[str, Any] | None = None,
    data: TenantData | None = None,
) -> tuple[dict[str, bytes], TrainResult]:
    """Train `job` and serialise it; `data` is read from `job.data` unless given, `extra` goes into its metadata."""
    data = data if data is not None else load_job_data(job, storage_options)
    result = train_tenant(backbone, data, job.config, teachers, progress)
    record = data_record(job, data, backbone)
    return result.files(job.tenant_id, backbone, job.config, record, version, extra=extra), result
