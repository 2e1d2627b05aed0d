"""Which documents are held out for validation: decided by a hash of the document (its id when
the record has one, else its text), never by position. The same document lands in the same split
whatever the file order, sharding or number of workers, and re-running on a grown corpus keeps
old validation documents out of training.
"""

from __future__ import annotations

import hashlib

# A fixed salt: changing it would reshuffle every split ever made.
_SALT = b"ellama-megatron/validation-split/v1"
_SCALE = float(1 << 64)


def split_fraction(key: str) -> float:
    """A number in [0, 1) that is a deterministic function of ``key``."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=_SALT).digest()
    return int.from_bytes(digest, "little") / _SCALE


def is_validation(key: str, valid_fraction: float) -> bool:
    """True for about ``valid_fraction`` of all keys, always the same ones."""
    return valid_fraction > 0 and split_fraction(key) < valid_fraction
