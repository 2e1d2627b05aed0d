"""Megatron torch_dist checkpoints written and read one tensor at a time, without building a model.

A torch_dist checkpoint (one ``iter_*`` or ``release`` folder of a Megatron save folder, see
megatron_checkpoint.py) is a PyTorch Distributed Checkpoint (``.metadata`` + ``__0_0.distcp``) whose
keys are Megatron's sharded keys, plus ``metadata.json`` naming the backend; Megatron's non-tensor
state sits in the ``common_state`` byte object. Writing goes through torch's own FileSystemWriter
with a planner whose items are produced on demand (on worker threads, at most ``AHEAD_BYTES``
ahead of the writer), so one process writes the whole (global, TP=1) model holding a few tensors
at a time; Megatron's loader cuts global tensors into any TP/PP layout, so such a checkpoint starts
runs of any parallel layout. Reading asks the same reader for one layer's slice of a stacked key,
whatever TP/PP wrote it (one reader per thread, so slices can be read on several at once), or
where rows of it lie in the ``.distcp`` files as plain bytes (``CheckpointReader.byte_ranges``:
what reads land in place through, and what the export copies from file to file).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import pickle
import struct
import threading
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ellama_megatron.formats.file_ranges import FileRange, read_ranges
from ellama_megatron.formats.hf_folder import carry_hf_files
from ellama_megatron.formats.megatron_checkpoint import HF_FILES_DIR, megatron_layout, write_record
from ellama_megatron.formats.prefetch import AHEAD_BYTES, ordered_map, parallel_work

BACKEND_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
COMMON_STATE_KEY = "common_state/shard_0_1"  # ShardedObject("common_state", ..., (1,), (0,)).unique_key
CHECKPOINT_VERSION = 3.0  # Megatron's current layout (no QKV reordering on load)


@dataclass(frozen=True)
class TensorChunk:
    """One chunk of a global tensor, produced when the writer reaches it."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(
        cls,
        key: str,
        global_shape: tuple[int, ...],
        dtype: torch.dtype,
        layer: int | None,
        produce: Callable[[], torch.Tensor],
    ) -> TensorChunk:
        """The whole tensor (``layer`` None), or one layer of a stacked per-layer key, whose
        ``produce`` returns it without the layer dimension (what CheckpointReader.read gives back)."""
        global_shape = tuple(global_shape)
        if layer is None:
            return cls(key, global_shape, (0,) * len(global_shape), global_shape, dtype, produce)
        return cls(
            key,
            global_shape,
            (layer,) + (0,) * (len(global_shape) - 1),
            (1,) + global_shape[1:],
            dtype,
            lambda: produce().unsqueeze(0),
        )


class _OnDemandSavePlanner(DefaultSavePlanner):
    """Hands torch's writer each tensor when it reaches it. The tensors are produced (read,
    converted, merged) on worker threads ahead of the writer, in the order it will ask for them
    (the final plan's), at most ``AHEAD_BYTES`` of them at once."""

    def __init__(self, chunks: list[TensorChunk], objects: dict[str, Any], on_written: Callable[[int], None]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, tuple(c.offset)): c for c in chunks}
        self._objects = objects
        self._on_written = on_written
        self._ahead: deque | None = None  # keys the workers produce, in the writer's order
        self._produced: Iterator[torch.Tensor] | None = None

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offset)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offset), sizes=torch.Size(c.shape)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self._chunks.values()
        ]
        items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self._objects]
        self.plan = SavePlan(items)
        return self.plan

    def _start_producing(self) -> None:
        order = [(i.index.fqn, tuple(i.index.offset)) for i in self.plan.items if i.type != WriteItemType.BYTE_IO]
        self._ahead = deque(order)
        self._produced = ordered_map(
            lambda key: self._chunks[key].produce(),
            order,
            cost=lambda key: self._chunks[key].nbytes,
            budget=AHEAD_BYTES,
        )

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save([self._objects[write_item.index.fqn]], buf)  # Megatron saves a list of shard objects
            buf.seek(0)
            return buf
        key = (write_item.index.fqn, tuple(write_item.index.offset))
        chunk = self._chunks[key]
        if self._ahead is None:
            self._start_producing()
        if self._ahead and self._ahead[0] == key:
            self._ahead.popleft()
            tensor = next(self._produced)
        else:  # torch asked out of the plan's order: stop producing ahead, produce on demand
            if self._produced is not None:
                self._produced.close()
            self._ahead, self._produced = deque(), None
            tensor = chunk.produce()
        if tuple(tensor.shape) != tuple(chunk.shape) or tensor.dtype != chunk.dtype:
            raise AssertionError(
                f"{chunk.key}@{chunk.offset}: produced {tensor.dtype}{tuple(tensor.shape)}, "
                f"planned {chunk.dtype}{chunk.shape}"
            )
        self._on_written(tensor.numel() * tensor.element_size())
        return tensor.contiguous()

    def close(self) -> None:
        if self._produced is not None:
            self._produced.close()


