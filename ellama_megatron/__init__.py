"""ellama-megatron: continued pretraining of Llama 3.1 on domain data with Megatron-Core."""

from pathlib import Path

# The Hydra presets are package data (ellama_megatron/conf, Hydra's pkg://ellama_megatron.conf), so an
# installed wheel has every one of them, not only a checkout of the repository.
CONF_DIR = Path(__file__).resolve().parent / "conf"
