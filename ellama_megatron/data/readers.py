"""Streaming readers for the corpus formats users bring: JSON Lines (plain, .gz, .zst), Parquet,
and Hugging Face ``datasets`` folders (``save_to_disk`` output or a folder of local data files).

Nothing here loads a whole corpus: files are cut into *work units* (byte ranges of a plain JSONL
file, row-group ranges of a Parquet file, whole compressed or Arrow files) that workers read
independently, and every record comes with its file and line (or row) so bad ones can be reported.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
GZIP_SUFFIXES = tuple(s + ".gz" for s in JSONL_SUFFIXES)
ZSTD_SUFFIXES = tuple(s + ".zst" for s in JSONL_SUFFIXES)
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
SUPPORTED = JSONL_SUFFIXES + GZIP_SUFFIXES + ZSTD_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES


class InputError(ValueError):
    """An input that cannot be read at all (as opposed to one bad record inside it)."""


@dataclass(frozen=True)
class WorkUnit:
    """A piece of one input file that one worker reads start to end.

    kind: jsonl | jsonl.gz | jsonl.zst | parquet | arrow. For plain jsonl, [start, end) is a byte
    range (a line belongs to the unit holding its first byte); for parquet a row-group range;
    otherwise the whole file.
    """

    path: str
    kind: str
    start: int = 0
    end: int | None = None
    size: int = 0  # bytes of input this unit stands for (progress)


@dataclass(frozen=True)
class RawRecord:
    """One record as read, or why it could not be read (``record`` is None then)."""

    path: str
    location: str  # "line 12" / "row 7": what a user needs to find it
    record: dict | None
    error: str | None = None


def file_kind(path: str | Path) -> str:
    name = str(path).lower()
    if name.endswith(GZIP_SUFFIXES):
        return "jsonl.gz"
    if name.endswith(ZSTD_SUFFIXES):
        return "jsonl.zst"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(ARROW_SUFFIXES):
        return "arrow"
    raise InputError(
        f"{path}: unsupported file type. Supported: {', '.join(SUPPORTED)} "
        "(or a folder of them, or a Hugging Face save_to_disk folder)."
    )


def _hf_saved_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a ``Dataset.save_to_disk`` folder, in order; None if it is not one."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise InputError(
            f"{folder}: a Hugging Face DatasetDict with splits {splits}; pass one split's folder, "
            f"e.g. {folder / (splits[0] if splits else 'train')}"
        )
    state = folder / "state.json"
    if not state.is_file():
        return None
    files = json.loads(state.read_text()).get("_data_files", [])
    return [folder / f["filename"] for f in files]


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files behind the user's inputs: files as given, folders searched recursively (sorted)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            saved = _hf_saved_dataset_files(p)
            found = (
                saved
                if saved is not None
                else sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(SUPPORTED))
            )
            if not found:
                raise InputError(f"{p}: folder holds no input files ({', '.join(SUPPORTED)})")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    for f in files:
        file_kind(f)
    return files


def check_readable(path: Path) -> None:
    """Open the file and read its start, so an unreadable input fails before any work starts."""
    kind = file_kind(path)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            _ = pq.ParquetFile(path).metadata  # the footer, parsed: a truncated or foreign file fails here
        elif kind == "arrow":
            import pyarrow as pa

            with pa.memory_map(str(path)) as source:
                _ = pa.ipc.open_stream(source).schema  # the schema message, parsed: a foreign file fails here
        else:
            with open_text_stream(path, kind) as f:
                f.read(1)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise InputError(f"{path}: cannot read as {kind}: {e}. Check permissions and that the file is complete.") from e


def open_text_stream(path: Path | str, kind: str):
    """A binary, line-iterable stream over the (decompressed) file."""
    if kind == "jsonl.gz":
        return gzip.open(path, "rb")
    if kind == "jsonl.zst":
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def split_into_units(files: list[Path], shard_bytes: int = 64 << 20) -> list[WorkUnit]:
    """Cut files into work units of about ``shard_bytes``: large inputs are read in parallel."""
    units: list[WorkUnit] = []
    for path in files:
        kind = file_kind(path)
        size = os.path.getsize(path)
        if kind == "jsonl" and size > shard_bytes:
            for start in range(0, size, shard_bytes):
                end = min(start + shard_bytes, size)
                units.append(WorkUnit(str(path), kind, start, end, end - start))
        elif kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            groups = meta.num_row_groups
            per_group = size / max(groups, 1)
            step = max(1, int(shard_bytes // max(per_group, 1)))
            for start in range(0, max(groups, 1), step):
                end = min(start + step, groups)
                units.append(WorkUnit(str(path), kind, start, end, int(per_group * (end - start))))
        else:
            units.append(WorkUnit(str(path), kind, 0, None, size))
    return units


def _count_newlines(path: str, end: int) -> int:
    count = 0
    with open(path, "rb") as f:
        remaining = end
        while remaining > 0:
            block = f.read(min(remaining, 16 << 20))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count


def _parse_line(path: str, line_no: int, line: bytes) -> RawRecord:
    where = f"line {line_no}"
    try:
        text = line.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as e:
        return RawRecord(path, where, None, f"not UTF-8 ({e.reason} at byte {e.start})")
    if not text.strip():
        return RawRecord(path, where, None, "empty line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return RawRecord(path, where, None, f"malformed JSON ({e.msg}, column {e.colno})")
    if not isinstance(obj, dict):
        return RawRecord(path, where, None, f"not a JSON object (got {type(obj).__name__})")
    return RawRecord(path, where, obj)


def _read_jsonl(unit: WorkUnit) -> Iterator[RawRecord]:
    lines = _jsonl_lines(unit)
    try:
        for line_no, line in lines:
            yield _parse_line(unit.path, line_no, line)
    except UnreadableFrom as e:
        yield RawRecord(unit.path, f"line {e.line_no}", None, f"unreadable from here on ({e.cause})")


def _jsonl_lines(unit: WorkUnit) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every line of a JSON Lines unit; a stream that breaks off (a truncated
    or corrupt compressed file) raises UnreadableFrom(line number)."""
    if unit.kind != "jsonl" or (unit.start == 0 and unit.end is None):
        line_no = 0
        with open_text_stream(unit.path, unit.kind) as f:
            try:
                for line in f:
                    line_no += 1
                    yield line_no, line
            except Exception as e:  # noqa: BLE001 - a truncated or corrupt compressed stream
                raise UnreadableFrom(line_no + 1, e) from e
        return
    with open(unit.path, "rb") as f:
        if unit.start > 0:
            # The line holding byte start-1 belongs to the previous unit.
            f.seek(unit.start - 1)
            f.readline()
        pos = f.tell()
        line_no = _count_newlines(unit.path, pos)
        end = unit.end if unit.end is not None else float("inf")
        while pos < end:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            line_no += 1
            yield line_no, line