def write_checkpoint(
    folder: Path,
    chunks: list[TensorChunk],
    objects: dict[str, Any],
    common: dict,
    on_written: Callable[[int], None] = lambda n: None,
) -> None:
    """Write a torch_dist checkpoint into the existing empty ``folder``."""
    objects = {**objects, COMMON_STATE_KEY: common}
    writer = FileSystemWriter(str(folder), single_file_per_rank=True, thread_count=1, sync_files=True)
    planner = _OnDemandSavePlanner(chunks, objects, on_written)
    try:
        with _without_crc32(), parallel_work():
            torch.distributed.checkpoint.save({}, storage_writer=writer, planner=planner, no_dist=True)
    except CheckpointException as e:
        # torch wraps the reading/converting error with its traceback text; raise the error itself.
        exc, _trace = next(iter(e.failures.values()))
        raise exc from None
    finally:
        planner.close()
    (folder / "metadata.json").write_text(json.dumps(BACKEND_METADATA))


@contextlib.contextmanager
def _without_crc32():
    """torch.save (which writes each tensor into the .distcp) skips the zip records' CRC-32: it
    is one more pass over every byte (measured: torch.save of a 64 MB tensor 0.17 s with it, 0.10 s
    without), and torch.load, through which Megatron's loader reads, does not check it."""
    from torch.utils.serialization import config

    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


def extra_state_objects(modules: tuple[str, ...], num_layers: int) -> dict[str, None]:
    """The ``_extra_state`` objects Megatron checkpoints for each layer of ``modules`` (empty for a
    checkpoint written here; a load fails on any that is missing)."""
    return {
        f"decoder.layers.{mod}._extra_state/shard_{layer}_{num_layers}": None
        for layer in range(num_layers)
        for mod in modules
    }


def write_release(
    root: Path,
    chunks: list[TensorChunk],
    objects: dict[str, Any],
    record: dict,
    hf_files_from: Path | None = None,
    hf_extra: tuple[str, ...] = (),
    on_written: Callable[[int], None] = lambda n: None,
) -> None:
    """A weights-only checkpoint folder in the empty ``root``, what the import and the Megatron
    merge write: the tracker naming ``release/`` (Megatron loads it as iteration 0, no optimizer
    state), the tensors there, the record, and the tokenizer and generation files (plus
    ``hf_extra``) of ``hf_files_from`` under ``hf/``."""
    dist_dir = megatron_layout(root)
    dist_dir.mkdir()
    write_checkpoint(dist_dir, chunks, objects, {"iteration": 0, "checkpoint_version": CHECKPOINT_VERSION}, on_written)
    write_record(root, record)
    if hf_files_from is not None:
        carry_hf_files(hf_files_from, root / HF_FILES_DIR, extra=hf_extra)


