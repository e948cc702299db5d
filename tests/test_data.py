import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adistill.data import OOS_LABEL, few_shot, read_tenant_data
from adistill.datasets import clinc150
from adistill.errors import DataError

ROWS = [
    {"text": f"{word} question {i}", "label": label, "split": split}
    for label, word in (("a", "alpha"), ("b", "beta"), ("c", "gamma"))
    for split, n in (("train", 10), ("validation", 3), ("test", 3))
    for i in range(n)
]


def write(path: Path, rows: list[dict], fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_single_file_with_split_column(tmp_path: Path, fmt: str) -> None:
    data = read_tenant_data(str(write(tmp_path / f"t.{fmt}", ROWS, fmt)))
    assert (len(data.train), len(data.validation), len(data.test)) == (30, 9, 9)
    assert data.labels == ["a", "b", "c"]


def test_folder_layout_and_file_uri(tmp_path: Path) -> None:
    for split in ("train", "validation", "test"):
        write(tmp_path / "t" / f"{split}.jsonl", [r for r in ROWS if r["split"] == split], "jsonl")
    data = read_tenant_data(f"file://{tmp_path / 't'}")
    assert (len(data.train), len(data.validation), len(data.test)) == (30, 9, 9)


def test_validation_is_carved_from_train_when_missing(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "split"} for r in ROWS if r["split"] == "train"]
    data = read_tenant_data(str(write(tmp_path / "t.parquet", rows, "parquet")), seed=3)
    assert len(data.validation) == 3 and len(data.train) == 27 and len(data.test) == 0
    again = read_tenant_data(str(tmp_path / "t.parquet"), seed=3)
    assert again.validation.texts == data.validation.texts


def test_few_shot_is_seeded_per_label() -> None:
    data = read_tenant_data(clinc150.tenant_path("banking"))
    a, b, c = few_shot(data, 5, 0), few_shot(data, 5, 0), few_shot(data, 5, 1)
    assert len(a.train) == 75 and a.train.texts == b.train.texts and a.train.texts != c.train.texts
    assert all(a.train.labels.count(y) == 5 for y in a.labels)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_packaged_clinc_tenants_have_out_of_scope_rows() -> None:
    assert len(clinc150.domains()) == 10
    data = read_tenant_data(clinc150.tenant_path("meta"))
    assert len(data.labels) == 15 and OOS_LABEL not in data.labels
    assert (len(data.train), len(data.validation.in_scope()), len(data.test.in_scope())) == (1500, 300, 450)
    assert len(data.validation.out_of_scope()) == 100 and len(data.test.out_of_scope()) == 100


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "x", "split": "train"}], "missing column"),
        ([{"text": "x", "label": "a", "split": "test"}], "empty train split"),
        ([{"text": f"x{i}", "label": "a", "split": "train"} for i in range(5)], "at least 2 are needed"),
        (ROWS + [{"text": "new", "label": "zzz", "split": "test"}], "test labels not seen in train"),
        (ROWS + [{"text": "  ", "label": "a", "split": "train"}], "empty or null text"),
        (ROWS + [{"text": "x", "label": "a", "split": "holdout"}], "is not one of"),
        ([{**r, "text": 5} for r in ROWS], "must hold strings"),
    ],
)
def test_bad_data_names_file_and_problem(tmp_path: Path, rows: list[dict], message: str) -> None:
    path = write(tmp_path / "bad.parquet", rows, "parquet")
    with pytest.raises(DataError, match=message) as info:
        read_tenant_data(str(path))
    assert str(path) in str(info.value)


def test_missing_unsupported_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_tenant_data(str(tmp_path / "nope.parquet"))
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_tenant_data(str(tmp_path / "t.xlsx"))
    (tmp_path / "t.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot parse"):
        read_tenant_data(str(tmp_path / "t.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train"):
        read_tenant_data(str(tmp_path / "empty"))


def test_reads_tenant_data_from_s3(s3_moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import fsspec

    local = write(tmp_path / "t.parquet", ROWS, "parquet")
    uri = s3_moto.uri("tenants") + "/t.parquet"
    fs, path = fsspec.core.url_to_fs(uri, **s3_moto.storage_options)
    fs.put(str(local), path)
    data = read_tenant_data(uri, s3_moto.storage_options)
    assert (len(data.train), len(data.validation), len(data.test)) == (30, 9, 9)
    with pytest.raises(DataError, match="no such file"):
        read_tenant_data(s3_moto.uri("tenants") + "/missing.parquet", s3_moto.storage_options)


# --- columns, empty files, labels with one example (issue 14) -------------------------------------------------------


def test_columns_are_mapped_by_name(tmp_path: Path) -> None:
    rows = [{"query": r["text"], "intent": r["label"], "split": r["split"]} for r in ROWS]
    path = write(tmp_path / "t.csv", rows, "csv")
    data = read_tenant_data(str(path), text_column="query", label_column="intent")
    assert (len(data.train), len(data.validation), len(data.test)) == (30, 9, 9)
    with pytest.raises(DataError, match=r"missing column\(s\) \['text', 'label'\].*--text-column/--label-column"):
        read_tenant_data(str(path))
    with pytest.raises(DataError, match="must differ"):
        read_tenant_data(str(path), text_column="query", label_column="query")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_file_with_a_header_and_no_rows_says_so(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"empty.{fmt}"
    if fmt == "csv":
        path.write_text("text,label\n")
    else:
        pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match=r"no rows \(a header and nothing else\?\)"):
        read_tenant_data(str(path))


def test_a_label_with_a_single_example_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [r for r in ROWS if r["split"] == "train"] + [{"text": "delta once", "label": "d", "split": "train"}]
    path = write(tmp_path / "t.parquet", [{k: v for k, v in r.items() if k != "split"} for r in rows], "parquet")
    with caplog.at_level("WARNING", logger="adistill.data"):
        data = read_tenant_data(str(path))
    assert "1 label(s) have a single training example (d)" in caplog.text
    assert "none can be held out for validation" in caplog.text
    assert "d" in data.labels
    caplog.clear()
    with caplog.at_level("WARNING", logger="adistill.data"):
        read_tenant_data(str(write(tmp_path / "ok.parquet", ROWS, "parquet")))
    assert "single training example" not in caplog.text


def test_out_of_scope_rows_of_a_file_without_splits_calibrate(tmp_path: Path) -> None:
    rows = [{"text": r["text"], "label": r["label"]} for r in ROWS if r["split"] == "train"]
    rows += [{"text": f"something else {i}", "label": OOS_LABEL} for i in range(4)]
    data = read_tenant_data(str(write(tmp_path / "t.csv", rows, "csv")))
    assert OOS_LABEL not in data.train.labels and len(data.validation.out_of_scope()) == 4
