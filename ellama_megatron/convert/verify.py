"""--verify: the Hugging Face model and the converted Megatron model on the same token sequences.

The Megatron side is the model training builds (ellama_megatron.llama.megatron: the same
TransformerConfig translation, see model_config) loaded from the torch_dist checkpoint through
Megatron's dist_checkpointing, in one process (world size 1: gloo on CPU, NCCL on a GPU).
Reported: max absolute logit difference over the real vocab, and top-1 agreement, over seeded
random ids and, when the folder has a tokenizer, over a fixed English paragraph tokenized with it
(real text exercises the ids and positions a model actually sees; random ids rarely do).

The two models run one after the other, so peak memory is one model: in float32, 4 bytes per
parameter (8B: 32 GB, on a CPU or one 80 GB GPU); in bfloat16, 2 (70B: 141 GB, a CPU node).
float32 compares at 1e-4; bfloat16 rounds differently in the two implementations, so its default
tolerance is looser and top-1 agreement says more.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from ellama_megatron.convert.hf_checkpoint import ConversionError

SEQUENCES, SEQ_LEN, SEED = 2, 32, 1234  # fixed token sequences: random ids, seeded
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.5}  # max abs logit difference
# Real prose (public domain: the United States Declaration of Independence), long enough for SEQ_LEN
# tokens with any tokenizer.
PARAGRAPH = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the political "
    "bands which have connected them with another, and to assume among the powers of the earth, the "
    "separate and equal station to which the Laws of Nature and of Nature's God entitle them, a decent "
    "respect to the opinions of mankind requires that they should declare the causes which impel them "
    "to the separation."
)


def check_options(device: str, dtype: str) -> str:
    """The device --verify will run on (``auto``: the GPU when there is one), after checking both
    options; the importer calls it before any conversion work."""
    if dtype not in DTYPES:
        raise ConversionError(f"--verify-dtype {dtype}: expected one of {sorted(DTYPES)}")
    from ellama_megatron.runtime.device import pick_device

    try:
        return pick_device(device, "--verify-device")
    except ValueError as e:
        raise ConversionError(str(e)) from None


def fixed_tokens(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, (SEQUENCES, SEQ_LEN), generator=g)


def paragraph_tokens(hf_dir: Path) -> torch.Tensor | None:
    """PARAGRAPH's first SEQ_LEN ids (with the template's BOS) under the folder's tokenizer; None without one."""
    from ellama_megatron.formats.tokenizer_folder import has_tokenizer

    if not has_tokenizer(Path(hf_dir)):
        return None
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(hf_dir))(PARAGRAPH).input_ids[:SEQ_LEN]
    return torch.tensor([ids]) if len(ids) == SEQ_LEN else None


def hf_logits(
    hf_dir: Path, tokens: torch.Tensor, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    import importlib.util

    from transformers import LlamaForCausalLM

    # Straight onto the GPU, not through CPU memory, where accelerate (the eval extra) is installed.
    direct = device != "cpu" and importlib.util.find_spec("accelerate") is not None
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype, **({"device_map": device} if direct else {}))
    model.to(device).eval()
    with torch.no_grad():
        logits = model(tokens.to(device)).logits.float().cpu()
    del model
    _free(device)
    return logits


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


def init_single_process_group(backend: str = "gloo") -> None:
    """World size 1 and TP=PP=1, unless the caller (a test, torchrun) already set them up."""
    from megatron.core import parallel_state as mpu

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1, 1)


def model_config(cfg, on_gpu: bool, dtype: torch.dtype = torch.float32):
    """The TransformerConfig --verify builds the model with: training's own translation, with no fused
    kernels (the reference runs none) and, on a CPU, the arguments a CPU training run passes."""
    from ellama_megatron.llama.megatron import CPU_MODEL_ARGS, UNFUSED_ARGS, transformer_config

    runtime = [*(UNFUSED_ARGS if on_gpu else CPU_MODEL_ARGS), *(["--bf16"] if dtype == torch.bfloat16 else [])]
    # Parameters are made where they will run, uninitialised: the checkpoint fills every one.
    return transformer_config(cfg, "local", runtime, perform_initialization=False)


def megatron_logits(
    ckpt_root: Path, tokens: torch.Tensor, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    from megatron.core import dist_checkpointing

    from ellama_megatron.formats.megatron_checkpoint import locate
    from ellama_megatron.llama.config import LlamaConfig
    from ellama_megatron.llama.megatron import build_gpt_model, layer_spec, resolve_impl
    from ellama_megatron.runtime.cpu import apply_cpu_runtime

    found = locate(ckpt_root)
    cfg = LlamaConfig.from_dict(found.record["model"])
    folder = found.folder
    on_gpu = device != "cpu"
    if on_gpu:
        torch.cuda.set_device(torch.device(device))
    else:
        apply_cpu_runtime()
    init_single_process_group("nccl" if on_gpu else "gloo")
    # The local spec runs anywhere, Transformer Engine or not; checkpoint keys are the same for both.
    impl, attention = resolve_impl("local", "sdpa")
    md_vocab = _stored_vocab(folder)
    config = model_config(cfg, on_gpu, dtype)
    model = build_gpt_model(cfg, config, layer_spec(impl, attention), md_vocab)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(loaded["model"])  # strict: every parameter must come from the checkpoint
    del loaded
    model.eval()
    tokens = tokens.to(device)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, position_ids, attention_mask=None)[..., : cfg.vocab_size].float().cpu()
    del model
    _free(device)
    return logits


def _stored_vocab(folder: Path) -> int:
    from ellama_megatron.formats.torch_dist import CheckpointReader

    return int(CheckpointReader(folder).tensor_metadata("embedding.word_embeddings.weight").size[0])


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    return {
        "max_abs_logit_diff": float((reference - candidate).abs().max()),
        "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).float().mean()),
        "tokens": int(reference.shape[0] * reference.shape[1]),
    }


def verify_conversion(
    hf_dir: Path, ckpt_root: Path, tolerance: float | None = None, device: str = "auto", dtype: str = "float32"
) -> dict:
    """Raises ConversionError when the logits differ by more than ``tolerance`` (default: by dtype)."""
    from ellama_megatron.formats.megatron_checkpoint import read_record

    device = check_options(device, dtype)
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    if device != "cpu" and dtype == "float32":
        # TF32 matmuls would round to 10 mantissa bits: not the float32 comparison asked for.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    vocab = int(read_record(ckpt_root)["model"]["vocab_size"])
    tokens = fixed_tokens(vocab)
    text = paragraph_tokens(hf_dir)
    if text is not None:  # one more row of the same batch: both models run once
        tokens = torch.cat([tokens, text])
    reference = hf_logits(hf_dir, tokens, device, DTYPES[dtype])
    candidate = megatron_logits(ckpt_root, tokens, device, DTYPES[dtype])
    result = compare(reference, candidate)
    result["real_text"] = None if text is None else compare(reference[SEQUENCES:], candidate[SEQUENCES:])
    result.update(tolerance=tolerance, device=device, dtype=dtype)
    if not result["max_abs_logit_diff"] <= tolerance:
        raise ConversionError(
            f"verification failed: max abs logit difference {result['max_abs_logit_diff']:.3g} > {tolerance:g} "
            f"(top-1 agreement {result['top1_agreement']:.3f}); the converted weights do not reproduce {hf_dir}"
        )
    return result
