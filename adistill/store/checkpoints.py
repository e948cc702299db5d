"""Checkpoints of unfinished onboarding runs: `<storage>/<run name>/{stage1,done}/`, each an artifact folder.

`stage1` is the tenant's trained stage 1 (a restarted worker resumes from it); `done` is the finished artifact,
written before the driver publishes it (a driver that died in between publishes it on the next run without
retraining). Any fsspec URI works (a local folder, s3://...); workers on other nodes need a shared one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import fsspec

from adistill.errors import ConfigError, CorruptArtifact
from adistill.store.names import CONFIG, FILES

log = logging.getLogger(__name__)


class RunFolder:
    """One run's checkpoints. Writes put the config file last: a folder without it is incomplete and ignored."""

    def __init__(self, storage_uri: str, run_name: str, storage_options: dict[str, Any] | None = None) -> None:
        try:
            self.fs, root = fsspec.core.url_to_fs(storage_uri, **(storage_options or {}))
        except (ImportError, ValueError, TypeError, OSError) as exc:
            raise ConfigError(f"storage path {storage_uri!r}: cannot open its filesystem: {exc}") from exc
        self.root = f"{str(root).rstrip('/')}/{run_name}"

    def read(self, stage: str) -> dict[str, bytes] | None:
        """The files saved for `stage`, or None when there are none (or they are incomplete)."""
        paths = {name: f"{self.root}/{stage}/{name}" for name in FILES}
        try:
            if not self.fs.exists(paths[CONFIG]):
                return None
            return {name: self.fs.cat_file(path) for name, path in paths.items()}
        except FileNotFoundError:
            return None

    def write(self, stage: str, files: dict[str, bytes]) -> None:
        folder = f"{self.root}/{stage}"
        self.fs.makedirs(folder, exist_ok=True)
        if self.fs.exists(f"{folder}/{CONFIG}"):
            self.fs.rm(f"{folder}/{CONFIG}")  # incomplete while rewritten
        for name in FILES:  # the config last
            self.fs.pipe_file(f"{folder}/{name}", files[name])

    def writer(self, stage: str) -> Callable[[dict[str, bytes]], None]:
        return lambda files: self.write(stage, files)

    def remove(self) -> None:
        """Drop the run's checkpoints (after its tenant is published); best effort."""
        try:
            if self.fs.exists(self.root):
                self.fs.rm(self.root, recursive=True)
        except (OSError, CorruptArtifact) as exc:
            log.warning("could not remove checkpoints %s: %s", self.root, exc)
