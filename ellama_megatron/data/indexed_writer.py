"""One work unit -> raw token parts per split; parts -> the final Megatron indexed dataset.

Workers write each part as the .bin payload (token ids in the dataset's dtype, each document
opened by BOS and followed by EOD as data/document_tokens.py decided) plus the documents' lengths.
The main process joins the parts in input order and writes the .idx (formats/indexed_dataset.py):
one sequence per document, exactly what Megatron-LM's tools/preprocess_data.py writes for the same
ids (``--append-eod``, no sentence splitting). The result does not depend on the number of workers.

Nothing here imports Megatron-Core or torch (seconds of import time per process, for nothing).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy

from ellama_megatron.data import readers
from ellama_megatron.data.document_tokens import rust_tokenizer
from ellama_megatron.data.readers import RawRecord, WorkUnit
from ellama_megatron.data.serializers import MissingField, RecordSerializer, serialize, text_as_given_key
from ellama_megatron.data.validation_split import is_validation
from ellama_megatron.formats import indexed_dataset

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

    def add_many(self, language: str, documents: int, tokens: int, text_bytes: int) -> None:
        """``documents`` documents of one language holding ``tokens`` tokens and ``text_bytes`` bytes."""
        self.documents += documents
        self.tokens += tokens
        self.text_bytes += text_bytes
        entry = self.languages.setdefault(language, {"documents": 0, "tokens": 0})
        entry["documents"] += documents
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
    """The Rust tokenizer every unit of this process encodes with (pool initializer, or the main
    process, which already built it for its checks)."""
    _BACKENDS["tokenizer"] = rust_tokenizer(backend_json)


def install_domain_classifier(classifier) -> None:
    """The classify.DomainClassifier every unit of this process filters with (loaded once by the
    main process and sent to each worker once, not with every unit)."""
    _BACKENDS["domain_classifier"] = classifier


def worker_init(backend_json: str, rayon_threads: int, classifier=None) -> None:
    # Several worker processes each with a Rust thread per core would oversubscribe the CPU.
    os.environ["RAYON_NUM_THREADS"] = str(rayon_threads)
    _BACKENDS["cores"] = rayon_threads  # this worker's share: reading runs ahead only with more than one
    install_tokenizer(backend_json)
    install_domain_classifier(classifier)


def batch_encoded() -> bool:
    """Whether this process has batch-encoded, which starts the tokenizer's thread pool."""
    return _BACKENDS.get("batch_encoded", False)


def _encode(texts: list[str], add_special_tokens: bool) -> list:
    _BACKENDS["batch_encoded"] = True
    tok = _BACKENDS["tokenizer"]
    fast = getattr(tok, "encode_batch_fast", None)  # skips offsets, which we do not need
    return (fast or tok.encode_batch)(texts, add_special_tokens=add_special_tokens)


def _utf8_bytes(texts: list[str]) -> int:
    # isascii() reads a flag of the string: most documents need no encoding to be measured.
    return sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)


@dataclass
class Batch:
    """Serialized documents on their way to the tokenizer, as parallel lists (no object per
    document): ``where`` is each one's RawRecord, or a position its writer's ``locate`` turns into
    one when the document must be reported."""

    where: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    records: int = 0  # records read for this batch, good and bad (data/indexed_writer.py's reader)
    bad: list = field(default_factory=list)  # (RawRecord, reason) of the bad ones among them, in order

    def append(self, where, text: str, language: str, split: str) -> None:
        self.where.append(where)
        self.texts.append(text)
        self.languages.append(language)
        self.splits.append(split)

    def select(self, keep) -> Batch:
        """The documents whose ``keep`` is true, in order (no bad records: those are counted first)."""
        return Batch(*([x for x, k in zip(column, keep) if k] for column in self.columns()))

    def columns(self) -> tuple[list, list, list, list]:
        return self.where, self.texts, self.languages, self.splits

    def __len__(self) -> int:
        return len(self.texts)