class _CachedMetadataReader(FileSystemReader):
    """Reads ``.metadata`` once (it lists every optimizer chunk too; large for big runs)."""

    def __init__(self, path: str, metadata=None):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _SlicePlanner(DefaultLoadPlanner):
    """Reads the region ``offsets``/``sizes`` of ``key`` into ``dest`` (a plain tensor of that size)."""

    def __init__(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dest: torch.Tensor):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._key, self._offsets, self._sizes, self._dest = key, offsets, sizes, dest

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self._key]
        chunk = ChunkStorageMetadata(offsets=torch.Size(self._offsets), sizes=torch.Size(self._sizes))
        return LoadPlan(create_read_items_for_chunk_list(self._key, md, [chunk]))

    def resolve_tensor(self, read_item):
        # dest_offsets are relative to our chunk; the default looks the chunk up by global offset.
        return narrow_tensor_by_index(self._dest, read_item.dest_offsets, read_item.lengths)


class _FileSlice(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a file of their own (for zipfile)."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = (0, self.pos, self.length)[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


# The storage class names torch.save records for each dtype; a dtype not here is read by torch's reader.
_STORAGE_NAMES = {
    torch.bfloat16: "BFloat16Storage",
    torch.float16: "HalfStorage",
    torch.float32: "FloatStorage",
    torch.float64: "DoubleStorage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
    torch.int16: "ShortStorage",
    torch.int8: "CharStorage",
    torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
}


class _TensorLayout(pickle.Unpickler):
    """Unpickles the ``data.pkl`` torch.save writes for one tensor into (storage id, storage offset,
    size, stride), loading no data and building nothing else; anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name.endswith("Storage"):
            return name  # the legacy class's name (the class itself warns that it is deprecated)
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        return pid  # ("storage", storage class, key, location, elements)


def _zip_entry_start(f, start: int, entry: zipfile.ZipInfo) -> int:
    """The file offset of an uncompressed zip entry's bytes (after its local header)."""
    f.seek(start + entry.header_offset)
    header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return start + entry.header_offset + 30 + name_length + extra_length


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    """The strides torch gives a contiguous tensor of ``size``."""
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _stored_tensor_bytes(f, start: int, length: int, dtype: torch.dtype, shape: tuple[int, ...]) -> int | None:
    """The file offset of the bytes of the tensor torch.save wrote at [start, start + length) of
    ``f``, when they are exactly a plain tensor of ``dtype`` and ``shape`` (contiguous, the whole
    storage, uncompressed); None when not, or when the record is not what this expects."""
    try:
        archive = zipfile.ZipFile(_FileSlice(f, start, length))
        (pickled,) = [e for e in archive.infolist() if e.filename.endswith("/data.pkl")]
        if pickled.compress_type != zipfile.ZIP_STORED:
            return None
        f.seek(_zip_entry_start(f, start, pickled))
        storage, offset, size, stride = _TensorLayout(io.BytesIO(f.read(pickled.file_size))).load()
        kind, storage_class, key, _location, elements = storage
        data = archive.getinfo(f"{pickled.filename.rsplit('/', 1)[0]}/data/{key}")
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, TypeError, struct.error, EOFError):
        return None
    if (
        kind != "storage"
        or _STORAGE_NAMES.get(dtype) != storage_class
        or offset != 0
        or size != tuple(shape)
        or any(st != c for st, c, n in zip(stride, _contiguous_strides(size), size) if n != 1)  # torch's contiguity
        or elements != math.prod(shape)
        or data.compress_type != zipfile.ZIP_STORED
        or data.file_size != math.prod(shape) * dtype.itemsize
    ):
        return None
    return _zip_entry_start(f, start, data)


def _flat_start(offsets, lengths, sizes) -> int | None:
    """The element index where the region ``offsets``/``lengths`` of a row-major array of
    ``sizes`` starts, when the region is one run of consecutive elements (leading dims of length
    one, then one dim cut anywhere, then whole dims); None when it is not, or is empty."""
    cut = next((d for d, n in enumerate(lengths) if n != 1), len(lengths))
    if any(n == 0 for n in lengths) or any(
        o != 0 or n != size for o, n, size in zip(offsets[cut + 1 :], lengths[cut + 1 :], sizes[cut + 1 :])
    ):
        return None
    return sum(o * stride for o, stride in zip(offsets, _contiguous_strides(tuple(sizes))))


