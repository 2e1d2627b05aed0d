"""Readers: every format yields the same records; shards cover each line exactly once; bad lines
are reported with file and line."""

import gzip
import json

import pytest

from ellama_megatron.data.readers import (
    InputError,
    check_readable,
    expand_inputs,
    read_records,
    read_unit,
    split_into_units,
)

RECORDS = [{"id": i, "text": f"document number {i} " + "x" * (i % 7), "language": "en"} for i in range(50)]


def _jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _write_all_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    data = _jsonl_bytes(RECORDS)
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "a.parquet", row_group_size=7)
    Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "hf_saved"))
    return {
        "jsonl": tmp_path / "a.jsonl",
        "gz": tmp_path / "a.jsonl.gz",
        "zst": tmp_path / "a.jsonl.zst",
        "parquet": tmp_path / "a.parquet",
        "hf": tmp_path / "hf_saved",
    }


def test_every_format_reads_the_same_records(tmp_path):
    for name, path in _write_all_formats(tmp_path).items():
        got = list(read_records([str(path)]))
        assert [r.record for r in got] == RECORDS, name
        assert all(r.error is None for r in got)


def test_parquet_row_groups_are_shards_with_true_row_numbers(tmp_path):
    path = _write_all_formats(tmp_path)["parquet"]
    units = split_into_units([path], shard_bytes=1)  # one unit per row group
    assert len(units) == 8  # 50 rows / 7 per group
    rows = [r for u in units for r in read_unit(u)]
    assert [r.record for r in rows] == RECORDS
    assert [r.location for r in rows] == [f"row {i + 1}" for i in range(50)]


@pytest.mark.parametrize("shard_bytes", [1, 37, 100, 10_000])
def test_jsonl_byte_shards_cover_each_line_once(tmp_path, shard_bytes):
    path = tmp_path / "a.jsonl"
    path.write_bytes(_jsonl_bytes(RECORDS))
    units = split_into_units([path], shard_bytes=shard_bytes)
    rows = [r for u in units for r in read_unit(u)]
    assert [r.record for r in rows] == RECORDS
    assert [r.location for r in rows] == [f"line {i + 1}" for i in range(50)]


def test_folder_is_searched_recursively_and_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_bytes(_jsonl_bytes(RECORDS[25:]))
    (tmp_path / "a.jsonl").write_bytes(_jsonl_bytes(RECORDS[:25]))
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.record for r in read_records([str(tmp_path)])] == RECORDS


def test_bad_lines_are_reported_with_line_and_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "ok"}\n{"text": "broken"\n{"text": "caf\xe9 in latin-1"}\n\n[1, 2]\n{"text": "also ok"}\n'
    )
    rows = list(read_records([str(path)]))
    assert [r.location for r in rows] == [f"line {i}" for i in range(1, 7)]
    assert rows[0].record == {"text": "ok"} and rows[5].record == {"text": "also ok"}
    assert rows[1].error.startswith("malformed JSON")
    assert rows[2].error.startswith("not UTF-8")
    assert rows[3].error == "empty line"
    assert rows[4].error.startswith("not a JSON object")


def test_truncated_gzip_reports_where_reading_stopped(tmp_path):
    data = gzip.compress(_jsonl_bytes(RECORDS * 20))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    rows = list(read_records([str(path)]))
    assert rows[-1].error is not None and rows[-1].error.startswith("unreadable from here on")
    assert all(r.error is None for r in rows[:-1]) and len(rows) > 1


def test_unreadable_and_unsupported_inputs_fail_before_work(tmp_path):
    (tmp_path / "fake.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="fake.jsonl.gz: cannot read"):
        check_readable(tmp_path / "fake.jsonl.gz")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(InputError, match="fake.parquet: cannot read"):
        check_readable(tmp_path / "fake.parquet")
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported file type"):
        expand_inputs([str(tmp_path / "data.csv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no input files"):
        expand_inputs([str(tmp_path / "empty")])


def test_hf_dataset_dict_asks_for_a_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(RECORDS[:3])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="pass one split's folder"):
        expand_inputs([str(tmp_path / "dd")])
    assert [r.record for r in read_records([str(tmp_path / "dd" / "train")])] == RECORDS[:3]
