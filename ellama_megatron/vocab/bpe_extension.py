"""Learn new BPE merges on top of an existing byte-level BPE tokenizer (Hugging Face tokenizer.json),
so every old id keeps its meaning (eBay's vocabulary extension of Llama 3.1, arXiv 2509.26124).

Why appending merges is safe: the BPE model applies merges lowest rank first, and the new merges
rank after all old ones. So the old merges run to completion exactly as before, then the new ones
join the old tokens further; no old merge can involve a new token. Text in which no new merge
applies therefore encodes exactly as before, and every old id still names the same string.

Learning is ordinary BPE training started from the old segmentation of the corpus: count adjacent
token pairs inside pre-tokenized words (weighted by word frequency), merge the most frequent pair
whose joined string is not already a token, repeat. Ties go to the lexicographically smallest pair,
so the result is deterministic.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class NewToken:
    id: int
    left: str  # the merge that forms it: left + right (byte-level strings, as in tokenizer.json)
    right: str
    frequency: int  # pair occurrences in the corpus when it was chosen

    @property
    def content(self) -> str:
        return self.left + self.right


def check_extendable(tok_json: dict, source: str = "tokenizer.json") -> None:
    """Raise a ValueError naming the field when the tokenizer is not a byte-level BPE we can extend."""
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{source}: field model.type is {model.get('type')!r}; only BPE tokenizers can be extended")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise ValueError(f"{source}: model.vocab / model.merges missing; is this a Hugging Face tokenizer.json?")
    if model.get("dropout"):
        raise ValueError(f"{source}: model.dropout is set; BPE dropout makes segmentation random, remove it first")
    if "ByteLevel" not in json.dumps(tok_json.get("pre_tokenizer")):
        raise ValueError(f"{source}: pre_tokenizer is not byte-level (as Llama 3's is); other BPEs are not supported")


def next_free_id(tok_json: dict) -> int:
    """One past the largest id in use: the BPE vocabulary or the added (special) tokens.

    Llama 3 keeps its 256 special tokens at 128000..128255, after the BPE vocabulary, so new
    tokens go after them and the special tokens keep their ids.
    """
    ids = list(tok_json["model"]["vocab"].values()) + [t["id"] for t in tok_json.get("added_tokens", [])]
    return max(ids) + 1


def word_counts(tokenizer, texts: Iterable[str], progress: Callable[[int], None] | None = None) -> Counter:
    """Frequency of each pre-tokenized word (byte-level string), the way the tokenizer splits text."""
    counts: Counter = Counter()
    norm, pre = tokenizer.normalizer, tokenizer.pre_tokenizer
    for text in texts:
        if norm is not None:
            text = norm.normalize_str(text)
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))
        if progress is not None:
            progress(1)
    return counts


def learn_merges(
    tokenizer,
    texts: Iterable[str],
    num_tokens: int,
    min_frequency: int = 2,
    progress: Callable[[int], None] | None = None,
) -> list[NewToken]:
    """Up to ``num_tokens`` new tokens (fewer if no pair occurs ``min_frequency`` times).

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (the old one); ids are assigned after its last id.
    """
    tok_json = json.loads(tokenizer.to_str())
    check_extendable(tok_json)
    vocab = set(tok_json["model"]["vocab"]) | {t["content"] for t in tok_json.get("added_tokens", [])}
    first_id = next_free_id(tok_json)

    counts = word_counts(tokenizer, texts)
    words: list[list[str]] = []
    freqs: list[int] = []
    for w, c in counts.items():
        words.append([t.value for t in tokenizer.model.tokenize(w)])
        freqs.append(c)

    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, syms in enumerate(words):
        for p in zip(syms, syms[1:]):
            pair_count[p] += freqs[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)

    new: list[NewToken] = []
    while heap and len(new) < num_tokens:
        neg, pair = heapq.heappop(heap)
        count = pair_count.get(pair, 0)
        if -neg != count:  # stale entry; the current count was pushed again
            continue
        if count < min_frequency:
            break
        a, b = pair
        joined = a + b
        if joined in vocab:
            # Already a token reachable by another merge path: adding this merge would make no new
            # token; leave the pair alone.
            del pair_count[pair]
            continue
        vocab.add(joined)
        new.append(NewToken(first_id + len(new), a, b, count))
        if progress is not None:
            progress(1)
        changed: set[tuple[str, str]] = set()
        for i in list(where[pair]):
            syms, f = words[i], freqs[i]
            for p in zip(syms, syms[1:]):
                pair_count[p] -= f
                changed.add(p)
            merged, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    merged.append(joined)
                    j += 2
                else:
                    merged.append(syms[j])
                    j += 1
            words[i] = merged
            for p in zip(merged, merged[1:]):
                pair_count[p] += f
                where[p].add(i)
                changed.add(p)
        pair_count.pop(pair, None)
        where.pop(pair, None)
        for p in changed:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_count.pop(p, None)
    return new


def extended_tokenizer_json(tok_json: dict, new_tokens: list[NewToken]) -> dict:
    """A copy of ``tok_json`` with the new vocabulary entries and merges appended (same merge format)."""
    out = json.loads(json.dumps(tok_json))
    model = out["model"]
    # The tokenizers library ignores the ids stored in "added_tokens" when loading: a token not in
    # the model vocabulary gets id = (number of model vocabulary entries) + its position. For
    # Llama 3 that count is 128000, so its specials land at 128000..128255 by coincidence; once new
    # entries are appended they would shift. A token that *is* in the model vocabulary keeps the
    # model's id, so the specials are entered there too (BPE never produces them: added tokens are
    # split off before the model runs, and merges cannot build them).
    for added in out.get("added_tokens", []):
        model["vocab"].setdefault(added["content"], added["id"])
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    for t in new_tokens:
        if t.content in model["vocab"]:
            raise ValueError(f"new token {t.content!r} is already in the vocabulary (id {model['vocab'][t.content]})")
        model["vocab"][t.content] = t.id
        model["merges"].append(f"{t.left} {t.right}" if string_merges else [t.left, t.right])
    return out


def check_ids_kept(old_json: dict, new_tokenizer) -> None:
    """Raise if the loaded extended tokenizer maps any old token or special token to another id."""
    expected = dict(old_json["model"]["vocab"])
    expected.update({t["content"]: t["id"] for t in old_json.get("added_tokens", [])})
    moved = [
        (tok, i, new_tokenizer.token_to_id(tok)) for tok, i in expected.items() if new_tokenizer.token_to_id(tok) != i
    ]
    if moved:
        raise RuntimeError(f"extended tokenizer moved {len(moved)} old ids, e.g. {moved[:3]} (token, old id, new id)")
