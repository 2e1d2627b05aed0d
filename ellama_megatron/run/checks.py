"""Checks a composed config before anything expensive happens (seconds, not after the model build).

Each message says which key is wrong, why, and what would fix it; ``check_config`` raises one
ConfigError listing every problem: the model against the checkpoint it starts from, the run's
layout (RunPlan.problems), the choices, the data, the tokenizer and, when the layout itself is
valid and the cluster names its GPU memory, the planner's memory refusal.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf, open_dict

from ellama_megatron.formats import indexed_dataset
from ellama_megatron.run.memory import report_for
from ellama_megatron.run.model_source import AUTO, run_model
from ellama_megatron.run.plan import RunPlan
from ellama_megatron.run.schema import SCHEMAS, ConfigError, typed


def check_data(blend: dict) -> list[str]:
    errors = []
    if not blend["train"]:
        errors.append("no training data: set data.train, data.blend_file or data.groups (conf/data)")
    if not blend["valid"]:
        errors.append("no validation sets: set data.valid {domain: [prefix]} so each domain's loss is logged")
    prefixes = [d["prefix"] for d in blend["train"]]
    for domain, domain_prefixes in blend["valid"].items():
        if not domain_prefixes:
            errors.append(f"data.valid.{domain} is empty")
        prefixes += list(domain_prefixes)
    for d in blend["train"]:
        if float(d["weight"]) <= 0:
            errors.append(f"training blend weight {d['weight']} for {d['prefix']} must be positive")
    for prefix in prefixes:
        for path in indexed_dataset.missing_files(prefix):
            errors.append(
                f"dataset file {path} not found (prefixes are paths without {'/'.join(indexed_dataset.SUFFIXES)}; "
                f"make them with tools/preprocess_data.py)"
            )
    return errors


def check_data_matches_model(blend: dict, model) -> list[str]:
    """Each dataset's recorded tokenizer against the model, from the manifests beside the datasets:
    a token id at or above the model's vocabulary is an IndexError in the rank that reads it (a
    device-side assert on GPU), and another EOD id splits documents where there are none. A dataset
    without a manifest (written by another tool) has a sample of its documents' ids read instead
    (data/vocabulary_check.py); the ranks check every batch's ids (resilience.check_token_ids)."""
    from ellama_megatron.data.manifest import ManifestError, manifest_of_dataset, read_manifest, written_token_ids
    from ellama_megatron.data.vocabulary_check import sampled_out_of_vocabulary

    errors = []
    prefixes = [d["prefix"] for d in blend["train"]] + [p for ps in blend["valid"].values() for p in ps]
    seen = set()
    for prefix in prefixes:
        path = manifest_of_dataset(prefix)
        if path is None:
            if str(prefix) in seen or not indexed_dataset.exists(prefix):
                continue  # a missing file is check_data's error
            seen.add(str(prefix))
            refusal = sampled_out_of_vocabulary(str(prefix), model.vocab_size)
            if refusal:
                errors.append(refusal)
            continue
        if path in seen:
            continue
        seen.add(path)
        try:
            vocab, eod = written_token_ids(read_manifest(path))
        except ManifestError as e:
            errors.append(str(e))
            continue
        if vocab is not None and vocab > model.vocab_size:
            errors.append(
                f"{path}: dataset {prefix} was tokenized with a vocabulary of {vocab} tokens, but the "
                f"model ({model.name}) has model.vocab_size={model.vocab_size}; preprocess it with the "
                "model's tokenizer (or extend the model's vocabulary: tools/extend_vocab.py)"
            )
        if eod is not None and eod != model.eos_token_id:
            errors.append(
                f"{path}: dataset {prefix} ends documents with token {eod}, but the model ({model.name}) "
                f"has model.eos_token_id={model.eos_token_id}; preprocess it with the model's tokenizer "
                "or --eod-token matching the model"
            )
    return errors


def check_known_choices(cfg) -> list[str]:
    groups = {group: typed(cfg, group) for group in SCHEMAS}  # ConfigError for a key of the wrong type or unknown
    errors = groups["cluster"].problems() + groups["optim"].problems() + groups["resilience"].problems()
    errors += groups["train"].problems() + groups["checkpoint"].problems() + groups["logging"].problems()
    if groups["checkpoint"].async_save and groups["cluster"].accelerator == "cpu":
        # Megatron's async writer needs CUDA: the flag would be dropped, and the saves be synchronous.
        errors.append(
            "checkpoint.async_save=true needs cluster.accelerator=gpu (Megatron writes in the background "
            "only from GPU memory); set checkpoint.async_save=false"
        )
    if cfg.launch not in ("torchrun", "none"):
        errors.append(f"launch={cfg.launch!r} must be torchrun or none")
    init = cfg.checkpoint.init_from
    if init and not Path(init).exists():
        errors.append(
            f"checkpoint.init_from={init} does not exist; convert the base model with "
            f"tools/convert_hf.py import --out {init}"
        )
    return errors


def check_tokenizer(tokenizer_dir: str | None) -> list[str]:
    if not tokenizer_dir:
        return []
    path = Path(tokenizer_dir)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return [f"data.tokenizer_dir={path} is not a Hugging Face tokenizer folder (no tokenizer.json)"]
    return []


def check_memory(cfg, plan: RunPlan) -> list[str]:
    """The planner's refusal (with its numbers) when a valid layout does not fit cluster.gpu_memory_gb;
    nothing when it fits or when no limit is set (CPU runs)."""
    limit = cfg.cluster.get("gpu_memory_gb")
    if not limit:
        return []
    report = report_for(plan, limit, cfg.cluster.get("gpu_peak_tflops"))
    return [] if report.fits else [f"does not fit the GPU: {report.refusal()}"]


def settle_model(cfg) -> list[str]:
    """Replace ``cfg.model`` by the model the run trains (checkpoint.init_from's recorded one under
    model=auto), so the config the ranks read and the run's record name real dimensions; returns
    each field in which a preset or model.* override disagrees with that checkpoint."""
    model, disagreements = run_model(cfg)
    with open_dict(cfg):
        cfg.model = OmegaConf.create(model)
    return disagreements


def check_config(cfg, blend: dict) -> RunPlan:
    """The run's plan, or ConfigError listing every problem found. Settles ``cfg.model`` first."""
    model_errors = settle_model(cfg)
    if model_errors and cfg.model.get("name") == AUTO:  # no model to check the rest against
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(model_errors))
    choices = check_known_choices(cfg)
    if choices:  # a zero or negative size would stop the plan itself (a division by zero)
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(model_errors + choices))
    plan = RunPlan.from_cfg(cfg)
    layout = plan.problems()
    errors = model_errors + choices + layout + check_data(blend) + check_tokenizer(cfg.data.get("tokenizer_dir"))
    errors += check_data_matches_model(blend, cfg.model)
    if not layout:  # the memory of a layout Megatron cannot run is no question
        errors += check_memory(cfg, plan)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return plan
