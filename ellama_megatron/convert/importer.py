"""Hugging Face Llama folder -> Megatron torch_dist checkpoint the engine starts from.

Output layout (what Megatron's --pretrained-checkpoint loader expects, plus our records):
  CKPT_DIR/latest_checkpointed_iteration.txt   "release": loaded as iteration 0, weights only
  CKPT_DIR/release/                             torch_dist: global TP=1 PP=1 tensors, any TP/PP loads it
  CKPT_DIR/checkpoint_record.yaml               model: our LlamaConfig; convert: how it was made
  CKPT_DIR/hf/                                  the source config.json and tokenizer files (export reuses them)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ellama_megatron.convert.hf_checkpoint import ConversionError, HFCheckpoint
from ellama_megatron.convert.output_folder import refuse_existing
from ellama_megatron.convert.summary import Summary
from ellama_megatron.formats.atomic import staged_output
from ellama_megatron.formats.torch_dist import TensorChunk, extra_state_objects, write_release
from ellama_megatron.llama import weights as W
from ellama_megatron.llama.config import LlamaConfig
from ellama_megatron.run.plan import padded_vocab_size


def check_parallel(cfg: LlamaConfig, tp: int, pp: int, source: str) -> None:
    for what, value, divides in (
        ("num_key_value_heads (query groups)", cfg.num_query_groups, tp),
        ("num_attention_heads", cfg.num_attention_heads, tp),
        ("intermediate_size", cfg.ffn_hidden_size, tp),
        ("num_hidden_layers", cfg.num_layers, pp),
    ):
        if tp < 1 or pp < 1 or value % divides:
            flag = "--target-pp" if what == "num_hidden_layers" else "--target-tp"
            raise ConversionError(
                f"{source}: {what}={value} is not divisible by {flag} {divides}; pick a {flag} that divides it"
            )


def plan_chunks(hf: HFCheckpoint, padded_vocab: int) -> list[TensorChunk]:
    """One chunk per table row and layer, produced from the Hugging Face tensors when written."""
    cfg = hf.config
    chunks = []
    for m in W.mappings(cfg):
        for layer in W.layers_of(m, cfg):
            names = m.hf_names(layer)
            dtypes = {hf.dtype(n) for n in names}
            if len(dtypes) != 1:
                raise ConversionError(f"{hf.folder}: {names} have different dtypes {dtypes}")
            shape = m.megatron_shape(cfg, padded_vocab)

            def produce(m=m, names=names):
                return m.to_megatron(cfg, padded_vocab, [hf.read(n) for n in names])

            global_shape = (cfg.num_layers,) + shape if m.per_layer else shape
            chunks.append(TensorChunk.of(m.megatron, global_shape, dtypes.pop(), layer, produce))
    return chunks


def import_hf(
    hf_dir: Path,
    out: Path,
    target_tp: int = 1,
    target_pp: int = 1,
    overwrite: bool = False,
    verify: bool = False,
    tolerance: float | None = None,
    quiet: bool = False,
    verify_device: str = "auto",
    verify_dtype: str = "float32",
) -> dict:
    refuse_existing(out, overwrite)
    if verify:  # its options are checked before the conversion, not after
        from ellama_megatron.convert.verify import check_options

        verify_device = check_options(verify_device, verify_dtype)
    hf = HFCheckpoint.open(hf_dir)
    cfg = hf.config
    hf.check(W.hf_shapes(cfg))
    check_parallel(cfg, target_tp, target_pp, str(hf_dir / "config.json"))
    padded = padded_vocab_size(cfg.vocab_size, target_tp)
    chunks = plan_chunks(hf, padded)
    total = sum(hf.tensors[n][1].nbytes for n in W.hf_shapes(cfg))
    record = {
        "model": cfg.to_dict(),
        "convert": {
            "source": hf_dir.name,
            "target_tp": target_tp,
            "target_pp": target_pp,
            "padded_vocab_size": padded,
            "dtype": str(next(iter(hf.tensors.values()))[1].dtype).removeprefix("torch."),
        },
    }
    with staged_output(out) as tmp:
        summary = Summary("import", total, quiet=quiet)
        chunks = [_counted(c, summary, hf) for c in chunks]
        write_release(
            tmp,
            chunks,
            extra_state_objects(W.EXTRA_STATE_MODULES, cfg.num_layers),
            record,
            hf_files_from=hf_dir,
            hf_extra=("config.json",),
        )
        stats = summary.close()
        if verify:
            from ellama_megatron.convert.verify import verify_conversion

            stats["verify"] = verify_conversion(hf_dir, tmp, tolerance, verify_device, verify_dtype)
    return stats


def _names_of(chunk: TensorChunk, cfg: LlamaConfig) -> list[str]:
    m = next(m for m in W.mappings(cfg) if m.megatron == chunk.key)
    return m.hf_names(chunk.offset[0] if m.per_layer else None)


def _counted(chunk: TensorChunk, summary: Summary, hf: HFCheckpoint) -> TensorChunk:
    """``chunk``, counting the Hugging Face tensors and bytes it came from in ``summary`` when produced."""
    names = _names_of(chunk, hf.config)
    nbytes = sum(hf.tensors[n][1].nbytes for n in names)

    def run():
        t = chunk.produce()
        summary.add(nbytes, len(names))
        return t

    return dataclasses.replace(chunk, produce=run)
