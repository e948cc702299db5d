"""URIs as every process reads them: local paths made absolute, since Ray workers run in their own folders."""

from __future__ import annotations

from pathlib import Path


def absolute_uri(uri: str) -> str:
    """Local paths (and file:// URIs) become absolute paths; URIs with another scheme (s3://...) are left alone."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())
