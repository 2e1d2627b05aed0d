"""Merge Megatron torch_dist checkpoints tensor by tensor, without exporting them first.

Each model tensor (one layer's slice of a stacked key) is read from every input with the
streaming torch_dist reader, merged, and handed to the on-demand torch_dist writer (both in
ellama_megatron.formats.torch_dist, the converter's too),
so one tensor group is in memory at a time. The merge happens in Hugging Face's tensor split
(fused QKV -> q, k, v; fc1 -> gate, up; vocab padding dropped): SLERP's per-tensor angle is then
the same as on the exported folders, and every method gives what exporting both inputs and
merging the Hugging Face folders gives. torch's checkpoint writer writes one checkpoint per call,
so each alpha is one pass over the inputs.

Output (weights only, loads with checkpoint.init_from at any TP/PP, exports with
tools/convert_hf.py export), the importer's layout (formats.torch_dist.write_release):
  OUT/latest_checkpointed_iteration.txt  "release"
  OUT/release/                            torch_dist: global model tensors, no optimizer state
  OUT/checkpoint_record.yaml              model: the inputs' config; merge: method, alpha, inputs
  OUT/hf/                                 the base's tokenizer and generation files
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ellama_megatron.formats.atomic import staged_outputs
from ellama_megatron.formats.torch_dist import TensorChunk, extra_state_objects, write_release
from ellama_megatron.merge.megatron_inputs import MegatronCheckpoint, check_megatron_mergeable
from ellama_megatron.merge.methods import TensorStatistics, is_identity, merge_chunk, row_ranges
from ellama_megatron.merge.request import (
    DEFAULT_CHUNK_BYTES,
    MergeResult,
    adapted_roles,
    check_merge_request,
    check_outputs,
    output_dirs,
)


def _statistics(tensors: list[torch.Tensor], chunk_bytes: int) -> TensorStatistics:
    """SLERP's sums over the row chunks of two whole tensors in memory."""
    return TensorStatistics.of(
        (tensors[0][a:b], tensors[1][a:b]) for a, b in row_ranges(tuple(tensors[0].shape), chunk_bytes)
    )


def merge_tensor(
    method: str,
    alpha: float,
    tensors: list[torch.Tensor],
    weights: list[float] | None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    stats: TensorStatistics | None = None,
) -> torch.Tensor:
    """One whole tensor merged in row chunks, as tools/merge.py merges a Hugging Face tensor."""
    same = is_identity(method, alpha)
    if same is not None and same < len(tensors):
        return tensors[same]
    if tensors[0].dim() == 0:
        return merge_chunk(method, alpha, tensors, weights, stats)
    if method == "slerp" and stats is None:
        stats = _statistics(tensors, chunk_bytes)
    out = torch.empty_like(tensors[0])
    for a, b in row_ranges(tuple(tensors[0].shape), chunk_bytes):
        out[a:b] = merge_chunk(method, alpha, [t[a:b] for t in tensors], weights, stats)
    return out


def _merged_padded_vocab(cfg, method, alpha, tensors, weights, chunk_bytes) -> torch.Tensor:
    """Embedding / output layer: the real rows merged as Hugging Face's tensor (SLERP's angle over
    them only); the padding rows with the same weights when every input has the same padded size,
    else zero (as an import writes them) up to the base's padded size."""
    v = cfg.vocab_size
    real = [t[:v] for t in tensors]
    stats = _statistics(real, chunk_bytes) if method == "slerp" else None
    if all(t.shape == tensors[0].shape for t in tensors):
        return merge_tensor(method, alpha, tensors, weights, chunk_bytes, stats)
    out = torch.zeros_like(tensors[0])
    out[:v] = merge_tensor(method, alpha, real, weights, chunk_bytes, stats)
    return out


def merged_group(cfg, m, method: str, alpha: float, tensors: list[torch.Tensor], weights, chunk_bytes) -> torch.Tensor:
    """One Megatron tensor (a table row, one layer) merged in Hugging Face's split."""
    from ellama_megatron.llama import weights as W

    if isinstance(m, W.VocabMapping):
        return _merged_padded_vocab(cfg, method, alpha, tensors, weights, chunk_bytes)
    same = is_identity(method, alpha)
    if same is not None and same < len(tensors):
        return tensors[same]
    parts = [m.to_hf(cfg, t) for t in tensors]
    merged = [merge_tensor(method, alpha, [p[i] for p in parts], weights, chunk_bytes) for i in range(len(parts[0]))]
    return m.to_megatron(cfg, None, merged)


def merge_megatron_checkpoints(
    base: str | Path,
    adapted: list[str | Path],
    alphas: list[float],
    out: str | Path,
    method: str = "linear",
    weights: list[float] | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    extrapolate: bool = False,
) -> MergeResult:
    """Write one merged checkpoint per alpha (see `output_dirs`). All checks run before any writing."""
    from ellama_megatron.convert.summary import Summary
    from ellama_megatron.llama import weights as W

    check_merge_request(method, adapted, alphas, weights, extrapolate)
    b = MegatronCheckpoint.open(base, "base")
    roles = adapted_roles(len(adapted))
    others = [MegatronCheckpoint.open(p, r) for p, r in zip(adapted, roles)]
    notes = []
    for o, r in zip(others, roles):
        notes += check_megatron_mergeable(b, o, r)
    inputs = [b, *others]
    dests = output_dirs(Path(out), alphas)
    check_outputs(dests, overwrite, [p for c in inputs for p in (c.root, c.folder)], "checkpoint")

    cfg = b.config
    table = [(m, layer) for m in W.mappings(cfg) for layer in W.layers_of(m, cfg)]
    meta = {m.megatron: b.reader.tensor_metadata(m.megatron) for m in W.mappings(cfg)}
    per_alpha = sum(
        math.prod(md.size) * torch.empty((), dtype=md.properties.dtype).element_size() for md in meta.values()
    )
    tokenizer_dir = b.tokenizer_dir or next((o.tokenizer_dir for o in others if o.tokenizer_dir), None)

    with staged_outputs(dests) as tmps:
        for alpha, tmp in zip(alphas, tmps):
            summary = Summary(f"merge {method} alpha {alpha:g}", per_alpha, quiet=not progress)
            chunks = []
            for m, layer in table:
                md = meta[m.megatron]

                def produce(m=m, layer=layer, alpha=alpha):
                    tensors = [c.reader.read(m.megatron, layer) for c in inputs]
                    return merged_group(cfg, m, method, alpha, tensors, weights, chunk_bytes)

                chunks.append(TensorChunk.of(m.megatron, md.size, md.properties.dtype, layer, produce))
            record = {
                "model": cfg.to_dict(),
                "merge": {
                    "method": method,
                    "alpha": alpha,
                    "base": str(b.folder),
                    "adapted": [str(o.folder) for o in others],
                    "weights": weights,
                },
            }
            write_release(
                tmp,
                chunks,
                extra_state_objects(W.EXTRA_STATE_MODULES, cfg.num_layers),
                record,
                hf_files_from=tokenizer_dir,
                on_written=summary.add,
            )
            summary.close()
    return MergeResult(dests, len(table), per_alpha, notes)
