"""--verify: the Hugging Face model and the converted Megatron model on the same token sequences.

The Megatron side is the engine's own model (ellama_megatron.model.provider) loaded from the
torch_dist checkpoint through Megatron's dist_checkpointing, in one process (world size 1, gloo on
CPU). Reported: max absolute logit difference over the real vocab, and top-1 agreement.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from ellama_megatron.convert.hf_checkpoint import ConversionError

SEQUENCES, SEQ_LEN, SEED = 2, 32, 1234  # fixed token sequences: random ids, seeded


def fixed_tokens(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, (SEQUENCES, SEQ_LEN), generator=g)


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def init_single_process_group() -> None:
    """World size 1 and TP=PP=1, unless the caller (a test, torchrun) already set them up."""
    from megatron.core import parallel_state as mpu

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1, 1)


def megatron_logits(ckpt_root: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import dist_checkpointing

    from ellama_megatron.convert.importer import read_record
    from ellama_megatron.convert.torch_dist import find_checkpoint
    from ellama_megatron.model.config import LlamaConfig
    from ellama_megatron.model.provider import build_gpt_model, layer_spec, resolve_impl, transformer_config
    from ellama_megatron.runtime.cpu import apply_cpu_runtime

    record = read_record(ckpt_root)
    cfg = LlamaConfig.from_dict(record["model"])
    folder = find_checkpoint(ckpt_root)
    apply_cpu_runtime()
    init_single_process_group()
    # The local spec runs on CPU everywhere; checkpoint keys are the same for both specs.
    impl, attention = resolve_impl("local", "sdpa")
    md_vocab = _stored_vocab(folder)
    model = build_gpt_model(cfg, transformer_config(cfg), layer_spec(impl, attention), md_vocab)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(loaded["model"])  # strict: every parameter must come from the checkpoint
    model.eval()
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, position_ids, attention_mask=None)
    return logits[..., : cfg.vocab_size].float()


def _stored_vocab(folder: Path) -> int:
    from ellama_megatron.convert.torch_dist import CheckpointReader

    return int(CheckpointReader(folder).tensor_metadata("embedding.word_embeddings.weight").size[0])


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    return {
        "max_abs_logit_diff": float((reference - candidate).abs().max()),
        "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).float().mean()),
        "tokens": int(reference.shape[0] * reference.shape[1]),
    }


def verify_conversion(hf_dir: Path, ckpt_root: Path, tolerance: float = 1e-4) -> dict:
    """Raises ConversionError when the logits differ by more than ``tolerance``."""
    from ellama_megatron.convert.importer import read_record

    vocab = int(read_record(ckpt_root)["model"]["vocab_size"])
    tokens = fixed_tokens(vocab)
    result = compare(hf_logits(hf_dir, tokens), megatron_logits(ckpt_root, tokens))
    result["tolerance"] = tolerance
    if not result["max_abs_logit_diff"] <= tolerance:
        raise ConversionError(
            f"verification failed: max abs logit difference {result['max_abs_logit_diff']:.3g} > {tolerance:g} "
            f"(top-1 agreement {result['top1_agreement']:.3f}); the converted weights do not reproduce {hf_dir}"
        )
    return result
