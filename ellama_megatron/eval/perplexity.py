"""Per-domain (and per-language) perplexity of a Hugging Face causal LM on held-out sequences.

perplexity = exp(sum of token negative log-likelihoods / number of predicted tokens), over all
windows of a domain: each window of n tokens predicts its last n - 1 tokens from the ones before.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ellama_megatron.eval.heldout_data import DomainSource, read_documents, windows
from ellama_megatron.runtime.device import pick_device


@dataclasses.dataclass
class LossSum:
    nll: float = 0.0
    tokens: int = 0
    sequences: int = 0

    def add(self, nll: float, tokens: int) -> None:
        self.nll += nll
        self.tokens += tokens
        self.sequences += 1

    def summary(self) -> dict:
        mean = self.nll / self.tokens if self.tokens else float("nan")
        return {
            "perplexity": math.exp(mean) if self.tokens else float("nan"),
            "mean_loss": mean,
            "tokens": self.tokens,
            "sequences": self.sequences,
        }


def load_hf_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype, tokenizer: str | Path | None = None):
    """The model, and its tokenizer (from ``tokenizer`` when given, else the model folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer or model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    return model.to(device).eval(), tok


@torch.no_grad()
def sequence_nll(model, batch: list[np.ndarray], pad_id: int, device: torch.device) -> list[float]:
    """Summed next-token NLL of each sequence (right-padded batch; causal attention keeps padding out)."""
    n = max(len(s) for s in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = torch.from_numpy(s)
        mask[i, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    return nll.sum(dim=1).double().tolist()


def evaluate_domains(
    model,
    tokenizer,
    sources: list[DomainSource],
    seq_length: int,
    batch_size: int,
    device: torch.device,
    text_key: str = "text",
    max_docs: int | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """{domain: {perplexity, mean_loss, tokens, sequences, documents, source, languages: {lang: ...}}}."""
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    results: dict[str, dict] = {}
    for src in sources:
        docs = read_documents(src, tokenizer, text_key=text_key, max_docs=max_docs)
        items = [(w, d.language) for d in docs for w in windows(d, seq_length)]
        # Longest first: similar lengths share a batch (less padding) and memory peaks at once.
        items.sort(key=lambda x: -len(x[0]))
        total, per_lang = LossSum(), {}
        for start in tqdm(range(0, len(items), batch_size), desc=f"perplexity {src.name}", disable=not progress):
            batch = items[start : start + batch_size]
            for (seq, lang), nll in zip(batch, sequence_nll(model, [s for s, _ in batch], pad_id, device)):
                total.add(nll, len(seq) - 1)
                if lang is not None:
                    per_lang.setdefault(lang, LossSum()).add(nll, len(seq) - 1)
        results[src.name] = {
            **total.summary(),
            "documents": len(docs),
            "source": str(src.path),
            "languages": {k: v.summary() for k, v in sorted(per_lang.items())},
        }
    return results


def evaluate_model_dir(
    model_dir: str | Path,
    sources: list[DomainSource],
    seq_length: int = 2048,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    text_key: str = "text",
    max_docs: int | None = None,
    progress: bool = True,
    tokenizer: str | Path | None = None,
) -> dict:
    dev = torch.device(pick_device(device))
    model, tok = load_hf_model(model_dir, dev, getattr(torch, dtype), tokenizer)
    domains = evaluate_domains(model, tok, sources, seq_length, batch_size, dev, text_key, max_docs, progress)
    return {
        "model": str(model_dir),
        "seq_length": seq_length,
        "device": str(dev),
        "dtype": dtype,
        "domains": domains,
    }
