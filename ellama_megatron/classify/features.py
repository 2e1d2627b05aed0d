"""Hashed word and byte n-gram features, computed for a whole batch of documents in numpy.

scikit-learn's HashingVectorizer builds n-grams in Python (about 1 MB/s per core for char n-grams
on our VM); the issue asks for 10 MB/s. Here every n-gram of every document in a batch is hashed
at once: a polynomial hash over the batch's bytes whose prefix sums give any substring's hash in
O(1) (arithmetic modulo 2**64, i.e. numpy uint64 wrap-around), then a splitmix64 finaliser and a
mask to a power-of-two number of buckets. The hashes depend only on the bytes, so a model trained
in one process scores identically in any other.

Features of a document (lower-cased UTF-8 bytes):
- words (runs of ASCII letters/digits and non-ASCII bytes) and pairs of adjacent words,
- byte n-grams for each n in ``char_ngrams`` (fastText's sub-word information, without the
  per-word boundary markers), never spanning two documents.
Each occurrence counts 1; a document's vector is divided by sqrt(number of occurrences), which is
the L2 norm when all features are distinct (as HashingVectorizer(norm="l2") would give).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

_MASK64 = (1 << 64) - 1
# Odd, so it is invertible modulo 2**64 (needed to shift prefix sums back to position 0).
_BASE = 0x100000001B3
_BASE_INV = pow(_BASE, -1, 1 << 64)
# Per feature kind, so that the word "abc" and the byte 3-gram "abc" land in different buckets.
_SALT_WORD = np.uint64(0x9E3779B97F4A7C15)
_SALT_PAIR = np.uint64(0xC2B2AE3D27D4EB4F)
_SALT_CHAR = np.uint64(0x165667B19E3779F9)

# Bytes that belong to a word: ASCII letters and digits, and every byte of a multi-byte UTF-8
# character (so "größe" or "サイズ" stay whole words).
_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True
# Separator between documents in a batch; n-grams containing it are dropped.
_SEP = b"\x00"


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """What a model was trained on; stored in the model's metadata and checked at load."""

    n_features: int = 1 << 20  # hash buckets (a power of two)
    char_ngrams: tuple[int, ...] = (3, 4, 5)  # byte n-gram lengths
    word_bigrams: bool = True  # also hash adjacent word pairs
    max_doc_bytes: int = 100_000  # only a document's first bytes are read (long pages say enough early)

    def __post_init__(self):
        if self.n_features <= 0 or self.n_features & (self.n_features - 1):
            raise ValueError(f"n_features must be a power of two, got {self.n_features}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["char_ngrams"] = list(self.char_ngrams)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "features") -> FeatureConfig:
        """Read a stored config; a missing, unknown or mistyped field is a ValueError naming it."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
        # A default would silently hash differently from training, so every field must be stored.
        missing = sorted(names - set(d))
        if missing:
            raise ValueError(
                f"{where}: missing field(s) {missing}; the model was written by another "
                "version: retrain it with `tools/domain_classifier.py train`"
            )
        d = dict(d)
        if not isinstance(d["char_ngrams"], list) or not all(type(n) is int and n > 0 for n in d["char_ngrams"]):
            raise ValueError(f"{where}.char_ngrams must be a list of positive integers, got {d['char_ngrams']!r}")
        d["char_ngrams"] = tuple(d["char_ngrams"])
        for key in ("n_features", "max_doc_bytes"):
            if type(d[key]) is not int or d[key] <= 0:
                raise ValueError(f"{where}.{key} must be a positive integer, got {d[key]!r}")
        if type(d["word_bigrams"]) is not bool:
            raise ValueError(f"{where}.word_bigrams must be true or false, got {d['word_bigrams']!r}")
        return cls(**d)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads polynomial hashes over all 64 bits before masking."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _Powers:
    """BASE**i and BASE**-i modulo 2**64, grown on demand and shared by all batches."""

    def __init__(self):
        self.pow = np.ones(1, dtype=np.uint64)
        self.inv = np.ones(1, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pow) < n:
            size = max(n, 2 * len(self.pow))
            self.pow = np.full(size, _BASE, dtype=np.uint64)
            self.pow[0] = 1
            np.cumprod(self.pow, dtype=np.uint64, out=self.pow)
            self.inv = np.full(size, _BASE_INV, dtype=np.uint64)
            self.inv[0] = 1
            np.cumprod(self.inv, dtype=np.uint64, out=self.inv)
        return self.pow[:n], self.inv[:n]


_POWERS = _Powers()


def _bucket_of(h: np.ndarray, bits: int) -> np.ndarray:
    """Multiply-shift hashing (Knuth): the top ``bits`` bits of h * golden ratio."""
    return (h * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits)


@dataclasses.dataclass
class _Block:
    """One kind of feature for a whole batch: bucket ids in document order.

    Document d's occurrences are ``bucket[starts[d]:starts[d+1]]`` (the last runs to ``end``) minus
    the positions in ``dropped`` (n-grams that span a separator); ``counts[d]`` is what remains.
    """

    bucket: np.ndarray
    starts: np.ndarray
    end: int
    counts: np.ndarray
    dropped: np.ndarray | None


def _blocks(texts: Sequence[str], cfg: FeatureConfig) -> list[_Block]:
    n_docs = len(texts)
    bits = cfg.n_features.bit_length() - 1
    encoded = [t[: cfg.max_doc_bytes].lower().encode("utf-8", "replace")[: cfg.max_doc_bytes] for t in texts]
    lens = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=n_docs)
    # Each document is followed by one separator; extra ones at the end keep every n-gram start
    # inside the array, so each document's slice of positions is well defined.
    pad = max(cfg.char_ngrams, default=1)
    data = np.frombuffer(_SEP.join(encoded) + _SEP * (1 + pad), dtype=np.uint8)
    L = len(data)
    offsets = np.zeros(n_docs, dtype=np.int64)
    np.cumsum(lens[:-1] + 1, out=offsets[1:])
    sep_pos = offsets + lens

    pw, inv = _POWERS.get(L + 1)
    prefix = np.zeros(L + 1, dtype=np.uint64)
    np.cumsum(data.astype(np.uint64) * pw[:L], dtype=np.uint64, out=prefix[1:])

    blocks = []
    for n in cfg.char_ngrams:
        m = L - n + 1
        # Hash of data[s:s+n] for every start s, using contiguous slices (no index arrays).
        h = (prefix[n : n + m] - prefix[:m]) * inv[:m]
        bucket = _bucket_of(h + (_SALT_CHAR + np.uint64(n)), bits)
        # Starts whose n-gram reaches a document's separator: sep_pos - k for k < n, not before the doc.
        k = np.arange(n, dtype=np.int64)
        cand = sep_pos[:, None] - k[None, :]
        dropped = cand[cand >= offsets[:, None]]
        blocks.append(_Block(bucket, offsets, int(sep_pos[-1]) + 1, np.maximum(lens - n + 1, 0), dropped))

    is_word = _WORD_BYTE[data]
    edges = np.diff(is_word.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    w_start = np.flatnonzero(edges == 1)
    w_end = np.flatnonzero(edges == -1)
    w_hash = _mix((prefix[w_end] - prefix[w_start]) * inv[w_start] + _SALT_WORD)
    w_counts = np.diff(np.searchsorted(w_start, np.append(offsets, L)))
    w_offsets = np.searchsorted(w_start, offsets)
    blocks.append(_Block(_bucket_of(w_hash, bits), w_offsets, len(w_hash), w_counts, None))
    if cfg.word_bigrams:
        # Pair i is (word i, word i+1); the pair that joins a document's last word to the next
        # document's first word is dropped.
        pair = (
            _mix(w_hash[:-1] * np.uint64(_BASE) + w_hash[1:] + _SALT_PAIR)
            if len(w_hash) > 1
            else np.zeros(0, np.uint64)
        )
        last_word = w_offsets + w_counts - 1
        has_words = w_counts > 0
        dropped = last_word[has_words & (last_word < len(pair))]
        blocks.append(
            _Block(
                _bucket_of(pair, bits),
                np.minimum(w_offsets, len(pair)),
                len(pair),
                np.maximum(w_counts - 1, 0),
                dropped,
            )
        )
    return blocks


def _doc_sums(values: np.ndarray, block: _Block) -> np.ndarray:
    """Sum of ``values`` (one per position of ``block``) over each document's slice."""
    if block.dropped is not None and len(block.dropped):
        values[block.dropped] = 0
    # reduceat gives values[start] for an empty slice, and needs start < len: pad with one zero
    # and zero the documents that have nothing.
    padded = np.append(values[: block.end], values.dtype.type(0))
    sums = np.add.reduceat(padded, np.minimum(block.starts, block.end), dtype=np.float64)
    sums[block.counts == 0] = 0
    return sums


def hash_features(texts: Sequence[str], cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bucket ids of every feature occurrence in ``texts``.

    Returns ``(doc_index, bucket, n_per_doc)``: two parallel int arrays (one entry per occurrence)
    and the number of occurrences of each document.
    """
    n_docs = len(texts)
    if n_docs == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    docs, buckets = [], []
    n_per_doc = np.zeros(n_docs, dtype=np.int64)
    for block in _blocks(texts, cfg):
        keep = np.ones(block.end, dtype=bool)
        if block.dropped is not None:
            keep[block.dropped] = False
        ends = np.append(block.starts[1:], block.end)
        doc = np.repeat(np.arange(n_docs), ends - block.starts)
        docs.append(doc[keep])
        buckets.append(block.bucket[: block.end][keep].astype(np.int64))
        n_per_doc += block.counts
    return np.concatenate(docs), np.concatenate(buckets), n_per_doc


def feature_matrix(texts: Sequence[str], cfg: FeatureConfig):
    """The documents as a scipy CSR matrix (rows L2-scaled as described above), for training."""
    from scipy.sparse import csr_matrix

    doc_index, bucket, n_per_doc = hash_features(texts, cfg)
    scale = 1.0 / np.sqrt(np.maximum(n_per_doc, 1))
    values = scale[doc_index].astype(np.float32)
    m = csr_matrix((values, (doc_index, bucket)), shape=(len(texts), cfg.n_features), dtype=np.float32)
    m.sum_duplicates()
    return m


def linear_scores(texts: Sequence[str], cfg: FeatureConfig, weights: np.ndarray, bias: float) -> np.ndarray:
    """w . x + b for each document, without building the sparse matrix (the fast path)."""
    if len(texts) == 0:
        return np.zeros(0)
    sums = np.zeros(len(texts))
    n_per_doc = np.zeros(len(texts), dtype=np.int64)
    for block in _blocks(texts, cfg):
        sums += _doc_sums(weights[block.bucket], block)
        n_per_doc += block.counts
    return sums / np.sqrt(np.maximum(n_per_doc, 1)) + bias
