"""Held-out evaluation sets as token sequences: JSON Lines text or Megatron indexed datasets.

A domain is given as ``name=path``. JSONL records have a text field (``text`` by default) and
optionally ``language``; they are tokenised with the model's tokenizer (its BOS as it adds it)
and get the EOS appended, as Megatron's preprocessing appends the end-of-document token.
Indexed datasets (``prefix`` or ``prefix.bin``/``prefix.idx``) are already token ids, EOD included.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class Document:
    ids: np.ndarray  # token ids, int64
    language: str | None


@dataclasses.dataclass
class DomainSource:
    name: str
    path: Path
    kind: str  # "jsonl" | "indexed"


def parse_domain_spec(spec: str) -> DomainSource:
    """``general=val/general.jsonl`` or ``ecommerce=val/ecom_text_document`` -> DomainSource (checked now)."""
    if "=" not in spec:
        raise ValueError(f"--data {spec!r}: expected DOMAIN=PATH, e.g. general=heldout/general.jsonl")
    name, raw = spec.split("=", 1)
    if not name:
        raise ValueError(f"--data {spec!r}: empty domain name; expected DOMAIN=PATH")
    path = Path(raw)
    if path.suffix in (".jsonl", ".json") or (path.is_file() and path.suffix not in (".bin", ".idx")):
        if not path.is_file():
            raise ValueError(f"--data {spec!r}: file {path} does not exist")
        return DomainSource(name, path, "jsonl")
    prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
    for ext in (".bin", ".idx"):
        if not Path(str(prefix) + ext).is_file():
            raise ValueError(
                f"--data {spec!r}: {prefix}{ext} does not exist; give a .jsonl file or a Megatron indexed "
                "dataset prefix (path without .bin/.idx)"
            )
    return DomainSource(name, prefix, "indexed")


def _jsonl_records(src: DomainSource, text_key: str, max_docs: int | None):
    """(text, language) of each record, every record checked; a bad one is a ValueError naming its line."""
    count = 0
    with open(src.path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if max_docs is not None and count >= max_docs:
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{src.path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_key), str):
                raise ValueError(
                    f"{src.path}:{lineno}: record has no string field {text_key!r}; set --text-key to the text field"
                )
            count += 1
            lang = rec.get("language")
            yield rec[text_key], str(lang) if lang is not None else None


def check_documents(src: DomainSource, text_key: str = "text", max_docs: int | None = None) -> int:
    """Read a held-out set without a tokenizer or model, so bad data is refused before a model is
    loaded (minutes for a large one); returns the number of documents."""
    try:
        if src.kind == "jsonl":
            n = sum(1 for _ in _jsonl_records(src, text_key, max_docs))
        else:
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            n = len(IndexedDataset(str(src.path)))
    except UnicodeDecodeError as e:
        raise ValueError(f"{src.path}: not UTF-8 text ({e.reason} at byte {e.start}); give a JSONL file") from None
    except (AssertionError, OSError, IndexError) as e:  # Megatron asserts on a damaged .idx
        raise ValueError(
            f"{src.path}: not a readable Megatron indexed dataset ({type(e).__name__}: {e}); "
            "write it again with tools/preprocess_data.py"
        ) from None
    if not n:
        raise ValueError(f"{src.path}: no documents (domain {src.name!r}); give a non-empty held-out set")
    return n


def read_documents(
    src: DomainSource, tokenizer=None, text_key: str = "text", max_docs: int | None = None
) -> list[Document]:
    docs: list[Document] = []
    if src.kind == "jsonl":
        if tokenizer is None:
            raise ValueError(f"{src.path}: JSONL data needs the model's tokenizer")
        eos = tokenizer.eos_token_id
        for text, lang in _jsonl_records(src, text_key, max_docs):
            ids = tokenizer(text)["input_ids"]
            if eos is not None:
                ids = ids + [eos]
            docs.append(Document(np.asarray(ids, dtype=np.int64), lang))
    else:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(str(src.path))
        n = len(ds) if max_docs is None else min(len(ds), max_docs)
        for i in range(n):
            docs.append(Document(np.asarray(ds[i], dtype=np.int64), None))
    if not docs:
        raise ValueError(f"{src.path}: no documents")
    return docs


def windows(doc: Document, seq_length: int) -> list[np.ndarray]:
    """Non-overlapping windows of at most ``seq_length`` tokens; windows of one token predict nothing
    and are dropped."""
    return [
        doc.ids[s : s + seq_length] for s in range(0, len(doc.ids), seq_length) if len(doc.ids[s : s + seq_length]) > 1
    ]
