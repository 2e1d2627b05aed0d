"""The datasets provider for Megatron's loop: a blended training set and one validation set per domain.

A domain's validation set is one pass over its held-out prefixes, so the logged loss of
``general`` and ``ecommerce`` is comparable from one evaluation to the next.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf


def resolve_blend(data_cfg, train_tokens: float | None = None, seq_length: int | None = None) -> dict:
    """{"train": [{"prefix", "weight"}], "valid": {domain: [prefix]}} from the data config.

    ``data.groups`` (target token shares over manifests) is planned by
    ellama_megatron.data.blend_plan; otherwise ``blend_file`` or the inline ``train``/``valid`` lists.
    """
    data = OmegaConf.to_container(data_cfg, resolve=True) if not isinstance(data_cfg, dict) else data_cfg
    if data.get("groups"):
        from ellama_megatron.data.blend_plan import plan_blend

        return plan_blend(data_cfg, train_tokens, seq_length).to_blend_dict()
    if data.get("blend_file"):
        path = Path(data["blend_file"])
        if not path.exists():
            raise FileNotFoundError(
                f"data.blend_file={path} does not exist; write it with tools/plan_blend.py or unset it"
            )
        with open(path) as f:
            blend = json.load(f)
    else:
        blend = {"train": data.get("train") or [], "valid": data.get("valid") or {}}
    return {"train": list(blend["train"]), "valid": dict(blend["valid"])}


class WholeValidationBatches:
    """A validation set cut to a multiple of the data-parallel size.

    Full validation gives each DP rank one sample per step and runs as many steps as the rank with
    the most samples; a rank with one sample fewer wraps around its cyclic iterator and starts the
    next evaluation one sample late, so the same weights would get another loss each time. Cutting
    at most DP-1 samples keeps every evaluation one exact pass.
    """

    def __init__(self, dataset, multiple: int):
        self.dataset = dataset
        self.split = getattr(dataset, "split", None) or dataset.index_split  # Megatron picks its sampler by it
        self.length = len(dataset) - len(dataset) % multiple or len(dataset)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        return self.dataset[index]


class _IdsTokenizer:
    """What Megatron's GPT datasets read of a tokenizer: the EOD id and the vocab size."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod = eod
        self.vocab_size = vocab_size
        self.pad = -1
        self.unique_identifiers = {"class": "ellama_ids", "eod": eod, "vocab_size": vocab_size}


def gpt_dataset_config(args, eod: int, vocab_size: int, blend_per_split, cache_dir: Path):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend_per_split=blend_per_split,
        tokenizer=_IdsTokenizer(eod, vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
        path_to_cache=str(cache_dir),
    )


def datasets_provider(blend: dict, eod: int, vocab_size: int, cache_dir: Path, traced: bool = False):
    """Return the ``train_valid_test_datasets_provider`` Megatron's ``pretrain`` calls. ``traced``:
    each sample carries its dataset and index (engine/token_ids.py: SampleOrigins), so that a sample
    with an id outside the vocabulary can be named by its prefix and document."""

    def origins(ds):
        from ellama_megatron.engine.token_ids import SampleOrigins

        return SampleOrigins(ds) if traced and ds is not None else ds

    def provide(train_val_test_num_samples, vp_stage=None):
        from megatron.core import parallel_state as mpu
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset
        from megatron.training import get_args

        args = get_args()

        def built_here() -> bool:
            # Only the ranks that feed the model read data; TP peers get it by broadcast.
            first = mpu.is_pipeline_first_stage(ignore_virtual=True)
            last = mpu.is_pipeline_last_stage(ignore_virtual=True)
            return (first or last) and mpu.get_tensor_model_parallel_rank() == 0

        prefixes = [d["prefix"] for d in blend["train"]]
        weights = [float(d["weight"]) for d in blend["train"]]
        train_cfg = gpt_dataset_config(args, eod, vocab_size, [(prefixes, weights), None, None], cache_dir)
        train_ds, _, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_val_test_num_samples[0], None, None], built_here, train_cfg
        ).build()
        train_ds = origins(train_ds)

        valid = []
        for domain_prefixes in blend["valid"].values():
            cfg = gpt_dataset_config(args, eod, vocab_size, [None, (list(domain_prefixes), None), None], cache_dir)
            _, ds, _ = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], built_here, cfg).build()
            ds = origins(ds)
            dp = mpu.get_data_parallel_world_size()
            valid.append(WholeValidationBatches(ds, dp) if ds is not None else None)
        # No test set: with --multiple-validation-sets, Megatron 0.19's final test pass crashes.
        return train_ds, valid, None

    provide.is_distributed = True
    return provide
