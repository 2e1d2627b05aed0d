"""Any Megatron checkpoint of the engine (any TP/PP, with or without optimizer state) or of the
importer -> a Hugging Face Llama folder. Needs only paths: the model comes from ellama_config.yaml
beside the checkpoints, the tokenizer from the converted base model the run started from."""

from __future__ import annotations

import json
from pathlib import Path

from ellama_megatron.convert import mapping as M
from ellama_megatron.convert.hf_checkpoint import ConversionError
from ellama_megatron.convert.hf_writer import MAX_SHARD_BYTES, ShardedWriter
from ellama_megatron.llama.hf import generation_config_dict, hf_config_dict
from ellama_megatron.convert.importer import CONFIG_FILE, HF_FILES_DIR, carry_hf_files, read_record
from ellama_megatron.convert.output_folder import refuse_existing, staged_output
from ellama_megatron.convert.summary import Summary
from ellama_megatron.convert.torch_dist import CheckpointReader, find_checkpoint
from ellama_megatron.llama.config import LlamaConfig


def checkpoint_root(ckpt: Path) -> Path:
    """The folder holding ellama_config.yaml: ``ckpt`` or, for an iter_*/release folder, its parent."""
    if (ckpt / CONFIG_FILE).exists() or not (ckpt.parent / CONFIG_FILE).exists():
        return ckpt
    return ckpt.parent


def tokenizer_source(root: Path, record: dict) -> Path | None:
    """Where the tokenizer files are: the import's hf/ folder, the run's init_from import, or
    data.tokenizer_dir of the run."""
    candidates = [root / HF_FILES_DIR]
    init_from = (record.get("checkpoint") or {}).get("init_from")
    if init_from:
        candidates.append(Path(init_from) / HF_FILES_DIR)
    tok_dir = (record.get("data") or {}).get("tokenizer_dir")
    if tok_dir:
        candidates.append(Path(tok_dir))
    return next((c for c in candidates if (c / "tokenizer.json").exists() or (c / "tokenizer.model").exists()), None)


def export_hf(ckpt: Path, out: Path, iteration: int | None = None, overwrite: bool = False,
              max_shard_bytes: int = MAX_SHARD_BYTES, quiet: bool = False) -> dict:
    refuse_existing(out, overwrite)
    root = checkpoint_root(ckpt)
    record = read_record(root)
    cfg = LlamaConfig.from_dict(record["model"], str(root / CONFIG_FILE))
    reader = CheckpointReader(find_checkpoint(ckpt, iteration))

    rows = []  # (mapping, dtype, Hugging Face shapes)
    for m in M.mappings(cfg):
        md = reader.tensor_metadata(m.megatron)
        shape = tuple(md.size)[1:] if m.per_layer else tuple(md.size)
        if m.per_layer and md.size[0] != cfg.num_layers:
            raise ConversionError(f"{reader.folder}: {m.megatron} has {md.size[0]} layers, "
                                  f"{root / CONFIG_FILE} says num_layers={cfg.num_layers}")
        rows.append((m, md.properties.dtype, m.kind.hf_shapes(cfg, shape)))
    # Layer by layer, in Hugging Face's order (embeddings, layers, norm, head), so that only one
    # layer's tensors are ever in hand and the shards read like Meta's.
    plan = []  # (mapping, layer, [(hf name, dtype, shape)])
    steps = [(r, None) for r in rows if not r[0].per_layer and "embedding" in r[0].megatron]
    steps += [(r, layer) for layer in range(cfg.num_layers) for r in rows if r[0].per_layer]
    steps += [(r, None) for r in rows if not r[0].per_layer and "embedding" not in r[0].megatron]
    for (m, dtype, shapes), layer in steps:
        plan.append((m, layer, [(n, dtype, s) for n, s in zip(m.hf_names(layer), shapes)]))
    expected = M.hf_shapes(cfg)
    for _, _, outputs in plan:
        for name, _, shape in outputs:
            if tuple(shape) != expected[name]:
                raise ConversionError(f"{reader.folder}: {name} would get shape {tuple(shape)}, the model config "
                                      f"in {root / CONFIG_FILE} implies {expected[name]}")
    tensor_list = [o for _, _, outs in plan for o in outs]
    dtype = tensor_list[0][1]

    config_json = hf_config_dict(cfg, dtype)
    with staged_output(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, tensor_list, max_shard_bytes)
        summary = Summary("export", writer.total_size, quiet=quiet)
        for m, layer, outputs in plan:
            tensors = m.kind.to_hf(cfg, reader.read(m.megatron, layer))
            for (name, _, _), t in zip(outputs, tensors):
                writer.write(name, t)
                summary.add(t.numel() * t.element_size())
            del tensors
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        tok = tokenizer_source(root, record)
        carried = carry_hf_files(tok, tmp) if tok is not None else []
        if "generation_config.json" not in carried:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config_dict(cfg), indent=2) + "\n")
        stats = summary.close()
        stats["shards"] = len(writer.files)
        stats["tokenizer"] = "carried" if any(c.startswith("tokenizer") for c in carried) else "not found"
    return stats
