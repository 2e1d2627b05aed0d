"""Grow a Hugging Face Llama checkpoint's input and output embeddings for new token ids.

Works on the safetensors shards directly: only the shards holding ``model.embed_tokens.weight`` or
``lm_head.weight`` are loaded and rewritten (one shard at a time, dtype kept); the others are copied.
A new token's row is the mean of the rows of the old tokens the old tokenizer splits its string into
(input rows from the input embedding, output rows from lm_head). Rows added only to pad the
vocabulary to a multiple (Megatron pads to make_vocab_size_divisible_by, 128 by default) get the
mean of all old rows: they are never produced by the tokenizer, and a mean output row gives them an
average logit instead of an arbitrary one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ellama_megatron.formats.hf_folder import HFFolder
from ellama_megatron.llama.weights import HF_EMBEDDING, HF_OUTPUT


def grow_rows(weight: torch.Tensor, new_size: int, sub_token_ids: dict[int, list[int]], old_rows: int) -> torch.Tensor:
    """``weight`` [old, hidden] -> [new_size, hidden]: old rows kept, new ids = mean of their
    sub-token rows, everything else (padding) = mean of the first ``old_rows`` rows. Means are
    computed in float32 and cast back."""
    if new_size < weight.shape[0]:
        raise ValueError(f"cannot shrink embeddings from {weight.shape[0]} to {new_size} rows")
    base = weight.float()
    out = base[:old_rows].mean(dim=0, keepdim=True).repeat(new_size, 1)
    out[: weight.shape[0]] = base
    # Rows beyond the tokenizer's ids that the checkpoint already had (padding) keep their values
    # unless a new token takes them.
    for new_id, parts in sub_token_ids.items():
        out[new_id] = base[parts].mean(dim=0)
    return out.to(weight.dtype)


def resize_checkpoint(
    hf_dir: Path,
    out_dir: Path,
    new_vocab_size: int,
    sub_token_ids: dict[int, list[int]],
    old_rows: int,
) -> dict:
    """Write ``out_dir``'s weights and config.json with ``new_vocab_size`` embedding rows.

    ``old_rows``: ids below this are the old tokenizer's (used for padding-row means). Returns a
    small summary (tensors resized, tied or not).
    """
    from safetensors.torch import load_file, save_file

    folder = HFFolder.open(hf_dir)
    config = folder.config()
    tied = bool(config.get("tie_word_embeddings", False))
    if HF_EMBEDDING not in folder.tensors:
        raise ValueError(f"{hf_dir}: no tensor {HF_EMBEDDING!r} in the checkpoint; is it a Llama model folder?")
    if not tied and HF_OUTPUT not in folder.tensors:
        raise ValueError(f"{hf_dir}: config.json says tie_word_embeddings=false but there is no {HF_OUTPUT!r}")
    for new_id in sub_token_ids:
        if new_id >= new_vocab_size:
            raise ValueError(f"new token id {new_id} does not fit vocab size {new_vocab_size}")

    resized = []
    touched = {folder.shard_of(n) for n in (HF_EMBEDDING, HF_OUTPUT) if n in folder.tensors}
    total_size = 0
    for shard in sorted(folder.shards):
        src, dst = hf_dir / shard, out_dir / shard
        if shard in touched:
            tensors = load_file(src)
            for name in (HF_EMBEDDING, HF_OUTPUT):
                if name in tensors:
                    tensors[name] = grow_rows(tensors[name], new_vocab_size, sub_token_ids, old_rows)
                    resized.append(name)
            save_file(tensors, dst, metadata={"format": "pt"})
            total_size += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        else:
            shutil.copy2(src, dst)
            total_size += sum(entry.nbytes for entry in folder.shard_tensors(shard))
    if folder.index_file:
        index = json.loads((hf_dir / folder.index_file).read_text())
        index.setdefault("metadata", {})["total_size"] = total_size
        (out_dir / folder.index_file).write_text(json.dumps(index, indent=2) + "\n")

    config["vocab_size"] = new_vocab_size
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"resized": resized, "tied": tied, "vocab_size": new_vocab_size}
