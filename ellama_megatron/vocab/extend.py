"""Extend a Hugging Face Llama folder's vocabulary: learn merges, write tokenizer and resized weights,
measure the compression gain. ``tools/extend_vocab.py`` is the command line over this."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from ellama_megatron.formats.atomic import staged_output
from ellama_megatron.formats.hf_folder import INDEX_FILE, HFFolder, has_weights, read_config
from ellama_megatron.run.plan import padded_vocab_size
from ellama_megatron.vocab.bpe_extension import (
    check_extendable,
    check_ids_kept,
    extended_tokenizer_json,
    learn_merges,
    next_free_id,
)
from ellama_megatron.vocab.embeddings import resize_checkpoint

REPORT_FILE = "vocab_extension.json"
# Files rewritten here rather than copied.
_REWRITTEN = {"tokenizer.json", "config.json", INDEX_FILE, REPORT_FILE}


def load_base(hf_dir: Path):
    """The base tokenizer (tokenizers.Tokenizer) and its JSON, after checking it can be extended."""
    from tokenizers import Tokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir}: no tokenizer.json (a Hugging Face fast tokenizer folder is needed)")
    tok_json = json.loads(path.read_text())
    check_extendable(tok_json, str(path))
    return Tokenizer.from_file(str(path)), tok_json


def tokens_per_doc(tokenizer, texts: Sequence[str]) -> float:
    if not texts:
        return 0.0
    enc = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return sum(len(e.ids) for e in enc) / len(texts)


def compression(old, new, texts: Sequence[str]) -> dict:
    before, after = tokens_per_doc(old, texts), tokens_per_doc(new, texts)
    return {
        "docs": len(texts),
        "tokens_per_doc_before": round(before, 3),
        "tokens_per_doc_after": round(after, 3),
        "reduction": round(1 - after / before, 4) if before else 0.0,
    }


def extend_vocabulary(
    hf_dir: str | Path,
    train_texts: Sequence[str],
    num_tokens: int,
    out_dir: str | Path,
    heldout_texts: Sequence[str] = (),
    general_texts: Sequence[str] = (),
    min_frequency: int = 2,
    pad_to_multiple_of: int = 128,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write ``out_dir`` (tokenizer, resized weights when ``hf_dir`` has them, report); return the report."""
    from tokenizers import Tokenizer

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    old_tok, tok_json = load_base(hf_dir)
    old_ids = next_free_id(tok_json)
    new_tokens = learn_merges(old_tok, train_texts, num_tokens, min_frequency, progress)
    new_json = extended_tokenizer_json(tok_json, new_tokens)
    new_tok = Tokenizer.from_str(json.dumps(new_json))
    check_ids_kept(tok_json, new_tok)
    # What the old tokenizer makes of each new token's string: the rows its embedding starts from.
    sub_tokens = {t.id: [x.id for x in old_tok.model.tokenize(t.content)] for t in new_tokens}
    decode = old_tok.decoder.decode if old_tok.decoder is not None else (lambda toks: "".join(toks))

    report: dict = {
        "base": hf_dir.name,
        "old_id_count": old_ids,
        "new_tokens_requested": num_tokens,
        "new_tokens": len(new_tokens),
        "first_new_id": old_ids if new_tokens else None,
        "min_frequency": min_frequency,
        "compression": {
            "heldout_domain": compression(old_tok, new_tok, heldout_texts),
            "general": compression(old_tok, new_tok, general_texts),
        },
        "tokens": [
            {
                "id": t.id,
                "token": t.content,
                "text": decode([t.content]),
                "merge": [t.left, t.right],
                "frequency": t.frequency,
                "old_ids": sub_tokens[t.id],
            }
            for t in new_tokens
        ],
    }

    with staged_output(out_dir) as tmp:
        weight_files = HFFolder.open(hf_dir).weight_files() if has_weights(hf_dir) else set()
        for f in hf_dir.iterdir():
            if f.is_file() and f.name not in _REWRITTEN and f.name not in weight_files:
                shutil.copy2(f, tmp / f.name)
        (tmp / "tokenizer.json").write_text(json.dumps(new_json, ensure_ascii=False, indent=2) + "\n")
        if weight_files:
            config = read_config(hf_dir)
            needed = old_ids + len(new_tokens)
            new_size = max(int(config["vocab_size"]), padded_vocab_size(needed, divisible_by=pad_to_multiple_of))
            report["model"] = resize_checkpoint(hf_dir, tmp, new_size, sub_tokens, old_ids)
            report["model"]["old_vocab_size"] = int(config["vocab_size"])
        elif (hf_dir / "config.json").is_file():
            shutil.copy2(hf_dir / "config.json", tmp / "config.json")
        (tmp / REPORT_FILE).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    return report
