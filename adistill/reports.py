"""Reports and tables, built once: what the CLI, onboarding and the demo print about artifacts and evaluations.

Plain data in, strings and JSON-ready dicts out: no torch, no Ray, no I/O. Scoring itself (`recipes.evaluate`) is
passed in as a function, so this module stays importable anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

Row = Sequence[object]


def text_table(header: Row, rows: Iterable[Row], *, align: str | None = None, markdown: bool = False) -> str:
    """Columns padded to their widest cell, two spaces apart, trailing blanks stripped (the CLI's tables).

    `align` gives one character per column, `<` (left, the default) or `>` (right); `markdown=True` draws a
    GitHub table instead (`| a | b |`, with a `---:` rule under the header for right-aligned columns)."""
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    n = len(cells[0])
    if any(len(row) != n for row in cells):
        raise ValueError(f"every row of a table needs {n} cells (the header's)")
    aligns = align or "<" * n
    if len(aligns) != n or set(aligns) - {"<", ">"}:
        raise ValueError(f"align needs one of '<' or '>' per column ({n}), got {align!r}")
    widths = [max(len(row[i]) for row in cells) for i in range(n)]

    def pad(row: list[str]) -> list[str]:
        return [c.rjust(w) if a == ">" else c.ljust(w) for c, w, a in zip(row, widths, aligns)]

    if not markdown:
        return "\n".join("  ".join(pad(row)).rstrip() for row in cells)
    rule = "|" + "|".join("-" * (w + 1) + ":" if a == ">" else "-" * (w + 2) for w, a in zip(widths, aligns)) + "|"
    lines = ["| " + " | ".join(pad(row)) + " |" for row in cells]
    return "\n".join([lines[0], rule, *lines[1:]])


def rounded(obj: Any, digits: int = 4) -> Any:
    """A JSON-ready copy of `obj` for people to read: floats rounded to `digits` decimals, NaN and infinities as
    null, integral counts kept as ints (`"examples": 3080`, never 3080.0 when it was counted as an int)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj


def meta_accuracy(meta: Mapping[str, Any]) -> tuple[float | None, str]:
    """An artifact's recorded accuracy and its split: test, else validation. A missing, non-numeric or NaN value is
    skipped (so a NaN test accuracy falls back to validation); `(None, "")` when neither split has one."""
    metrics = meta.get("metrics")
    if not isinstance(metrics, Mapping):
        return None, ""
    for split in ("test", "validation"):
        scores = metrics.get(split)
        value = scores.get("accuracy") if isinstance(scores, Mapping) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value), split
    return None, ""


def artifact_bytes(meta: Mapping[str, Any]) -> int:
    """Bytes of an artifact's weight files, as recorded in its metadata."""
    return sum(int(f["bytes"]) for f in (meta.get("files") or {}).values())


# --- registry listings ---------------------------------------------------------------------------------------------


def registry_record(tenant_id: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """One tenant of `adistill registry ls --json`: latest version, method, recorded accuracy, backbone."""
    accuracy, split = meta_accuracy(meta)
    return {
        "tenant_id": tenant_id,
        "version": meta["version"],
        "method": meta.get("method"),
        "accuracy": accuracy,
        "split": split or None,
        "backbone": meta["backbone"]["name"],
        "backbone_fingerprint": meta["backbone"]["fingerprint"],
    }


def registry_table(records: Iterable[Mapping[str, Any]]) -> str:
    """`registry_record`s (and `{"tenant_id", "error"}` for unreadable tenants) as the `registry ls` table."""
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["tenant_id"], "?", "unreadable", "", r["error"]])
            continue
        accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f} ({r['split']})"
        backbone = f"{r['backbone']} ({r['backbone_fingerprint'][:12]})"
        rows.append([r["tenant_id"], str(r["version"]), str(r["method"]), accuracy, backbone])
    return text_table(["TENANT", "LATEST", "METHOD", "ACCURACY", "BACKBONE"], rows)


# --- evaluation reports --------------------------------------------------------------------------------------------


class SplitData(Protocol):
    """A tenant's data as `adistill.data.TenantData` holds it: the splits an evaluation may read."""

    @property
    def test(self) -> Any: ...

    @property
    def validation(self) -> Any: ...


def evaluation_report(
    meta: Mapping[str, Any], data: SplitData, score: Callable[[Any], Mapping[str, Any]]
) -> dict[str, Any]:
    """An artifact's evaluation on its tenant's data: method, split (test when the data has one, else validation),
    the scores `score(split)` returns (`recipes.evaluate.evaluate`: accuracy, ...), the share of the backbone its
    parameters add and its weight bytes. Both `adistill evaluate` paths build their reports with this."""
    name, split = ("test", data.test) if len(data.test) else ("validation", data.validation)
    return {
        "method": meta.get("method"),
        "split": name,
        **score(split),
        "percent_of_backbone": meta["parameters"]["percent_of_backbone"],
        "artifact_bytes": artifact_bytes(meta),
    }


def average_accuracy(reports: Iterable[Mapping[str, Any]]) -> float | None:
    """Mean accuracy over the reports whose status is `ok` (None when there are none)."""
    ok = [r["accuracy"] for r in reports if r.get("status") == "ok"]
    return sum(ok) / len(ok) if ok else None


def evaluation_table(reports: Sequence[Mapping[str, Any]]) -> str:
    """Manifest evaluation reports (`status` ok, missing or error) as a table, with the average accuracy line."""
    rows = []
    for r in reports:
        ok = r["status"] == "ok"
        rows.append(
            [
                r["tenant_id"],
                str(r.get("version", "-")),
                str(r.get("method", "-")),
                r.get("split", "-"),
                f"{r['accuracy']:.4f}" if ok else "-",
                f"{r['percent_of_backbone']:.3f}" if ok else "-",
                str(r.get("artifact_bytes", "-")),
                r["status"] if ok else f"{r['status']}: {r['error']}",
            ]
        )
    header = ["TENANT", "VERSION", "METHOD", "SPLIT", "ACCURACY", "PARAMS%", "BYTES", "STATUS"]
    table = text_table(header, rows)
    average = average_accuracy(reports)
    if average is None:
        return table
    count = sum(r["status"] == "ok" for r in reports)
    return f"{table}\naverage accuracy over {count} tenant(s): {average:.4f}"


__all__ = [
    "artifact_bytes",
    "average_accuracy",
    "evaluation_report",
    "evaluation_table",
    "meta_accuracy",
    "registry_record",
    "registry_table",
    "rounded",
    "text_table",
]
