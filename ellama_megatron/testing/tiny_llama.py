"""Stand-ins for Meta's files, made locally: a tiny byte-level BPE tokenizer with Llama 3's special
tokens and a random Llama 3.1-shaped Hugging Face checkpoint. Tests and the CPU demo use them;
real runs use the tokenizer and weights the user brings.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ellama_megatron.llama.config import LlamaConfig
from ellama_megatron.llama.hf import hf_llama_config

# Llama 3's special tokens in id order, as the first ids of the tiny vocabulary (the real
# tokenizer has them at 128000+; tiny ids keep embeddings small).
SPECIAL_TOKENS = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def train_tiny_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on ``texts`` and save it as a Hugging Face tokenizer folder.

    Ids: <|pad|>=0, <|begin_of_text|>=1, <|end_of_text|>=2, <|eot_id|>=3 (matching conf/model/tiny.yaml).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    # Like Llama 3's tokenizer: BOS is prepended by the post-processor.
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def write_random_hf_llama(
    out_dir: str | Path,
    cfg: LlamaConfig,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Save a randomly initialised Llama of ``cfg``'s shape as a Hugging Face folder (safetensors)."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_llama_config(cfg)).float()
    out = Path(out_dir)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name not in ("config.json",):
                shutil.copy2(f, out / f.name)
    return out


def sample_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Deterministic English-ish filler text for training tiny tokenizers in tests."""
    import random

    rng = random.Random(seed)
    words = (
        "the a of and to in is for on with as by at from this that product price shipping "
        "condition new used brand color size review great quality fast seller item listing "
        "history river mountain city science music language computer water energy people"
    ).split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(n)]


__all__ = ["train_tiny_tokenizer", "write_random_hf_llama", "sample_texts", "SPECIAL_TOKENS"]
