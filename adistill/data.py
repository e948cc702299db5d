"""Tenant data: read (parquet/csv/jsonl, local or s3://), validate, few-shot sample, fingerprint.

A tenant's data is one file with a text and a label column (`text` and `label` unless mapped with
`text_column` / `label_column`, the CLI's `--text-column` / `--label-column`) and optionally `split`, or a folder
holding `train.*`, `validation.*` and `test.*`. The label `oos` marks out-of-scope queries: they never become a
class, and in validation/test they calibrate and measure the out-of-scope threshold.

Unlabelled queries (stage 2's transfer set, `recipes/transfer.py`) come as rows whose `split` is `unlabeled` (their
label may be empty) or as an `unlabeled.*` file in the folder (only the text column is read). Empty and duplicate
texts, and texts that are already labelled rows (of any split), are dropped with a count; more than `max_unlabeled`
remaining is a `DataError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from adistill.errors import DataError

log = logging.getLogger(__name__)

OOS_LABEL = "oos"
SPLITS = ("train", "validation", "test")
UNLABELED = "unlabeled"  # the split name of unlabelled rows, and the stem of a folder's unlabelled file
MAX_UNLABELED = 100_000
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
VALIDATION_FRACTION = 0.1
TEXT_COLUMN, LABEL_COLUMN = "text", "label"


@dataclass
class Split:
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def in_scope(self) -> Split:
        keep = [i for i, y in enumerate(self.labels) if y != OOS_LABEL]
        return Split([self.texts[i] for i in keep], [self.labels[i] for i in keep])

    def out_of_scope(self) -> Split:
        keep = [i for i, y in enumerate(self.labels) if y == OOS_LABEL]
        return Split([self.texts[i] for i in keep], [self.labels[i] for i in keep])


@dataclass
class TenantData:
    source: str
    train: Split
    validation: Split
    test: Split
    unlabeled: list[str] = field(default_factory=list)  # unlabelled queries: stage 2's transfer set

    @property
    def labels(self) -> list[str]:
        """The tenant's classes: sorted distinct in-scope training labels."""
        return sorted(set(self.train.labels))

    def fingerprint(self) -> str:
        """sha256 of every (split, text, label) row: identifies the exact data a tenant was trained on."""
        digest = hashlib.sha256()
        for name in SPLITS:
            split: Split = getattr(self, name)
            digest.update(json.dumps([name, split.texts, split.labels]).encode())
        if self.unlabeled:  # data without unlabelled queries keeps the fingerprint it always had
            digest.update(json.dumps([UNLABELED, self.unlabeled]).encode())
        return digest.hexdigest()


def read_tenant_data(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    seed: int = 0,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    max_unlabeled: int = MAX_UNLABELED,
) -> TenantData:
    """Read and validate one tenant's data from a file or folder (local path or fsspec URI); `text_column` and
    `label_column` name the columns holding the queries and their labels. Unlabelled queries (module docstring)
    are kept in `TenantData.unlabeled`, at most `max_unlabeled` of them."""
    columns = _columns(text_column, label_column)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        is_dir = fs.isdir(path)
        exists = is_dir or fs.isfile(path)
    except Exception as exc:  # any storage failure becomes a DataError naming the URI
        raise DataError(f"{uri}: cannot access tenant data: {exc}") from exc
    if not exists:
        raise DataError(f"{uri}: no such file or folder")
    splits: dict[str, Split] = {}
    unlabeled: list[str | None] = []
    if is_dir:
        listing = fs.ls(path, detail=False)
        for name in (*SPLITS, UNLABELED):
            found = [p for p in listing if _stem(p) == name and _suffix(p) in FORMATS]
            if len(found) > 1:
                raise DataError(f"{uri}: several files for split {name!r}: {sorted(found)}")
            if found and name == UNLABELED:
                unlabeled = _texts(_read_table(fs, found[0]), found[0], text_column)
            elif found:
                splits[name] = _to_split(_read_table(fs, found[0]), found[0], columns, expect_split=False)[0]["train"]
        if "train" not in splits:
            raise DataError(f"{uri}: folder holds no train.parquet, train.csv or train.jsonl")
    else:
        splits, unlabeled = _to_split(_read_table(fs, path), uri, columns, expect_split=True)
    data = _validate(uri, splits, seed)
    labelled = data.train.texts + data.validation.texts + data.test.texts
    data.unlabeled = _clean_unlabeled(uri, unlabeled, labelled, max_unlabeled)
    log.info(
        "read %s: %d train, %d validation, %d test, %d labels, %d unlabelled",
        uri,
        len(data.train),
        len(data.validation),
        len(data.test),
        len(data.labels),
        len(data.unlabeled),
    )
    return data


