"""Any Megatron checkpoint of the engine (any TP/PP, with or without optimizer state) or of the
importer -> a Hugging Face Llama folder. Needs only paths: the model comes from the checkpoint
record beside the checkpoints, the tokenizer from the converted base model the run started from."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ellama_megatron.convert.hf_checkpoint import ConversionError
from ellama_megatron.convert.output_folder import refuse_existing
from ellama_megatron.convert.summary import Summary
from ellama_megatron.formats.atomic import staged_output
from ellama_megatron.formats.file_ranges import FileRange
from ellama_megatron.formats.hf_folder import carry_hf_files, is_hf_folder, read_config
from ellama_megatron.formats.hf_shards import MAX_SHARD_BYTES, ShardedWriter
from ellama_megatron.formats.megatron_checkpoint import CheckpointFormatError, locate, record_path, tokenizer_source
from ellama_megatron.formats.prefetch import AHEAD_BYTES, ordered_map, parallel_work
from ellama_megatron.formats.torch_dist import CheckpointReader
from ellama_megatron.llama import weights as W
from ellama_megatron.llama.config import LlamaConfig
from ellama_megatron.llama.hf import generation_config_dict, hf_config_dict, same_architecture

if TYPE_CHECKING:
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata


def export_hf(
    ckpt: Path,
    out: Path,
    iteration: int | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    quiet: bool = False,
) -> dict:
    refuse_existing(out, overwrite)
    try:
        found = locate(ckpt, iteration)
    except CheckpointFormatError as e:
        raise ConversionError(str(e)) from None
    cfg = LlamaConfig.from_dict(found.record["model"], str(record_path(found.root)))
    reader = CheckpointReader(found.folder)
    return write_hf_folder(
        cfg,
        found.root,
        found.record,
        reader.tensor_metadata,
        reader.read,
        reader.folder,
        out,
        max_shard_bytes,
        quiet,
        byte_ranges=reader.byte_ranges,
    )


def write_hf_folder(
    cfg: LlamaConfig,
    root: Path,
    record: dict,
    tensor_metadata: Callable[[str], TensorStorageMetadata],
    read: Callable[[str, int | None], torch.Tensor],
    source: Path,
    out: Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    quiet: bool = False,
    what: str = "export",
    byte_ranges: Callable[[str, int | None, tuple[int, int]], list[FileRange] | None] | None = None,
) -> dict:
    """The Hugging Face folder of the Megatron tensors ``read(key, layer)`` gives (their global
    shapes and dtypes from ``tensor_metadata(key)``), with the tokenizer and config of the
    checkpoint folder ``root`` and its ``record``: what export writes for a checkpoint, and the
    checkpoint average for the average it computes. ``source`` names the tensors in errors.

    With ``byte_ranges(key, layer, rows)`` (where a stored tensor's rows lie on disk, or None),
    every Hugging Face tensor whose rows (``Mapping.hf_rows``) lie on disk as plain bytes is copied
    from file to file in the kernel, as ``cp`` copies (formats/file_ranges.py), instead of read into
    memory and written out: an export of an importer or engine checkpoint at TP=1 copies all of them."""
    rows = {}  # Megatron name -> (dtype, Hugging Face shapes, its shape: one layer's for per-layer rows)
    for m in W.mappings(cfg):
        md = tensor_metadata(m.megatron)
        shape = tuple(md.size)[1:] if m.per_layer else tuple(md.size)
        if m.per_layer and md.size[0] != cfg.num_layers:
            raise ConversionError(
                f"{source}: {m.megatron} has {md.size[0]} layers, {record_path(root)} says num_layers={cfg.num_layers}"
            )
        rows[m.megatron] = (md.properties.dtype, m.hf_shapes(cfg, shape), shape)
    # Layer by layer, in Hugging Face's order (embeddings, layers, norm, head), so that only one
    # layer's tensors are ever in hand and the shards read like Meta's.
    plan = []  # (mapping, layer, [(hf name, dtype, shape)])
    for m, layer in W.hf_order(cfg):
        dtype, shapes, _ = rows[m.megatron]
        plan.append((m, layer, [(n, dtype, s) for n, s in zip(m.hf_names(layer), shapes)]))
    expected = W.hf_shapes(cfg)
    for _, _, outputs in plan:
        for name, _, shape in outputs:
            if tuple(shape) != expected[name]:
                raise ConversionError(
                    f"{source}: {name} would get shape {tuple(shape)}, the model config "
                    f"in {record_path(root)} implies {expected[name]}"
                )
    tensor_list = [o for _, _, outs in plan for o in outs]
    dtype = tensor_list[0][1]

    # The files the import kept beside the checkpoint (or beside the run's init_from): the tokenizer,
    # and the source's config.json, whose keys the export keeps while the architecture is unchanged.
    hf_files = tokenizer_source(root, record)
    source_config = read_config(hf_files) if hf_files is not None and is_hf_folder(hf_files) else None
    config_json = hf_config_dict(cfg, dtype, source_config)

    def on_disk(m: W.Mapping, layer: int | None) -> list[list[FileRange]] | None:
        """Each Hugging Face tensor of the row as the file ranges of its rows, or None when some
        rows are not plain bytes on disk."""
        out = []
        for hf_rows in m.hf_rows(cfg, rows[m.megatron][2]):
            out.append([])
            for r in hf_rows:
                found = byte_ranges(m.megatron, layer, r)
                if found is None:
                    return None
                out[-1] += found
        return out

    def produce(step) -> list:  # on worker threads, ahead of the writer: tensors, or where their bytes are
        m, layer, _ = step
        ranges = on_disk(m, layer) if byte_ranges is not None else None
        return ranges if ranges is not None else m.to_hf(cfg, read(m.megatron, layer))

    def nbytes(step) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in step[2])

    with staged_output(out) as tmp, parallel_work():
        writer = ShardedWriter(tmp, tensor_list, max_shard_bytes)
        summary = Summary(what, writer.total_size, quiet=quiet)
        copied = 0
        for (_, _, outputs), produced in zip(plan, ordered_map(produce, plan, cost=nbytes, budget=AHEAD_BYTES)):
            for (name, dtype, shape), t in zip(outputs, produced):
                if isinstance(t, list):  # file ranges
                    writer.copy(name, t)
                    copied += 1
                else:
                    writer.write(name, t)
                summary.add(math.prod(shape) * dtype.itemsize)
            del produced
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        carried = carry_hf_files(hf_files, tmp) if hf_files is not None else []
        if "generation_config.json" not in carried:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config_dict(cfg), indent=2) + "\n")
        stats = summary.close()
        stats["shards"] = len(writer.files)
        stats["copied_tensors"] = copied  # copied from file to file, not read into memory
        stats["tokenizer"] = "carried" if any(c.startswith("tokenizer") for c in carried) else "not found"
        stats["config"] = "source" if source_config is not None and same_architecture(cfg, source_config) else "rebuilt"
    return stats
