"""ellama-megatron: continued pretraining of Llama 3.1 on domain data with Megatron-Core."""

from pathlib import Path

# conf/ sits beside the package in the repository (editable install); tools compose from it.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
