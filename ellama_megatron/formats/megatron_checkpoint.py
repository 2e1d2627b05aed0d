"""Megatron checkpoints: found, read and written one tensor at a time without building a model, and
the record (model config and provenance) kept beside them.

A Megatron save folder holds ``latest_checkpointed_iteration.txt`` (which checkpoint to load) and one
folder per checkpoint (``iter_0000100``, or ``release`` for weights without training state). Each
is a torch_dist checkpoint: a PyTorch Distributed Checkpoint (``.metadata`` + ``__0_0.distcp``)
whose keys are Megatron's sharded keys, plus ``metadata.json`` naming the backend; Megatron's
non-tensor state sits in the ``common_state`` byte object. Writing goes through torch's own
FileSystemWriter with a planner whose items are produced on demand, so one process writes the whole
(global, TP=1) model holding one tensor at a time; Megatron's loader cuts global tensors into any
TP/PP layout, so such a checkpoint starts runs of any parallel layout. Reading asks the same reader
for one layer's slice of a stacked key, whatever TP/PP wrote it.

Beside the checkpoints, ``checkpoint_record.yaml`` says what they are: a ``model`` section (the Llama
config) and how they were made (a run's whole config, or the import's / merge's options). Export,
merge and evaluation need nothing else to read them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
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
from torch.distributed._shard._utils import narrow_tensor_by_index

from ellama_megatron.formats.atomic import write_text_atomic
from ellama_megatron.formats.hf_folder import has_tokenizer, is_hf_folder

TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron's pointer to the checkpoint to load
RELEASE_DIR = "release"                             # Megatron loads it with iteration 0, no optimizer
BACKEND_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
COMMON_STATE_KEY = "common_state/shard_0_1"         # ShardedObject("common_state", ..., (1,), (0,)).unique_key
CHECKPOINT_VERSION = 3.0                            # Megatron's current layout (no QKV reordering on load)


@dataclass(frozen=True)
class TensorChunk:
    """One chunk of a global tensor, produced when the writer reaches it."""
    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @classmethod
    def of(cls, key: str, global_shape: tuple[int, ...], dtype: torch.dtype, layer: int | None,
           produce: Callable[[], torch.Tensor]) -> "TensorChunk":
        """The whole tensor (``layer`` None), or one layer of a stacked per-layer key, whose
        ``produce`` returns it without the layer dimension (what CheckpointReader.read gives back)."""
        global_shape = tuple(global_shape)
        if layer is None:
            return cls(key, global_shape, (0,) * len(global_shape), global_shape, dtype, produce)
        return cls(key, global_shape, (layer,) + (0,) * (len(global_shape) - 1), (1,) + global_shape[1:], dtype,
                   lambda: produce().unsqueeze(0))


class _OnDemandSavePlanner(DefaultSavePlanner):
    def __init__(self, chunks: list[TensorChunk], objects: dict[str, Any], on_written: Callable[[int], None]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, tuple(c.offset)): c for c in chunks}
        self._objects = objects
        self._on_written = on_written

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

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save([self._objects[write_item.index.fqn]], buf)  # Megatron saves a list of shard objects
            buf.seek(0)
            return buf
        chunk = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = chunk.produce()
        if tuple(tensor.shape) != tuple(chunk.shape) or tensor.dtype != chunk.dtype:
            raise AssertionError(f"{chunk.key}@{chunk.offset}: produced {tensor.dtype}{tuple(tensor.shape)}, "
                                 f"planned {chunk.dtype}{chunk.shape}")
        self._on_written(tensor.numel() * tensor.element_size())
        return tensor.contiguous()


def write_checkpoint(folder: Path, chunks: list[TensorChunk], objects: dict[str, Any], common: dict,
                     on_written: Callable[[int], None] = lambda n: None) -> None:
    """Write a torch_dist checkpoint into the existing empty ``folder``."""
    objects = {**objects, COMMON_STATE_KEY: common}
    writer = FileSystemWriter(str(folder), single_file_per_rank=True, thread_count=1, sync_files=True)
    planner = _OnDemandSavePlanner(chunks, objects, on_written)
    try:
        torch.distributed.checkpoint.save({}, storage_writer=writer, planner=planner, no_dist=True)
    except CheckpointException as e:
        # torch wraps the reading/converting error with its traceback text; raise the error itself.
        exc, _trace = next(iter(e.failures.values()))
        raise exc from None
    (folder / "metadata.json").write_text(json.dumps(BACKEND_METADATA))


def megatron_layout(root: Path) -> Path:
    """Mark ``root`` as a Megatron checkpoint folder whose only checkpoint is ``release/``."""
    (root / TRACKER_FILE).write_text(RELEASE_DIR)
    return root / RELEASE_DIR


class _CachedMetadataReader(FileSystemReader):
    """Reads ``.metadata`` once (it lists every optimizer chunk too; large for big runs)."""

    def __init__(self, path: str):
        super().__init__(path)
        self._metadata = None

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


class CheckpointReader:
    """Global tensors (or one layer of a stacked key) from a torch_dist checkpoint, any TP/PP."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._reader = _CachedMetadataReader(str(folder))
        self.metadata = self._reader.read_metadata()

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
        planner = _SlicePlanner(key, offsets, sizes, dest)
        torch.distributed.checkpoint.load({key: dest}, storage_reader=self._reader, planner=planner, no_dist=True)
        return dest[0] if layer is not None else dest

    def common_state(self) -> dict:
        buf: dict[str, Any] = {COMMON_STATE_KEY: io.BytesIO()}
        torch.distributed.checkpoint.load(buf, storage_reader=self._reader, no_dist=True)
        data = buf[COMMON_STATE_KEY]
        if isinstance(data, io.BytesIO):
            data.seek(0)
            data = torch.load(data, weights_only=False)
        return data[0]