class CheckpointReader:
    """Global tensors (or one layer of a stacked key) from a torch_dist checkpoint, any TP/PP."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._reader = _CachedMetadataReader(str(folder))
        self._local = threading.local()  # a reader per thread: reads may run on several at once
        self.in_place_reads = 0  # reads that went straight into the destination (``_read_in_place``)
        self._chunk_data: dict[MetadataIndex, FileRange | None] = {}  # ``_chunk_bytes``
        # torch unpickles .metadata (a format limitation: Megatron checkpoints must be trusted).
        try:
            self.metadata = self._reader.read_metadata()
        except (EOFError, pickle.UnpicklingError, AttributeError, ImportError, IndexError) as e:
            raise ValueError(
                f"{Path(folder) / '.metadata'}: unreadable, truncated or not written by torch "
                f"({type(e).__name__}: {e}); copy the checkpoint again or save it again"
            ) from None

    def tensor_metadata(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"{self.folder}: no tensor {key!r} in the checkpoint; is it a Llama GPTModel checkpoint?")
        return md

    def read(self, key: str, layer: int | None = None) -> torch.Tensor:
        md = self.tensor_metadata(key)
        shape = tuple(md.size)
        if layer is None:
            offsets, sizes = (0,) * len(shape), shape
        else:
            offsets, sizes = (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:]
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        if self._read_in_place(key, layer, dest):
            self.in_place_reads += 1
            return dest[0] if layer is not None else dest
        planner = _SlicePlanner(key, offsets, sizes, dest)
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = _CachedMetadataReader(str(self.folder), self.metadata)
        try:
            torch.distributed.checkpoint.load({key: dest}, storage_reader=reader, planner=planner, no_dist=True)
        except (CheckpointException, EOFError, RuntimeError, OSError) as e:
            raise self._read_error(key, e) from None
        return dest[0] if layer is not None else dest

    def byte_ranges(
        self, key: str, layer: int | None = None, rows: tuple[int, int] | None = None
    ) -> list[FileRange] | None:
        """Where the bytes of ``key`` (its layer ``layer`` of a stacked key; only its rows ``rows``
        = [start, stop) of the first dim after the layer's) lie in the ``.distcp`` files, in
        row-major order, as file ranges; None when they do not lie there as plain bytes: a stored
        chunk cut across a row (a row-parallel layer's TP shards split the columns), one not saved
        as a plain contiguous tensor (``_stored_tensor_bytes``), a transformed one."""
        md = self.tensor_metadata(key)
        shape = tuple(md.size)
        lead = () if layer is None else (layer,)
        body = shape[len(lead) :]
        if not body:
            return None
        start, stop = rows if rows is not None else (0, body[0])
        offsets = lead + (start,) + (0,) * (len(body) - 1)
        sizes = (1,) * len(lead) + (stop - start,) + body[1:]
        itemsize = md.properties.dtype.itemsize
        wanted = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        pieces = []  # (element index in the region, file range)
        for item in create_read_items_for_chunk_list(key, md, [wanted]):
            stored = md.chunks[item.storage_index.index]
            at_source = _flat_start(item.storage_offsets, item.lengths, stored.sizes)
            at_dest = _flat_start(item.dest_offsets, item.lengths, sizes)
            data = self._chunk_bytes(item.storage_index, md.properties.dtype, tuple(stored.sizes))
            if at_source is None or at_dest is None or data is None:
                return None
            pieces.append(
                (at_dest, FileRange(data.path, data.offset + at_source * itemsize, math.prod(item.lengths) * itemsize))
            )
        pieces.sort(key=lambda p: p[0])
        covered = 0
        for at_dest, piece in pieces:
            if at_dest * itemsize != covered:
                return None
            covered += piece.length
        return [p for _, p in pieces] if covered == math.prod(sizes) * itemsize else None

    def _chunk_bytes(self, index: MetadataIndex, dtype: torch.dtype, shape: tuple[int, ...]) -> FileRange | None:
        """Where stored chunk ``index``'s elements lie, when saved as a plain tensor (looked up once)."""
        if index not in self._chunk_data:
            info = (self.metadata.storage_data or {}).get(index)
            found = None
            if info is not None and not getattr(info, "transform_descriptors", None):
                path = self.folder / info.relative_path
                with open(path, "rb") as f:
                    start = _stored_tensor_bytes(f, info.offset, info.length, dtype, shape)
                if start is not None:
                    found = FileRange(path, start, math.prod(shape) * dtype.itemsize)
            self._chunk_data[index] = found
        return self._chunk_data[index]

    def _read_in_place(self, key: str, layer: int | None, dest: torch.Tensor) -> bool:
        """Read ``key`` (its layer ``layer``) straight from the ``.distcp`` files into ``dest`` where
        its bytes lie there plainly (``byte_ranges``); False (``dest`` to be filled by torch's reader)
        otherwise. torch's reader unpickles each chunk into a tensor of its own and copies it into
        ``dest``: an allocation and a copy of every byte more (measured on the 0.95B model of
        benchmarks/merge_speed.py, every tensor read as the export reads them: 2.6 s and 3.0-3.4 s of
        CPU through torch's reader, 1.3-1.4 s and 1.3-1.4 s of CPU in place)."""
        ranges = self.byte_ranges(key, layer)
        if ranges is None:
            return False
        buffer = memoryview(dest.view(-1).view(torch.uint8).numpy())
        # Short (a truncated file): False, and torch's reader names the file (_read_error).
        return read_ranges(ranges, buffer) == len(buffer)

    def _read_error(self, key: str, error: BaseException) -> Exception:
        """A short error naming the data file that failed: a truncated ``.distcp`` (an interrupted
        copy) otherwise surfaces as a bare EOFError from inside torch's reader."""
        if isinstance(error, CheckpointException):
            error = next(iter(error.failures.values()))
            error = error[0] if isinstance(error, tuple) else error
        if isinstance(error, OSError) and not isinstance(error, EOFError) and error.errno is not None:
            return error  # a missing file or an I/O failure already names its path
        needed: dict[str, int] = {}
        for item in (self.metadata.storage_data or {}).values():
            name = str(item.relative_path)
            needed[name] = max(needed.get(name, 0), item.offset + item.length)
        for name, end in sorted(needed.items()):
            path = self.folder / name
            if not path.is_file():
                return ValueError(f"{path}: missing (needed for {key!r}); copy the whole checkpoint folder again")
            if path.stat().st_size < end:
                return ValueError(
                    f"{path}: truncated ({path.stat().st_size} bytes, the checkpoint's .metadata "
                    f"places data up to byte {end}); copy the checkpoint again"
                )
        return ValueError(
            f"{self.folder}: cannot read {key!r} ({type(error).__name__}: {error}); "
            "the checkpoint's .distcp files may be damaged: copy or save it again"
        )

    def common_state(self) -> dict:
        planner = _RawBytesPlanner()
        torch.distributed.checkpoint.load(
            {COMMON_STATE_KEY: io.BytesIO()}, storage_reader=self._reader, planner=planner, no_dist=True
        )
        # weights_only: never run code from a checkpoint's pickles ourselves; Megatron's own
        # training saves its arguments as an argparse.Namespace, the one class allowed besides
        # torch's plain types.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                data = torch.load(io.BytesIO(planner.raw[COMMON_STATE_KEY]), weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(
                    f"{self.folder}: common state holds objects that only unpickling with "
                    f"code execution could read; not loaded ({e})"
                ) from None
        return data[0]


class _RawBytesPlanner(DefaultLoadPlanner):
    """Keeps each byte object as read: torch's own planner unpickles them with weights_only=False."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.raw: dict[str, bytes] = {}

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.raw[read_item.dest_index.fqn] = value.read()
