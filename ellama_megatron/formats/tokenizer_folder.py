"""A Hugging Face tokenizer folder: which files make a tokenizer, and the user's tokenizer folder
checked, identified, and reduced to what workers need.

Token ids must equal what Megatron-LM's tools/preprocess_data.py writes with
``--tokenizer-type HuggingFaceTokenizer``: ``tokenizer(text).input_ids`` (special tokens such as
Llama 3's BOS included) and EOD = ``tokenizer.eos_token_id`` (data/document_tokens.py: --bos,
--eod-token). We encode with the same Rust tokenizer object transformers wraps
(``backend_tokenizer``), in batches on its own threads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy

# The files that make up a tokenizer (transformers' fast and slow formats, chat templates). Two
# models have the same tokenizer when these are the same.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class TokenizerFolderError(ValueError):
    """The tokenizer folder is missing, incomplete or not a Hugging Face fast tokenizer."""


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()


def tokenizer_files_in(folder: Path) -> list[str]:
    return [n for n in TOKENIZER_FILES if (folder / n).exists()]


def tokenizer_size(folder: Path) -> int | None:
    """Number of token ids tokenizer.json can produce (max id + 1), or None without one."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    try:
        tok = json.loads(path.read_text())
        ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TokenizerFolderError(f"{path}: not a tokenizers JSON file ({e})") from None
    return max(ids) + 1 if ids else 0


@dataclass(frozen=True)
class TokenizerInfo:
    folder: str
    name: str  # the folder's name, recorded in manifests (not the machine-specific path)
    vocab_size: int  # len(tokenizer): base vocabulary plus added special tokens, as Megatron counts it
    eos_id: int | None  # the folder's eos_token (data/document_tokens.py decides the EOD from it)
    bos_id: int | None
    sha256: str  # of tokenizer.json: two datasets with the same hash were tokenized alike
    backend_json: str  # the Rust tokenizer as transformers configured it, for worker processes

    @property
    def dtype(self) -> type:
        """Token dtype of the .bin file, chosen exactly as Megatron-LM's preprocess_data does."""
        from megatron.core.datasets.indexed_dataset import DType  # lazy: Megatron-Core imports in seconds

        return DType.optimal_dtype(self.vocab_size)

    def identity(self) -> dict:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_id,
            "bos_token_id": self.bos_id,
            "tokenizer_json_sha256": self.sha256,
            "dtype": numpy.dtype(self.dtype).name,
        }


def load_tokenizer_folder(folder: str | Path) -> TokenizerInfo:
    """Load and check a tokenizer folder; every failure names the folder and the fix."""
    path = Path(folder)
    if not path.is_dir():
        raise TokenizerFolderError(
            f"--tokenizer {path}: not a folder. Pass a Hugging Face tokenizer folder (with tokenizer.json)."
        )
    if not (path / "tokenizer.json").is_file():
        present = sorted(p.name for p in path.iterdir())[:10]
        raise TokenizerFolderError(
            f"--tokenizer {path}: no tokenizer.json (found {present}). Pass the folder of a Hugging Face "
            "fast tokenizer, e.g. the Llama 3.1 model folder."
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any load failure is the same problem for the user
        raise TokenizerFolderError(f"--tokenizer {path}: transformers cannot load it: {e}") from e
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerFolderError(f"--tokenizer {path}: not a fast (Rust) tokenizer; tokenizer.json is required")
    digest = hashlib.sha256((path / "tokenizer.json").read_bytes()).hexdigest()
    return TokenizerInfo(
        folder=str(path),
        name=path.resolve().name,
        vocab_size=len(tok),
        eos_id=None if tok.eos_token_id is None else int(tok.eos_token_id),
        bos_id=None if tok.bos_token_id is None else int(tok.bos_token_id),
        sha256=digest,
        backend_json=backend.to_str(),
    )
