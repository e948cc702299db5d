"""A tenant artifact on disk: `adapter.safetensors` + `adapter_config.json` (shape, lineage, checksums).

Artifacts are handled as `{file name: bytes}` so that a local folder and the registry (any fsspec store)
share one encoder/decoder; `save_artifact`/`load_artifact` add the local-folder part. The file names live in
`adistill.store.names` (importable without torch).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import adistill
from adistill.adapters import AdapterSet
from adistill.backbone import Backbone
from adistill.config import AdapterConfig, RecipeConfig
from adistill.errors import BackboneMismatch, CorruptArtifact
from adistill.fusion import FusionSet
from adistill.heads import Head
from adistill.model import TenantModel
from adistill.store.names import CONFIG, FORMAT, FORMAT_VERSION, WEIGHTS
from adistill.tenant_id import validate_tenant_id


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Teacher:
    """A frozen adapter of an earlier tenant, with the identity recorded in the new tenant's lineage."""

    tenant_id: str
    adapters: AdapterSet
    version: int | None = None
    sha256: str | None = None

    def lineage(self) -> dict[str, Any]:
        return {"tenant_id": self.tenant_id, "version": self.version, "sha256": self.sha256}


@dataclass
class Artifact:
    """A loaded artifact: its metadata (the parsed adapter_config.json) and the ready-to-run model."""

    meta: dict[str, Any]
    model: TenantModel

    @property
    def tenant_id(self) -> str:
        return str(self.meta["tenant_id"])

    @property
    def method(self) -> str:
        return str(self.meta["method"])

    @property
    def version(self) -> int | None:
        version = self.meta.get("version")
        return None if version is None else int(version)

    @property
    def sha256(self) -> str:
        return str(self.meta["files"][WEIGHTS]["sha256"])

    def as_teacher(self) -> Teacher:
        """This tenant's adapter as a frozen teacher for a new tenant (adapter and distill artifacts only)."""
        if not isinstance(self.model.adapters, AdapterSet):
            raise CorruptArtifact(
                f"tenant {self.tenant_id!r} ({self.method}) holds no single adapter and cannot be a teacher"
            )
        return Teacher(self.tenant_id, self.model.adapters, self.version, self.sha256)


def added_parameters(model: TenantModel) -> int:
    """Parameters the tenant itself adds at inference (a fusion's member adapters of other tenants excluded)."""
    total = model.inference_parameters()
    if isinstance(model.adapters, FusionSet):
        total -= sum(p.numel() for a in list(model.adapters.adapters)[:-1] for p in a.parameters())
    return total


def artifact_files(
    tenant_id: str,
    model: TenantModel,
    backbone: Backbone,
    cfg: RecipeConfig,
    data: dict[str, Any],
    metrics: dict[str, Any],
    teachers: Iterable[Teacher] = (),
    version: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """Serialise a trained tenant. Only the inference path is saved: no training-only fusion or teachers.

    `data` is what the artifact records about its training data, `teachers` its lineage, `extra` more top-level
    metadata (e.g. `teacher_selection`, how the teachers were chosen)."""
    validate_tenant_id(tenant_id)
    teachers = list(teachers)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights = st_save(tensors, metadata={"format": FORMAT, "tenant_id": tenant_id})
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adistill_version": adistill.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tenant_id": tenant_id,
        "version": version,
        "method": model.method,
        "labels": model.labels,
        "pooling": model.head.pooling,
        "max_length": cfg.max_length,
        "oos_threshold": model.oos_threshold,
        "out_of_scope": out_of_scope_record(model.oos_threshold),
        "adapter": {
            **cfg.adapter.__dict__,
            "bottleneck": cfg.adapter.bottleneck(backbone.hidden_size),
            "num_layers": backbone.num_layers,
            "hidden_size": backbone.hidden_size,
        },
        "fusion": (
            {
                "num_adapters": len(model.adapters.adapters),
                "members": [t.lineage() for t in teachers] + ["self"],
            }
            if isinstance(model.adapters, FusionSet)
            else None
        ),
        "backbone": {
            "name": backbone.name,
            "fingerprint": backbone.fingerprint,
            "parameters": backbone.num_parameters,
        },
        "hyperparameters": cfg.to_dict(),
        "teachers": [t.lineage() for t in teachers],
        "data": data,
        "metrics": metrics,
        "parameters": {
            "added": added_parameters(model),
            "percent_of_backbone": round(100 * added_parameters(model) / backbone.num_parameters, 3),
            "stored": sum(t.numel() for t in tensors.values()),
        },
        "files": {WEIGHTS: {"sha256": sha256(weights), "bytes": len(weights)}},
        **(extra or {}),
    }
    return {WEIGHTS: weights, CONFIG: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()}