class PartWriter:
    """Tokenizes batches of serialized documents and appends them to raw parts, one per split
    (``{part_prefix}_{split}.tokens`` and ``.lengths.npy``): the encode and write half of a unit,
    shared by encode_unit and the datatrove pipeline (data/pipeline.py). Ids go from the tokenizer's
    lists to the file through one numpy array per batch, with no per-document array."""

    def __init__(self, job: EncodeJob, part_prefix: str, result: UnitResult, locate=None):
        self.job, self.part_prefix, self.result = job, part_prefix, result
        self.locate = locate or (lambda where: where)  # ``where`` -> RawRecord
        self.token_files = {s: open(f"{part_prefix}_{s}.tokens", "wb") for s in SPLITS}
        self.lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
        eod = [job.eod_id]
        self._around = ([job.prepend_bos], eod) if job.prepend_bos is not None else (eod,)

    def add(self, batch: Batch) -> None:
        """Encode and write ``batch``, in order."""
        if not batch:
            return
        job = self.job
        try:
            encodings = _encode(batch.texts, job.add_special_tokens)
        except Exception:  # noqa: BLE001 - one untokenizable text (e.g. a lone surrogate) fails the batch
            for i, text in enumerate(batch.texts):
                try:
                    encodings = _encode([text], job.add_special_tokens)
                except Exception as e:  # noqa: BLE001
                    self.result.bad(self.locate(batch.where[i]), f"cannot be tokenized ({e})", job.strict)
                else:
                    self._write(batch.select([j == i for j in range(len(batch))]), encodings)
        else:
            self._write(batch, encodings)

    def _write(self, batch: Batch, encodings) -> None:
        ids = [e.ids for e in encodings]
        sizes = list(map(len, ids))
        if 0 in sizes:  # rare: a text the tokenizer maps to nothing
            for i in (i for i, n in enumerate(sizes) if n == 0):
                self.result.bad(self.locate(batch.where[i]), "no tokens", self.job.strict)
            keep = [n > 0 for n in sizes]
            batch, ids = batch.select(keep), [x for x, k in zip(ids, keep) if k]
        first = batch.splits[0] if batch.splits else None
        if all(s == first for s in batch.splits):
            if first is not None:
                self._append(first, ids, batch.texts, batch.languages)
            return
        for split in SPLITS:
            mine = [i for i, s in enumerate(batch.splits) if s == split]
            if mine:
                self._append(
                    split, [ids[i] for i in mine], [batch.texts[i] for i in mine], [batch.languages[i] for i in mine]
                )

    def _append(self, split: str, ids: list[list[int]], texts: list[str], languages: list[str]) -> None:
        """Documents of one split: each one's ids between the BOS (when prepended) and the EOD, all
        of them in one array."""
        around, n = self._around, len(ids)
        pieces = [around[-1]] * (n * (len(around) + 1))  # EOD everywhere, then the ids and BOS in their places
        pieces[len(around) - 1 :: len(around) + 1] = ids
        if len(around) == 2:
            pieces[0::3] = [around[0]] * n
        sizes = [len(x) + len(around) for x in ids]
        total = sum(sizes)
        numpy.fromiter(itertools.chain.from_iterable(pieces), dtype=self.job.dtype, count=total).tofile(
            self.token_files[split]
        )
        self.lengths[split].extend(sizes)
        stats = self.result.splits[split]
        if all(lang == languages[0] for lang in languages):
            stats.add_many(languages[0], n, total, _utf8_bytes(texts))
        else:
            for lang, size, text in zip(languages, sizes, texts):
                stats.add_many(lang, 1, size, _utf8_bytes([text]))

    def close(self) -> None:
        """Close the token files; ``save`` the lengths only when the part is complete."""
        for f in self.token_files.values():
            f.close()

    def save(self) -> None:
        self.close()
        for s in SPLITS:
            numpy.save(f"{self.part_prefix}_{s}.lengths.npy", numpy.asarray(self.lengths[s], dtype=numpy.int64))


def serialize_record(job: EncodeJob, record: dict, result: UnitResult, where) -> tuple[str, str, str] | None:
    """(text, language, split) of a readable record, or None when it is bad (counted in ``result``
    under ``where``, its RawRecord, or BadRecordError with --strict)."""
    try:
        text = serialize(record, job.serializer.template)
    except MissingField as e:
        result.bad(where, f"missing field '{e.args[0]}' (template {job.serializer.template.name})", job.strict)
        return None
    if not text.strip():
        result.bad(where, "empty document", job.strict)
        return None
    if job.max_doc_chars and len(text) > job.max_doc_chars:
        result.bad(
            where, f"document over --max-doc-chars ({len(text):,} > {job.max_doc_chars:,} characters)", job.strict
        )
        return None
    split = "train"
    if job.valid_fraction > 0:
        split = "valid" if is_validation(job.serializer.split_key(record, text), job.valid_fraction) else "train"
    return text, job.serializer.language(record), split