# --- finding a checkpoint and its record ------------------------------------------------------

RECORD_FILE = "checkpoint_record.yaml"
# What the record was called before it had a name of its own (it shared it with the run config):
# folders written then are still read.
OLD_RECORD_FILE = "ellama_config.yaml"
HF_FILES_DIR = "hf"  # beside an import's or merge's checkpoint: the tokenizer and generation files


class CheckpointFormatError(ValueError):
    """A folder is not the Megatron checkpoint it should be; the message names the file and the fix."""


def is_checkpoint_folder(path: Path) -> bool:
    """One torch_dist checkpoint (an ``iter_*`` or ``release`` folder), not a save folder."""
    return (path / ".metadata").exists() and ((path / "metadata.json").exists() or (path / "common.pt").exists())


def is_megatron_checkpoint(path: str | Path) -> bool:
    """A Megatron save folder (``latest_checkpointed_iteration.txt`` / ``iter_*``) or one checkpoint in it."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / TRACKER_FILE).exists() or any(p.glob("iter_[0-9]*")) or is_checkpoint_folder(p)


def folder_kind(path: str | Path, role: str) -> str:
    """'hf' or 'megatron' for a model given on a command line as ``role``; anything else is
    refused here, before any work."""
    p = Path(path)
    if not p.exists():
        raise CheckpointFormatError(f"{role} {p}: does not exist")
    if is_megatron_checkpoint(p):
        return "megatron"
    if is_hf_folder(p):
        return "hf"
    raise CheckpointFormatError(
        f"{role} {p}: neither a Hugging Face model folder (no config.json) nor a Megatron checkpoint "
        "(no latest_checkpointed_iteration.txt, iter_* or torch_dist .metadata); give a save_pretrained "
        "folder, a run's checkpoints/ folder, a tools/convert_hf.py import output or one iter_* folder in them"
    )


def record_path(root: Path) -> Path:
    """The record in ``root``: its current name, or the old one in folders written before."""
    path = root / RECORD_FILE
    old = root / OLD_RECORD_FILE
    return old if not path.exists() and old.exists() else path


def checkpoint_root(ckpt: Path) -> Path:
    """The folder holding the record: ``ckpt`` or, for an iter_*/release folder, its parent."""
    if record_path(ckpt).exists() or not record_path(ckpt.parent).exists():
        return ckpt
    return ckpt.parent


def read_record(root: Path) -> dict:
    path = record_path(root)
    if not path.exists():
        raise CheckpointFormatError(
            f"{path}: missing (nor the older {OLD_RECORD_FILE}); the checkpoint folder must hold the record "
            "that recipes/cpt.py, tools/convert_hf.py import or tools/merge.py writes")
    record = yaml.safe_load(path.read_text())
    if not isinstance(record, dict) or "model" not in record:
        raise CheckpointFormatError(f"{path}: has no 'model' section")
    return record


def write_record(root: Path, record: dict) -> Path:
    """``record`` (a ``model`` section and how the checkpoints were made) as ``root``'s record."""
    return write_text_atomic(root / RECORD_FILE, yaml.safe_dump(record, sort_keys=False))


def find_checkpoint(root: Path, iteration: int | None = None) -> Path:
    """The torch_dist folder in a Megatron checkpoint folder: ``--iteration`` or the tracker's one;
    ``root`` may also be that folder itself."""
    if is_checkpoint_folder(root) and iteration is None:
        return root
    if iteration is not None:
        folder = root / f"iter_{iteration:07d}"
        if not folder.is_dir():
            found = sorted(p.name for p in root.glob("iter_*")) + ([RELEASE_DIR] if (root / RELEASE_DIR).is_dir() else [])
            raise FileNotFoundError(f"{folder}: no checkpoint for --iteration {iteration}; found {found}")
        return folder
    tracker = root / TRACKER_FILE
    if not tracker.exists():
        raise FileNotFoundError(f"{tracker}: missing; --ckpt must be a Megatron checkpoint folder "
                                "(the run's checkpoints/ or a tools/convert_hf.py import output)")
    text = tracker.read_text().strip()
    folder = root / (RELEASE_DIR if text == RELEASE_DIR else f"iter_{int(text):07d}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{tracker} points to {folder.name}, which does not exist")
    return folder


@dataclass(frozen=True)
class LocatedCheckpoint:
    root: Path    # the folder holding the record
    folder: Path  # the torch_dist folder to read (release/ or iter_*)
    record: dict


def locate(path: Path, iteration: int | None = None) -> LocatedCheckpoint:
    """A save folder (or one checkpoint in it) -> its record and the checkpoint to read.
    Raises CheckpointFormatError without a record, FileNotFoundError without that checkpoint."""
    path = Path(path)
    root = checkpoint_root(path)
    record = read_record(root)  # first: a folder without one is no checkpoint of ours at all
    return LocatedCheckpoint(root, find_checkpoint(path, iteration), record)


def tokenizer_source(root: Path, record: dict) -> Path | None:
    """Where the checkpoint's tokenizer files are: the import's or merge's hf/ folder, the run's
    init_from import, or data.tokenizer_dir of the run."""
    candidates = [root / HF_FILES_DIR]
    init_from = (record.get("checkpoint") or {}).get("init_from")
    if init_from:
        candidates.append(Path(init_from) / HF_FILES_DIR)
    tok_dir = (record.get("data") or {}).get("tokenizer_dir")
    if tok_dir:
        candidates.append(Path(tok_dir))
    return next((c for c in candidates if has_tokenizer(c)), None)
