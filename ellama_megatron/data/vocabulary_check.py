"""Token ids against a model's vocabulary: the one line that refuses a dataset, and the sample of a
dataset read before a launch (the first, the last and evenly spaced documents of each prefix without
a manifest; run/checks.py). The ranks check every batch themselves (engine/token_ids.py)."""

from __future__ import annotations

import numpy as np

from ellama_megatron.formats.indexed_dataset import read_documents

SAMPLED_DOCUMENTS = 16  # read per prefix before the launch: the first, the last, evenly spaced ones between
SAMPLED_IDS = 1 << 20  # of each sampled document at most, from its start: one huge document stays a quick read


def out_of_vocabulary(prefix: str, document: int, token_id: int, vocab_size: int) -> str:
    """The one line that refuses a dataset (before the launch and in a rank)."""
    return (
        f"{prefix}: document {document} holds token id {token_id}, outside the model's vocabulary "
        f"(model.vocab_size={vocab_size}); preprocess it with the model's tokenizer "
        "(or extend the model's vocabulary: tools/extend_vocab.py)"
    )


def first_outside(ids: np.ndarray, vocab_size: int) -> int | None:
    """The first id of ``ids`` outside [0, vocab_size), or None."""
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    return int(ids[bad[0]]) if bad.size else None


def sampled_out_of_vocabulary(prefix: str, vocab_size: int) -> str | None:
    """The refusal of ``prefix`` when one of its sampled documents holds an id outside the
    vocabulary (or when it cannot be read), else None."""
    try:
        documents = read_documents(prefix, limit=SAMPLED_IDS)
    except (OSError, ValueError) as e:
        return f"{prefix}: unreadable indexed dataset ({e}); write it again"
    for document, ids in documents:
        bad = first_outside(ids, vocab_size)
        if bad is not None:
            return out_of_vocabulary(prefix, document, bad, vocab_size)
    return None