class _Deferred:
    """Stands for the unit's result while a batch is read: its bad records are kept on the batch and
    counted by the thread that encodes it, in reading order (one writer of the result)."""

    def __init__(self, batch: Batch):
        self.batch = batch

    def bad(self, where, reason: str, strict: bool) -> None:
        self.batch.bad.append((where, reason))


def _read_batches(job: EncodeJob, unit: WorkUnit, locate) -> Iterator[Batch]:
    """The unit's documents, serialized, in batches of ``job.batch_docs``, each carrying the records
    read and the bad ones found before its documents were complete."""
    serializer, max_chars = job.serializer, job.max_doc_chars
    # The plain template on a string needs no rendering, and without a held-out split no hashing.
    plain_key = text_as_given_key(serializer.template) if job.valid_fraction == 0 else None
    language_key, default_language = serializer.language_key, serializer.default_language
    batch = Batch()
    for position, record in readers.read_unit_records(unit):
        batch.records += 1
        if type(record) is not dict:
            batch.bad.append((record, record.error))
        else:
            text = record.get(plain_key) if plain_key is not None else None
            if type(text) is str and text and not text.isspace() and not (max_chars and len(text) > max_chars):
                language = default_language if language_key not in record else serializer.language(record)
                batch.append(position, text, language, "train")
            elif (doc := serialize_record(job, record, _Deferred(batch), locate(position))) is not None:
                batch.append(position, *doc)
        if len(batch) >= job.batch_docs:
            yield batch
            batch = Batch()
        elif len(batch.bad) >= job.batch_docs:  # a long run of bad records: report them, keep the documents
            yield Batch(records=batch.records, bad=batch.bad)
            batch.records, batch.bad = 0, []
    yield batch


def _read_ahead(batches: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """``batches`` produced on a thread while the caller encodes the previous ones: reading and JSON
    parsing hold the interpreter lock, the tokenizer's encode releases it, so with a core to spare
    the two overlap. An error of the reader is raised in the caller."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def read() -> None:
        try:
            for b in batches:
                if stop.is_set():
                    return
                ready.put(b)
            ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
            ready.put(e)

    reader = threading.Thread(target=read, name="read-ahead", daemon=True)
    reader.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting to put
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass


def encode_unit(job: EncodeJob, unit: WorkUnit, part_prefix: str) -> UnitResult:
    """Read, serialize, split, filter (--domain-filter) and tokenize one unit into
    ``{part_prefix}_{split}.tokens/.lengths.npy``; reading runs ahead on a thread when this process
    has more than one core (``_read_ahead``)."""
    result = UnitResult(unit)

    def locate(position: int) -> RawRecord:
        return RawRecord(unit.path, readers.locate(unit, position), None)

    writer = PartWriter(job, part_prefix, result, locate)
    domain_filter = None
    if job.domain_threshold is not None:
        from ellama_megatron.classify.filter import DomainFilter

        domain_filter = DomainFilter(_BACKENDS["domain_classifier"], job.domain_threshold)
        result.domain_filter = domain_filter.stats
    batches = _read_batches(job, unit, locate)
    if _BACKENDS.get("cores", len(os.sched_getaffinity(0))) > 1:
        batches = _read_ahead(batches)
    try:
        for batch in batches:
            result.records += batch.records
            for where, reason in batch.bad:
                result.bad(where, reason, job.strict)
            if domain_filter is not None and batch:
                # Serialized text is what the classifier was trained on; dropped documents cost no tokenization.
                batch = batch.select(domain_filter.keep_batch(batch.texts))
            writer.add(batch)
    finally:
        writer.close()
    writer.save()
    return result


def merge_parts(part_prefixes: list[str], out_prefix: str, dtype: type) -> None:
    """Write the dataset ``out_prefix`` (formats/indexed_dataset.py) from raw parts, in order: the
    same bytes as ``add_document(doc, [len(doc)])`` for every document (what Megatron-LM's
    preprocess_data does), the payload copied a part at a time instead of a document at a time."""
    indexed_dataset.write_payloads(
        out_prefix, ((f"{p}.tokens", numpy.load(f"{p}.lengths.npy")) for p in part_prefixes), dtype
    )
