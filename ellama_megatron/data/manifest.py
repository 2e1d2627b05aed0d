"""The manifest written beside every preprocessed source: what is in its datasets and how they
were made. tools/plan_blend.py plans from manifests alone (no dataset is opened).

Layout for ``--output-prefix data/listings``::

    data/listings_train.bin / .idx     training documents
    data/listings_valid.bin / .idx     held-out documents (when --valid-fraction > 0)
    data/listings.manifest.json        this file, written last: its presence means "complete"

tools/prepare_data.py with N tasks writes one such set per task (``data/listings-00000-of-0000N``)
and a source manifest that sums them, whose splits list the task prefixes as ``parts``.

Prefixes inside the manifest are relative to the manifest's folder, so the folder can be moved.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ellama_megatron.formats import indexed_dataset

MANIFEST_FORMAT = "ellama-megatron/manifest/v1"


class ManifestError(ValueError):
    """A missing or unusable manifest; the message says which file and what to do."""


def manifest_path(output_prefix: str | Path) -> Path:
    return Path(f"{output_prefix}.manifest.json")


def split_prefix(output_prefix: str | Path, split: str) -> str:
    return f"{output_prefix}_{split}"


def output_files(output_prefix: str | Path) -> list[Path]:
    """Every file a preprocessing run creates for ``output_prefix``."""
    files = [manifest_path(output_prefix)]
    for split in ("train", "valid"):
        files += indexed_dataset.pair_paths(split_prefix(output_prefix, split))
    return files


def file_sha256(path: str | Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict:
    """Load and check a manifest. Raises ManifestError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"manifest {path} not found: preprocess that source first "
            f"(python tools/preprocess_data.py --output-prefix {str(path).removesuffix('.manifest.json')} ...)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"manifest {path} is unreadable ({e}); re-run tools/preprocess_data.py for it") from e
    if manifest.get("format") != MANIFEST_FORMAT or "splits" not in manifest:
        raise ManifestError(f"{path} is not an ellama-megatron manifest (format {manifest.get('format')!r})")
    return manifest


def manifest_of_dataset(prefix: str | Path) -> Path | None:
    """The manifest beside a split's Megatron prefix (``X_train`` -> ``X.manifest.json``), or None
    for a dataset written elsewhere."""
    for split in ("train", "valid"):
        if str(prefix).endswith(f"_{split}"):
            path = manifest_path(str(prefix)[: -len(split) - 1])
            return path if path.is_file() else None
    return None


def written_token_ids(manifest: dict) -> tuple[int | None, int | None]:
    """(tokenizer vocabulary size, EOD id written after every document) recorded by preprocessing;
    None where an older manifest does not say."""
    tok = manifest.get("tokenizer") or {}
    eod = ((manifest.get("documents") or {}).get("eod") or {}).get("token_id", tok.get("eos_token_id"))
    return tok.get("vocab_size"), eod


def dataset_prefixes(path: str | Path, manifest: dict, split: str) -> list[tuple[str, int]]:
    """The Megatron prefixes of ``split`` with their tokens (relative to the current folder when
    ``path`` is): the one of a tools/preprocess_data.py manifest, or each non-empty task's of a
    tools/prepare_data.py source manifest (its ``parts``); [] when the split is absent or empty."""
    entry = manifest["splits"].get(split)
    if not entry or entry.get("documents", 0) == 0:
        return []
    folder = os.path.dirname(str(path))
    return [(os.path.join(folder, p["prefix"]), p["tokens"]) for p in entry.get("parts", [entry]) if p["documents"] > 0]