def few_shot(data: TenantData, shots: int, seed: int) -> TenantData:
    """Keep `shots` training examples per label (all of them where a label has fewer), seeded."""
    if shots < 1:
        raise DataError(f"shots must be >= 1, got {shots}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, y in enumerate(data.train.labels):
        by_label[y].append(i)
    rng = random.Random(f"{seed}:{shots}")
    keep = sorted(i for y in sorted(by_label) for i in rng.sample(by_label[y], min(shots, len(by_label[y]))))
    train = Split([data.train.texts[i] for i in keep], [data.train.labels[i] for i in keep])
    return TenantData(data.source, train, data.validation, data.test, list(data.unlabeled))


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.split(".", 1)[0]


def _suffix(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _read_table(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    fmt = FORMATS.get(_suffix(path))
    if fmt is None:
        raise DataError(f"{path}: unsupported file type {_suffix(path)!r}; expected .parquet, .csv or .jsonl")
    try:
        with fs.open(path, "rb") as f:
            if fmt == "parquet":
                return pq.read_table(f)
            if fmt == "csv":
                return pa_csv.read_csv(f, convert_options=pa_csv.ConvertOptions(strings_can_be_null=False))
            return pa_json.read_json(f)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot parse as {fmt}: {exc}") from exc


def _columns(text_column: str, label_column: str) -> tuple[str, str]:
    for flag, value in (("text column", text_column), ("label column", label_column)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"the {flag} must be a non-empty column name, got {value!r}")
    if text_column == label_column:
        raise DataError(f"the text and label columns must differ, both are {text_column!r}")
    return text_column, label_column


def _texts(table: pa.Table, where: str, text_col: str) -> list[str | None]:
    """The text column of a table of unlabelled queries (any other column is ignored)."""
    if text_col not in table.column_names:
        raise DataError(f"{where}: missing column {text_col!r}; found {table.column_names}")
    text_type = table.schema.field(text_col).type
    if table.num_rows and not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise DataError(f"{where}: column {text_col!r} must hold strings, found {text_type}")
    return table.column(text_col).to_pylist()


def _clean_unlabeled(where: str, texts: list[str | None], labelled: list[str], cap: int) -> list[str]:
    """Unlabelled texts without empty ones, repeats and labelled queries (counted in one log line)."""
    seen, kept = set(labelled), []
    empty = repeated = 0
    for text in texts:
        if text is None or not text.strip():
            empty += 1
        elif text in seen:
            repeated += 1
        else:
            seen.add(text)
            kept.append(text)
    if empty or repeated:
        log.warning(
            "%s: %d of %d unlabelled texts dropped (%d empty, %d duplicates or already labelled)",
            where,
            empty + repeated,
            len(texts),
            empty,
            repeated,
        )
    if len(kept) > cap:
        raise DataError(
            f"{where}: {len(kept)} unlabelled texts, more than the {cap} a tenant may bring; "
            f"pass a random sample of at most {cap} (stage 2 draws only transfer.max_per_epoch of them per epoch)"
        )
    return kept


def _to_split(
    table: pa.Table, where: str, columns: tuple[str, str], expect_split: bool
) -> tuple[dict[str, Split], list[str | None]]:
    """The labelled rows by split, and the texts of rows whose `split` is `unlabeled` (their label is not read)."""
    text_col, label_col = columns
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        hint = ""
        if columns == (TEXT_COLUMN, LABEL_COLUMN):
            hint = "; name yours with --text-column/--label-column (manifest: text_column/label_column)"
        raise DataError(f"{where}: missing column(s) {missing}; found {table.column_names}{hint}")
    if table.num_rows == 0:
        raise DataError(f"{where}: no rows (a header and nothing else?)")
    text_type = table.schema.field(text_col).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise DataError(f"{where}: column {text_col!r} must hold strings, found {text_type}")
    texts = table.column(text_col).to_pylist()
    raw_labels = table.column(label_col).to_pylist()
    split_of: list[Any] = [None] * len(texts)
    if expect_split and "split" in table.column_names:
        split_of = table.column("split").to_pylist()
    unlabeled = [x for x, s in zip(texts, split_of) if s == UNLABELED]
    for row, (x, y, s) in enumerate(zip(texts, raw_labels, split_of)):
        if s == UNLABELED:
            continue
        if x is None or not x.strip():
            raise DataError(f"{where}: row {row}: empty or null text")
        if y is None or not str(y).strip():
            raise DataError(f"{where}: row {row}: empty or null label")
    if not expect_split or "split" not in table.column_names:
        return {"train": Split(texts, [str(y) for y in raw_labels])}, []
    out = {name: Split() for name in SPLITS}
    for row, (x, y, s) in enumerate(zip(texts, raw_labels, split_of)):
        if s == UNLABELED:
            continue
        if s not in out:
            raise DataError(f"{where}: row {row}: split {s!r} is not one of {[*SPLITS, UNLABELED]}")
        out[s].texts.append(x)
        out[s].labels.append(str(y))
    return {k: v for k, v in out.items() if len(v)}, unlabeled


def _validate(uri: str, splits: dict[str, Split], seed: int) -> TenantData:
    train = splits.get("train", Split())
    out_of_scope = train.out_of_scope()
    train = train.in_scope()
    if len(out_of_scope):
        log.info("%s: %d out-of-scope (%r) training rows are not used as a class", uri, len(out_of_scope), OOS_LABEL)
    if not len(train):
        raise DataError(f"{uri}: empty train split")
    labels = set(train.labels)
    if len(labels) < 2:
        raise DataError(f"{uri}: train split has {len(labels)} label(s); at least 2 are needed")
    counts: dict[str, int] = defaultdict(int)
    for y in train.labels:
        counts[y] += 1
    single = sorted(y for y, n in counts.items() if n == 1)
    if single:
        shown = ", ".join(single[:5]) + (f" and {len(single) - 5} more" if len(single) > 5 else "")
        log.warning(
            "%s: %d label(s) have a single training example (%s): they are learned from one query%s; add examples",
            uri,
            len(single),
            shown,
            "" if "validation" in splits else " and none can be held out for validation",
        )
    validation = splits.get("validation")
    if validation is None:
        train, validation = _carve_validation(train, seed)
        if len(set(train.labels)) < len(labels):
            raise DataError(f"{uri}: too few examples to hold out validation data; add a validation split")
        # out-of-scope rows never train a class: with no validation split, they calibrate the threshold
        validation = Split(validation.texts + out_of_scope.texts, validation.labels + out_of_scope.labels)
    for name, split in (("validation", validation), ("test", splits.get("test", Split()))):
        unseen = sorted(set(split.in_scope().labels) - labels)
        if unseen:
            raise DataError(f"{uri}: {name} labels not seen in train: {unseen[:5]}{'...' if len(unseen) > 5 else ''}")
    if not len(validation.in_scope()):
        raise DataError(f"{uri}: validation split has no in-scope examples")
    return TenantData(uri, train, validation, splits.get("test", Split()))


def _carve_validation(train: Split, seed: int) -> tuple[Split, Split]:
    """Hold out ~10% of each label (labels with >= 2 examples) as validation, seeded."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, y in enumerate(train.labels):
        by_label[y].append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for y in sorted(by_label):
        idx = by_label[y]
        if len(idx) >= 2:
            held.update(rng.sample(idx, max(1, round(len(idx) * VALIDATION_FRACTION))))
    keep = [i for i in range(len(train)) if i not in held]
    val = sorted(held)
    return (
        Split([train.texts[i] for i in keep], [train.labels[i] for i in keep]),
        Split([train.texts[i] for i in val], [train.labels[i] for i in val]),
    )