class UnreadableFrom(Exception):
    def __init__(self, line_no: int, cause: Exception):
        super().__init__(line_no, cause)
        self.line_no, self.cause = line_no, cause


# orjson reads an integer beyond 64 bits as a float, json as the integer: such a line is read by json.
_LONG_INTEGER = re.compile(rb"[0-9]{20}")


def _has_float(value) -> bool:
    """Whether a parsed record holds a float anywhere (checked before the slower search for long
    integers; a loop, not any() over a generator: it runs once per record)."""
    values = value.values() if type(value) is dict else value
    for v in values:
        t = type(v)
        if t is float or ((t is dict or t is list) and _has_float(v)):
            return True
    return False


def read_unit_records(unit: WorkUnit) -> Iterator[tuple[int, dict | RawRecord]]:
    """Every record of the unit, in file order, as (position, record): a good record is its dict
    (no RawRecord is made for it, the cost that matters on corpora of short documents), a bad one a
    RawRecord with its error. ``position`` is the line (JSON Lines) or row; ``locate`` makes the
    RawRecord of a good one when it must be reported. The same records and errors as ``read_unit``.
    JSON Lines are parsed by orjson, several times faster than json; a line orjson refuses goes
    through ``_parse_line``, so what json accepts (NaN, a BOM, lone surrogates) and every error
    message stay as they were; so does a line with an integer beyond 64 bits (orjson: a float)."""
    if unit.kind in ("parquet", "arrow"):
        for raw in read_unit(unit):
            yield int(raw.location.split()[1]), (raw.record if raw.error is None else raw)
        return
    import orjson

    loads, JSONDecodeError = orjson.loads, orjson.JSONDecodeError  # noqa: N806
    lines = _jsonl_lines(unit)
    try:
        for line_no, line in lines:
            try:
                obj = loads(line)
            except JSONDecodeError:
                obj = None
            if type(obj) is dict and not (_has_float(obj) and _LONG_INTEGER.search(line)):
                yield line_no, obj
            else:
                raw = _parse_line(unit.path, line_no, line)
                yield line_no, (raw.record if raw.error is None else raw)
    except UnreadableFrom as e:
        yield e.line_no, RawRecord(unit.path, f"line {e.line_no}", None, f"unreadable from here on ({e.cause})")


def locate(unit: WorkUnit, position: int) -> str:
    """Where record ``position`` of ``unit`` is, as ``read_unit`` names it: "line 12", "row 7"."""
    return f"{'row' if unit.kind in ('parquet', 'arrow') else 'line'} {position}"


def _read_parquet(unit: WorkUnit) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    groups = list(range(unit.start, unit.end if unit.end is not None else pf.metadata.num_row_groups))
    row = sum(pf.metadata.row_group(i).num_rows for i in range(unit.start))
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=2048, row_groups=groups):
        for rec in batch.to_pylist():
            row += 1
            yield RawRecord(unit.path, f"row {row}", rec)


def _read_arrow(unit: WorkUnit) -> Iterator[RawRecord]:
    import pyarrow as pa

    row = 0
    with pa.memory_map(unit.path) as source:
        for batch in pa.ipc.open_stream(source):
            for rec in batch.to_pylist():
                row += 1
                yield RawRecord(unit.path, f"row {row}", rec)


def read_unit(unit: WorkUnit) -> Iterator[RawRecord]:
    """Every record of the unit, in file order, each with its location or its read error."""
    if unit.kind == "parquet":
        return _read_parquet(unit)
    if unit.kind == "arrow":
        return _read_arrow(unit)
    return _read_jsonl(unit)


def read_records(inputs: list[str]) -> Iterator[RawRecord]:
    """All records of all inputs in order (single process; for previews and tests)."""
    for unit in split_into_units(expand_inputs(inputs)):
        yield from read_unit(unit)
