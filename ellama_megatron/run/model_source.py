"""Which model a run trains: the one checkpoint.init_from recorded, unless a preset is chosen.

conf/model/auto.yaml (the default) names no dimensions (its keys are null): the model is the
``model`` section of init_from's record (what tools/convert_hf.py import, tools/merge.py or a run wrote beside the
checkpoint), or the tiny preset when the run starts from random weights. Keys set (``model.KEY=VALUE``) are
laid over it. A preset or override that disagrees with the checkpoint it starts from would build
a model of other shapes and fail minutes later in Megatron's loader (or, for RoPE or the norm's
epsilon, train silently wrong), so every differing field is reported here instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ellama_megatron.formats.megatron_checkpoint import CheckpointFormatError, checkpoint_root, read_record, record_path
from ellama_megatron.llama.config import NON_ARCHITECTURE_FIELDS, load_model_config

AUTO = "auto"  # conf/model/auto.yaml's name: the model comes from checkpoint.init_from
RANDOM_INIT_PRESET = "tiny"  # auto without init_from: the preset tests and the demo train from scratch


def recorded_model(init_from: str | Path) -> dict[str, Any]:
    """The ``model`` section of the record beside checkpoint.init_from (CheckpointFormatError without one)."""
    return dict(read_record(checkpoint_root(Path(init_from)))["model"])


def run_model(cfg: Any) -> tuple[dict[str, Any], list[str]]:
    """(the model section the run trains, every field in which the config disagrees with init_from's record)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    init_from = (cfg.get("checkpoint") or {}).get("init_from")
    recorded = None
    if init_from and Path(init_from).exists():  # a missing init_from is check_known_choices' message
        try:
            recorded = recorded_model(init_from)
        except CheckpointFormatError as e:
            return model, [f"checkpoint.init_from={init_from}: {e}"]
    if model.get("name") == AUTO:
        base = recorded if recorded is not None else load_model_config(RANDOM_INIT_PRESET).to_dict()
        model = {**base, **{k: v for k, v in model.items() if k != "name" and v is not None}}
    if recorded is None:
        return model, []
    source = record_path(checkpoint_root(Path(init_from)))
    problems = [
        f"model.{key}={model[key]!r} but checkpoint.init_from={init_from} has {key}={recorded.get(key)!r} "
        f"({source}); drop the model preset and override (model=auto, the default, trains the recorded model)"
        for key in model
        if key not in NON_ARCHITECTURE_FIELDS and model[key] != recorded.get(key)
    ]
    return model, problems
