"""One work unit -> raw token parts per split; parts -> the final Megatron indexed dataset.

Workers write each part as the .bin payload (token ids in the dataset's dtype, each document
opened by BOS and followed by EOD as data/document_tokens.py decided) plus the documents' lengths.
The main process hands the parts, in input order, to Megatron's own ``IndexedDatasetBuilder``,
which writes the .idx: one sequence per document,
exactly what Megatron-LM's tools/preprocess_data.py writes for the same ids (``--append-eod``,
no sentence splitting). The result does not depend on the number of workers.

Workers never import Megatron-Core (seconds of import time per process, for nothing).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy

from ellama_megatron.data.readers import RawRecord, WorkUnit, read_unit
from ellama_megatron.data.serializers import MissingField, RecordSerializer, serialize
from ellama_megatron.data.validation_split import is_validation

SPLITS = ("train", "valid")
MAX_EXAMPLES_PER_UNIT = 20


class BadRecordError(ValueError):
    """A bad record in --strict mode: names file, line and reason."""


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0  # including one EOD per document
    text_bytes: int = 0  # UTF-8 bytes of the serialized text
    languages: dict = field(default_factory=dict)  # language -> {"documents": n, "tokens": n}

    def add(self, language: str, tokens: int, text_bytes: int) -> None:
        self.documents += 1
        self.tokens += tokens
        self.text_bytes += text_bytes
        entry = self.languages.setdefault(language, {"documents": 0, "tokens": 0})
        entry["documents"] += 1
        entry["tokens"] += tokens

    def merge(self, other: SplitStats) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.text_bytes += other.text_bytes
        for lang, e in other.languages.items():
            mine = self.languages.setdefault(lang, {"documents": 0, "tokens": 0})
            mine["documents"] += e["documents"]
            mine["tokens"] += e["tokens"]

    def to_dict(self) -> dict:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "text_bytes": self.text_bytes,
            "languages": dict(sorted(self.languages.items())),
        }


@dataclass
class UnitResult:
    unit: WorkUnit | None  # None: the running totals of a pipeline task (data/pipeline.py)
    records: int = 0  # records read, good and bad
    splits: dict = field(default_factory=lambda: {s: SplitStats() for s in SPLITS})
    skipped: Counter = field(default_factory=Counter)  # reason kind -> count
    examples: list = field(default_factory=list)  # [{"file", "location", "reason"}], first few
    domain_filter: object = None  # classify.FilterStats of this unit when --domain-filter is on

    def bad(self, raw: RawRecord, reason: str, strict: bool) -> None:
        """Count a bad record under its reason (and keep the first few), or stop with --strict."""
        if strict:
            raise BadRecordError(f"{raw.path}, {raw.location}: {reason} (--strict stops at the first bad record)")
        self.skipped[reason.split(" (")[0]] += 1
        if len(self.examples) < MAX_EXAMPLES_PER_UNIT:
            self.examples.append({"file": raw.path, "location": raw.location, "reason": reason})


@dataclass(frozen=True)
class EncodeJob:
    """Everything a worker needs besides the unit; small and picklable (the tokenizer is sent once)."""

    serializer: RecordSerializer
    valid_fraction: float
    eod_id: int  # appended after every document (data/document_tokens.py chose it)
    dtype: type
    batch_docs: int = 1000
    strict: bool = False
    domain_threshold: float | None = None  # keep documents the installed classifier scores above it
    add_special_tokens: bool = True  # encode with the tokenizer's template (--bos auto, or always when it adds BOS)
    prepend_bos: int | None = None  # written before each document's ids (--bos always, template without BOS)
    max_doc_chars: int = (
        0  # longer documents are skipped (reason counted); tokenizing one costs ~200x its size in memory
    )


_BACKENDS: dict = {}


def install_tokenizer(backend_json: str) -> None:
    """Build the Rust tokenizer once per process (pool initializer, or the main process)."""
    from tokenizers import Tokenizer

    _BACKENDS["tokenizer"] = Tokenizer.from_str(backend_json)


def install_domain_classifier(classifier) -> None:
    """The classify.DomainClassifier every unit of this process filters with (loaded once by the
    main process and sent to each worker once, not with every unit)."""
    _BACKENDS["domain_classifier"] = classifier


def worker_init(backend_json: str, rayon_threads: int, classifier=None) -> None:
    # Several worker processes each with a Rust thread per core would oversubscribe the CPU.
    os.environ["RAYON_NUM_THREADS"] = str(rayon_threads)
    install_tokenizer(backend_json)
    install_domain_classifier(classifier)


def _encode(texts: list[str], add_special_tokens: bool) -> list:
    tok = _BACKENDS["tokenizer"]
    fast = getattr(tok, "encode_batch_fast", None)  # skips offsets, which we do not need
    return (fast or tok.encode_batch)(texts, add_special_tokens=add_special_tokens)


class PartWriter:
    """Tokenizes batches of serialized documents and appends them to raw parts, one per split
    (``{part_prefix}_{split}.tokens`` and ``.lengths.npy``): the encode and write half of a unit,
    shared by encode_unit and the datatrove pipeline (data/pipeline.py)."""

    def __init__(self, job: EncodeJob, part_prefix: str, result: UnitResult):
        self.job, self.part_prefix, self.result = job, part_prefix, result
        self.token_files = {s: open(f"{part_prefix}_{s}.tokens", "wb") for s in SPLITS}
        self.lengths: dict[str, list[int]] = {s: [] for s in SPLITS}

    def add(self, batch: list[tuple[RawRecord, str, str, str]]) -> None:
        """Encode and write ``batch`` of (raw, text, language, split), in order."""
        if not batch:
            return
        job = self.job
        try:
            encodings = _encode([t for _, t, _, _ in batch], job.add_special_tokens)
        except Exception:  # noqa: BLE001 - one untokenizable text (e.g. a lone surrogate) fails the batch
            for item in batch:
                try:
                    encodings = _encode([item[1]], job.add_special_tokens)
                except Exception as e:  # noqa: BLE001
                    self.result.bad(item[0], f"cannot be tokenized ({e})", job.strict)
                else:
                    self._write([item], encodings)
        else:
            self._write(batch, encodings)

    def _write(self, items, encodings) -> None:
        job = self.job
        docs = {s: [] for s in SPLITS}
        for (raw, text, language, split), enc in zip(items, encodings):
            ids = enc.ids
            if not ids:
                self.result.bad(raw, "no tokens", job.strict)
                continue
            if job.prepend_bos is not None:
                ids = [job.prepend_bos, *ids]
            docs[split].append(ids)
            self.result.splits[split].add(language, len(ids) + 1, len(text.encode("utf-8")))
        for split, id_lists in docs.items():
            if not id_lists:
                continue
            sizes = [len(ids) + 1 for ids in id_lists]
            buf = numpy.empty(sum(sizes), dtype=job.dtype)
            pos = 0
            for ids, size in zip(id_lists, sizes):
                buf[pos : pos + size - 1] = ids
                buf[pos + size - 1] = job.eod_id
                pos += size
            self.token_files[split].write(buf.tobytes(order="C"))
            self.lengths[split].extend(sizes)

    def close(self) -> None:
        """Close the token files; ``save`` the lengths only when the part is complete."""
        for f in self.token_files.values():
            f.close()

    def save(self) -> None:
        self.close()
        for s in SPLITS:
            numpy.save(f"{self.part_prefix}_{s}.lengths.npy", numpy.asarray(self.lengths[s], dtype=numpy.int64))


def serialize_record(job: EncodeJob, raw: RawRecord, result: UnitResult) -> tuple[str, str, str] | None:
    """(text, language, split) of a readable record, or None when it is bad (counted in ``result``,
    or BadRecordError with --strict)."""
    try:
        text = serialize(raw.record, job.serializer.template)
    except MissingField as e:
        result.bad(raw, f"missing field '{e.args[0]}' (template {job.serializer.template.name})", job.strict)
        return None
    if not text.strip():
        result.bad(raw, "empty document", job.strict)
        return None
    if job.max_doc_chars and len(text) > job.max_doc_chars:
        result.bad(raw, f"document over --max-doc-chars ({len(text):,} > {job.max_doc_chars:,} characters)", job.strict)
        return None
    key = job.serializer.split_key(raw.record, text)
    split = "valid" if is_validation(key, job.valid_fraction) else "train"
    return text, job.serializer.language(raw.record), split


def encode_unit(job: EncodeJob, unit: WorkUnit, part_prefix: str) -> UnitResult:
    """Read, serialize, split, filter (--domain-filter) and tokenize one unit into
    ``{part_prefix}_{split}.tokens/.lengths.npy``."""
    result = UnitResult(unit)
    writer = PartWriter(job, part_prefix, result)
    batch: list[tuple[RawRecord, str, str, str]] = []  # (raw, text, language, split)
    domain_filter = None
    if job.domain_threshold is not None:
        from ellama_megatron.classify.filter import DomainFilter

        domain_filter = DomainFilter(_BACKENDS["domain_classifier"], job.domain_threshold)
        result.domain_filter = domain_filter.stats

    def flush() -> None:
        if domain_filter is not None and batch:
            # Serialized text is what the classifier was trained on; dropped documents cost no tokenization.
            kept = domain_filter.keep_batch([t for _, t, _, _ in batch])
            batch[:] = [item for item, k in zip(batch, kept) if k]
        writer.add(batch)
        batch.clear()

    try:
        for raw in read_unit(unit):
            result.records += 1
            if raw.error is not None:
                result.bad(raw, raw.error, job.strict)
                continue
            doc = serialize_record(job, raw, result)
            if doc is None:
                continue
            batch.append((raw, *doc))
            if len(batch) >= job.batch_docs:
                flush()
        flush()
    finally:
        writer.close()
    writer.save()
    return result


def merge_parts(part_prefixes: list[str], out_prefix: str, dtype: type) -> None:
    """Write ``out_prefix``.bin/.idx with Megatron's IndexedDatasetBuilder from raw parts, in order.

    Equivalent to ``builder.add_document(doc, [len(doc)])`` for every document (what Megatron-LM's
    preprocess_data does), with the payload copied a part at a time instead of a document at a time.
    """
    import shutil

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    builder = IndexedDatasetBuilder(get_bin_path(out_prefix), dtype=dtype)
    for prefix in part_prefixes:
        with open(f"{prefix}.tokens", "rb") as f:
            shutil.copyfileobj(f, builder.data_file, 16 << 20)
        sizes = numpy.load(f"{prefix}.lengths.npy").tolist()
        base = len(builder.sequence_lengths)
        builder.sequence_lengths.extend(sizes)
        builder.document_indices.extend(range(base + 1, base + len(sizes) + 1))
    builder.finalize(get_idx_path(out_prefix))