def out_of_scope_record(threshold: float | None) -> dict[str, Any]:
    """Whether out-of-scope detection is on for an artifact, and why not when it is off (its `out_of_scope`)."""
    if threshold is not None:
        return {"calibrated": True}
    return {
        "calibrated": False,
        "reason": "no 'oos' rows in the validation data: predictions never flag a query as out of scope",
    }


def parse_meta(config_bytes: bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptArtifact(f"{where}: {CONFIG} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptArtifact(f"{where}: not an adistill artifact ({CONFIG} lacks format={FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorruptArtifact(f"{where}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def verify_files(meta: dict[str, Any], files: dict[str, bytes], where: str) -> None:
    """Every file listed in the metadata is present with its recorded size and sha256."""
    for name, expected in meta.get("files", {}).items():
        data = files.get(name)
        if data is None:
            raise CorruptArtifact(f"{where}: missing {name}")
        if len(data) != expected["bytes"] or sha256(data) != expected["sha256"]:
            raise CorruptArtifact(f"{where}: {name} does not match its recorded sha256 (corrupt or truncated)")


def artifact_from_files(files: dict[str, bytes], backbone: Backbone, where: str = "artifact") -> Artifact:
    """Verify and load an artifact onto `backbone`; raises CorruptArtifact or BackboneMismatch."""
    if CONFIG not in files:
        raise CorruptArtifact(f"{where}: missing {CONFIG}")
    meta = parse_meta(files[CONFIG], where)
    verify_files(meta, files, where)
    if meta["backbone"]["fingerprint"] != backbone.fingerprint:
        raise BackboneMismatch(
            f"{where}: trained on backbone {meta['backbone']['name']!r} "
            f"(fingerprint {meta['backbone']['fingerprint'][:12]}), cannot load onto {backbone.name!r} "
            f"(fingerprint {backbone.fingerprint[:12]})"
        )
    try:
        model = _build_model(meta, backbone)
        model.load_state_dict(st_load(files[WEIGHTS]), strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CorruptArtifact(f"{where}: weights do not fit the recorded shape: {exc}") from exc
    model.requires_grad_(False).eval().to(backbone.device)
    model.oos_threshold = meta.get("oos_threshold")
    model.key = meta["files"][WEIGHTS]["sha256"]
    model.max_length = int(meta["max_length"])
    return Artifact(meta, model)


def _build_model(meta: dict[str, Any], backbone: Backbone) -> TenantModel:
    shape = meta["adapter"]
    adapter_cfg = AdapterConfig(kind=shape["kind"], reduction_factor=shape["reduction_factor"])
    head = Head(backbone.hidden_size, list(meta["labels"]), meta["pooling"])

    def adapter_set() -> AdapterSet:
        return AdapterSet(backbone.num_layers, backbone.hidden_size, adapter_cfg)

    method = meta["method"]
    if method in ("adapter", "distill"):
        return TenantModel(method, head, adapter_set())
    if method == "fusion":
        members = [adapter_set() for _ in range(int(meta["fusion"]["num_adapters"]))]
        return TenantModel(method, head, FusionSet(members, backbone.num_layers, backbone.hidden_size))
    if method == "finetune":
        return TenantModel(method, head, encoder=copy.deepcopy(backbone.model))
    raise CorruptArtifact(f"unknown method {method!r}")


def read_dir(path: str | Path) -> dict[str, bytes]:
    path = Path(path)
    if not path.is_dir():
        raise CorruptArtifact(f"{path}: no such artifact folder")
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.name in (WEIGHTS, CONFIG)}


def load_artifact(path: str | Path, backbone: Backbone) -> Artifact:
    return artifact_from_files(read_dir(path), backbone, str(path))


def save_artifact(files: dict[str, bytes], out_dir: str | Path) -> Path:
    """Write an artifact folder atomically: a temporary sibling folder renamed into place."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
