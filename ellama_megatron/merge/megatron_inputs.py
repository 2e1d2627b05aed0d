"""Megatron checkpoints as merge inputs: what one holds (model config, tokenizer, model tensors,
read without loading weights; found and read by ellama_megatron.formats.megatron_checkpoint) and
the checks that two can be merged (same architecture, tensor names, shapes, dtypes and tokenizer).

The model tensors are the rows of the converter's weight table (ellama_megatron.llama.weights):
whatever TP/PP wrote the checkpoint and whether or not it holds optimizer state, they are read as
global tensors, one layer's slice at a time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ellama_megatron.formats.megatron_checkpoint import locate, record_path, tokenizer_source
from ellama_megatron.formats.torch_dist import CheckpointReader
from ellama_megatron.merge.request import MergeInputError, compare_tokenizer_dirs, first_difference

# Model-config fields that do not describe the trained weights: the name (an import records the
# source folder's, a run the preset's) and the random-init scale (a run from an import keeps its
# preset's).
MODEL_KEYS_IGNORED = {"name", "init_method_std"}


@dataclasses.dataclass
class MegatronCheckpoint:
    root: Path  # the folder holding the checkpoint record
    folder: Path  # the torch_dist folder read (release/ or iter_*)
    record: dict  # the checkpoint record
    config: object  # LlamaConfig
    reader: CheckpointReader
    tokenizer_dir: Path | None
    role: str

    @classmethod
    def open(cls, path: str | Path, role: str = "model") -> MegatronCheckpoint:
        from ellama_megatron.llama.config import LlamaConfig

        try:
            found = locate(Path(path))
            cfg = LlamaConfig.from_dict(found.record["model"], str(record_path(found.root)))
        except (FileNotFoundError, ValueError) as e:
            raise MergeInputError(f"{role}: {e}") from None
        return cls(
            found.root,
            found.folder,
            found.record,
            cfg,
            CheckpointReader(found.folder),
            tokenizer_source(found.root, found.record),
            role,
        )

    def model_config(self) -> dict:
        return {k: v for k, v in self.config.to_dict().items() if k not in MODEL_KEYS_IGNORED}

    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{sharded key: (dtype, global shape)} of the model tensors; a missing one is refused."""
        from ellama_megatron.llama import weights as W

        out = {}
        for m in W.mappings(self.config):
            try:
                md = self.reader.tensor_metadata(m.megatron)
            except KeyError:
                raise MergeInputError(
                    f"{self.role} {self.folder}: model tensor {m.megatron} is missing; is it a Llama GPTModel "
                    "checkpoint of the engine or of tools/convert_hf.py import?"
                ) from None
            out[m.megatron] = (str(md.properties.dtype).removeprefix("torch."), tuple(md.size))
        return out


def _is_vocab_row(key: str) -> bool:
    from ellama_megatron.llama import weights as W

    return any(m.megatron == key for m in W.TABLE if isinstance(m, W.VocabMapping))


def check_megatron_mergeable(base: MegatronCheckpoint, other: MegatronCheckpoint, role: str = "adapted") -> list[str]:
    """Raise MergeInputError naming the first difference: architecture, tensor names, shapes (the
    padded vocab rows of the embedding and output layer may differ: padding is not a weight),
    dtypes, tokenizer. Returns notes (a tokenizer that could not be found is not compared)."""
    diff = first_difference(base.model_config(), other.model_config())
    if diff:
        raise MergeInputError(
            f"architecture differs: model in {record_path(base.root)} (base) and {record_path(other.root)} "
            f"({role}) differ at {diff}; only models of the same architecture can be merged"
        )
    tb, to = base.tensors(), other.tensors()
    for key, (_dtype, shape) in tb.items():
        _odtype, oshape = to[key]
        if _is_vocab_row(key):
            shape, oshape = shape[1:], oshape[1:]  # rows: vocab_size real rows (same config) + padding
        if shape != oshape:
            raise MergeInputError(
                f"tensor shapes differ: {key} is {list(tb[key][1])} in base {base.folder} but {list(to[key][1])} "
                f"in {role} {other.folder}"
            )
    for key, (dtype, _) in tb.items():
        if dtype != to[key][0]:
            raise MergeInputError(
                f"tensor dtypes differ: {key} is {dtype} in base {base.folder} but {to[key][0]} in {role} "
                f"{other.folder}; merge checkpoints saved in the same dtype"
            )
    notes = []
    if base.tokenizer_dir is not None and other.tokenizer_dir is not None:
        compare_tokenizer_dirs(
            base.tokenizer_dir,
            other.tokenizer_dir,
            role,
            f"{base.root} (tokenizer in {base.tokenizer_dir})",
            f"{other.root} (tokenizer in {other.tokenizer_dir})",
        )
    else:
        missing = [c.root for c in (base, other) if c.tokenizer_dir is None]
        notes.append(f"tokenizer not found for {', '.join(map(str, missing))}: tokenizers not compared")
    return notes
