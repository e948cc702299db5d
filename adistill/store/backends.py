"""Registry storage backends: the few primitives the registry's publish protocol needs, each with the strongest
guarantee its backend offers (docs/registry.md says which).

- `LocalStore`: a local folder; atomic writes, exclusive create by hard link, pointer compare-and-swap under flock.
- `S3Store`: S3 and S3-compatible stores; exclusive create and compare-and-swap by conditional PUTs.
- `FsspecStore`: any other fsspec filesystem; check-then-write, so one publisher per tenant at a time.

`open_store(uri, storage_options)` picks one for a URI. A new backend implements `Store` and is chosen there.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import fsspec

from adistill.errors import AdistillError, ConfigError
from adistill.store.artifact import sha256

log = logging.getLogger(__name__)

_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class Store(Protocol):
    """Paths are relative to the store's root. `read_tagged` returns the data with a tag (an ETag or a sha256)
    that `write_if` compares; `create` writes only if nothing is there; both return False when they lose."""

    def read(self, path: str) -> bytes | None: ...
    def read_tagged(self, path: str) -> tuple[bytes, str] | None: ...
    def write(self, path: str, data: bytes) -> None: ...
    def create(self, path: str, data: bytes) -> bool: ...
    def write_if(self, path: str, data: bytes, tag: str | None) -> bool: ...
    def delete(self, path: str) -> None: ...
    def delete_tree(self, path: str) -> None: ...
    def list_dirs(self, path: str) -> list[str]: ...
    def list_pointers(self, path: str, name: str) -> list[str]: ...
    def root_exists(self) -> bool: ...


class LocalStore:
    """A local folder. Atomic writes (temp file + rename), exclusive create (hard link), pointer CAS under flock."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def _p(self, path: str) -> Path:
        return self.root / path

    def read(self, path: str) -> bytes | None:
        try:
            return self._p(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_tagged(self, path: str) -> tuple[bytes, str] | None:
        data = self.read(path)
        return None if data is None else (data, sha256(data))

    def _temp(self, target: Path, data: bytes) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def write(self, path: str, data: bytes) -> None:
        target = self._p(path)
        tmp = self._temp(target, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def create(self, path: str, data: bytes) -> bool:
        target = self._p(path)
        tmp = self._temp(target, data)
        try:
            os.link(tmp, target)  # fails if target exists: the whole file appears at once, or not at all
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _locked(self, target: Path) -> Iterator[None]:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(f".{target.name}.lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def write_if(self, path: str, data: bytes, tag: str | None) -> bool:
        target = self._p(path)
        with self._locked(target):
            current = self.read_tagged(path)
            if (current[1] if current else None) != tag:
                return False
            self.write(path, data)
            return True

    def delete(self, path: str) -> None:
        self._p(path).unlink(missing_ok=True)

    def delete_tree(self, path: str) -> None:
        target = self._p(path)
        if target.is_dir():
            # rename first so that a reader never sees a half-deleted tree under the tenant's name
            trash = target.with_name(f".deleted-{target.name}-{uuid.uuid4().hex[:8]}")
            os.replace(target, trash)
            shutil.rmtree(trash)

    def list_dirs(self, path: str) -> list[str]:
        target = self._p(path)
        if not target.is_dir():
            return []
        return sorted(p.name for p in target.iterdir() if p.is_dir())

    def list_pointers(self, path: str, name: str) -> list[str]:
        target = self._p(path)
        if not target.is_dir():
            return []
        return sorted(p.name for p in target.iterdir() if (p / name).is_file())

    def root_exists(self) -> bool:
        return self.root.is_dir()


def s3_code(exc: BaseException) -> str:
    """The S3 error code (or HTTP status) behind an s3fs exception, '' when there is none."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(error.get("Code") or status or "")
    return ""


class S3Store:
    """S3 and S3-compatible stores: every PUT is atomic; exclusive create and pointer CAS by conditional PUTs
    (`If-None-Match: *`, `If-Match: <etag>`), supported by AWS S3 (since 2024), moto (5.2.5 checked) and
    SeaweedFS (4.48 checked)."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def _p(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def _split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self._p(path))
        return bucket, key

    def read(self, path: str) -> bytes | None:
        got = self.read_tagged(path)
        return None if got is None else got[0]

    def read_tagged(self, path: str) -> tuple[bytes, str] | None:
        bucket, key = self._split(path)

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, str(response["ETag"])

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError as exc:
            if s3_code(exc) == "NoSuchBucket":
                raise
            return None

    def _put(self, path: str, data: bytes, **conditions: str) -> bool:
        bucket, key = self._split(path)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **conditions)
        except OSError as exc:
            if conditions and (isinstance(exc, FileExistsError) or s3_code(exc) in _PRECONDITION):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self._p(path))
        return True

    def write(self, path: str, data: bytes) -> None:
        self._put(path, data)

    def create(self, path: str, data: bytes) -> bool:
        return self._put(path, data, IfNoneMatch="*")

    def write_if(self, path: str, data: bytes, tag: str | None) -> bool:
        return self._put(path, data, **({"IfMatch": tag} if tag else {"IfNoneMatch": "*"}))

    def delete(self, path: str) -> None:
        bucket, key = self._split(path)
        self.fs.call_s3("delete_object", Bucket=bucket, Key=key)
        self.fs.invalidate_cache(self._p(path))

    def delete_tree(self, path: str) -> None:
        target = self._p(path)
        self.fs.invalidate_cache(target)
        entries = self.fs.find(target, withdirs=True, detail=True)
        files = [name for name, e in entries.items() if e["type"] != "directory" and name != target]
        if files:
            self.fs.rm(files)
        # stores with real folders (SeaweedFS) keep empty ones as common prefixes: delete them, deepest first
        folders = {target} | {name for name, e in entries.items() if e["type"] == "directory"}
        for name in files:
            parent = name.rsplit("/", 1)[0]
            while parent.startswith(f"{target}/"):
                folders.add(parent)
                parent = parent.rsplit("/", 1)[0]
        for folder in sorted(folders, key=len, reverse=True):
            bucket, key = self._split(folder[len(self.root) + 1 :])
            self.fs.call_s3("delete_object", Bucket=bucket, Key=f"{key}/")
        self.fs.invalidate_cache(target)

    def list_dirs(self, path: str) -> list[str]:
        target = self._p(path)
        self.fs.invalidate_cache(target)
        try:
            entries = self.fs.ls(target, detail=True, refresh=True)
        except FileNotFoundError as exc:
            if s3_code(exc) == "NoSuchBucket":
                raise
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def list_pointers(self, path: str, name: str) -> list[str]:
        # one flat listing (1 request per 1000 keys) instead of one request per tenant
        target = self._p(path)
        self.fs.invalidate_cache(target)
        try:
            keys = self.fs.find(target)
        except FileNotFoundError as exc:
            if s3_code(exc) == "NoSuchBucket":
                raise
            return []
        prefix = f"{target}/"
        out = []
        for key in keys:
            parts = key[len(prefix) :].split("/") if key.startswith(prefix) else []
            if len(parts) == 2 and parts[1] == name:
                out.append(parts[0])
        return sorted(out)

    def root_exists(self) -> bool:
        self.fs.invalidate_cache(self.root)
        return bool(self.fs.exists(self.root))


class FsspecStore:
    """Any other fsspec filesystem. Writes of one object are assumed atomic; exclusive create and the pointer
    CAS are check-then-write here, so run one publisher per tenant at a time on such stores (docs/registry.md)."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def _p(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def read(self, path: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self._p(path)))
        except FileNotFoundError:
            return None

    def read_tagged(self, path: str) -> tuple[bytes, str] | None:
        data = self.read(path)
        return None if data is None else (data, sha256(data))

    def write(self, path: str, data: bytes) -> None:
        target = self._p(path)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(target, data)
        self.fs.invalidate_cache(target)

    def create(self, path: str, data: bytes) -> bool:
        if self.read(path) is not None:
            return False
        self.write(path, data)
        return True

    def write_if(self, path: str, data: bytes, tag: str | None) -> bool:
        current = self.read_tagged(path)
        if (current[1] if current else None) != tag:
            return False
        self.write(path, data)
        return True

    def delete(self, path: str) -> None:
        if self.fs.exists(self._p(path)):
            self.fs.rm_file(self._p(path))

    def delete_tree(self, path: str) -> None:
        if self.fs.exists(self._p(path)):
            self.fs.rm(self._p(path), recursive=True)

    def list_dirs(self, path: str) -> list[str]:
        target = self._p(path)
        self.fs.invalidate_cache(target)
        if not self.fs.isdir(target):
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1]
            for e in self.fs.ls(target, detail=True)
            if e["type"] == "directory"
        )

    def list_pointers(self, path: str, name: str) -> list[str]:
        return [d for d in self.list_dirs(path) if self.read(f"{path}/{d}/{name}") is not None]

    def root_exists(self) -> bool:
        self.fs.invalidate_cache(self.root)
        return bool(self.fs.exists(self.root))


def open_store(uri: str, storage_options: dict[str, Any]) -> Store:
    from fsspec.implementations.local import LocalFileSystem

    options = dict(storage_options)
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    if protocol in ("s3", "s3a"):
        options.setdefault("use_listings_cache", False)  # other processes publish too: never trust a cached listing
    try:
        fs, root = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"registry {uri!r}: cannot open its filesystem: {exc}") from exc
    if isinstance(fs, LocalFileSystem):
        return LocalStore(root)
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return S3Store(fs, root)
    log.warning("registry %s: %s has no conditional writes; run one publisher per tenant at a time", uri, protocol)
    return FsspecStore(fs, root)


def is_storage_error(exc: BaseException) -> bool:
    """Whether `exc` is a failure of the storage itself (I/O, network, credentials), not a bug or bad data."""
    if isinstance(exc, OSError):
        return True
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        return False
    return isinstance(exc, (BotoCoreError, ClientError))


@contextmanager
def storage_errors(where: str, doing: str, error: type[Exception]) -> Iterator[None]:
    """Storage failures (network, credentials, missing bucket) inside the block become one clear `error`:
    `<where>: cannot <doing>: <detail>`. adistill's own errors and programming errors pass through."""
    try:
        yield
    except AdistillError:
        raise
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        detail = str(exc) or type(exc).__name__
        if s3_code(exc) == "NoSuchBucket":
            detail = f"the bucket does not exist ({detail})"
        raise error(f"{where}: cannot {doing}: {detail}") from exc
