"""Corpus files -> Megatron indexed datasets (train and validation) plus a manifest.

Order of work: every check that can fail cheaply (outputs, tokenizer, inputs readable, template
fits the data) runs before any tokenization. Then work units are encoded in parallel, each into
its own partial dataset inside a temporary folder beside the output; the parts are merged in
input order, renamed into place, and the manifest is written last.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy

from ellama_megatron.data import indexed_writer
from ellama_megatron.data.document_tokens import DocumentTokens, document_tokens
from ellama_megatron.data.indexed_writer import SPLITS, EncodeJob, SplitStats, UnitResult, encode_unit, merge_parts
from ellama_megatron.data.manifest import (
    MANIFEST_FORMAT,
    file_sha256,
    manifest_path,
    output_files,
    split_prefix,
)
from ellama_megatron.data.readers import (
    InputError,
    WorkUnit,
    check_readable,
    expand_inputs,
    read_unit,
    split_into_units,
)
from ellama_megatron.data.serializers import MissingField, RecordSerializer, serialize
from ellama_megatron.formats import indexed_dataset
from ellama_megatron.formats.atomic import write_json_atomic
from ellama_megatron.formats.tokenizer_folder import TokenizerInfo, load_tokenizer_folder

MAX_EXAMPLES = 100
DEFAULT_MAX_DOC_CHARS = 5_000_000  # about 1 GB to tokenize; a long novel has 1-2 million characters
PREFLIGHT_RECORDS = 100


@dataclass
class PreprocessOptions:
    inputs: list[str]
    output_prefix: str
    tokenizer_dir: str
    serializer: RecordSerializer
    source: str | None = None  # name recorded in the manifest; default: the prefix's file name
    valid_fraction: float = 0.0
    workers: int = 1
    shard_bytes: int = 64 << 20  # plain JSONL and Parquet inputs are cut into units of about this size
    batch_docs: int = 1000
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    domain_filter: str | None = None  # classifier folder (tools/domain_classifier.py train): keep what it scores above
    domain_threshold: float | None = None  # the filter's threshold; None: the one stored with the classifier
    bos: str = "auto"  # auto (what the tokenizer's template adds), always, never: data/document_tokens.py
    eod_token: str | None = None  # appended after every document; None: the folder's eos_token (chat eos refused)
    bos_token: str | None = None  # the BOS of --bos always/auto; None: the folder's bos_token
    allow_empty: bool = False  # write a 0-document dataset instead of refusing (usually a wrong input or filter)
    # Tokenizing a document takes about 200x its size in memory (a 50 MB line: 10 GB); longer ones are
    # skipped and counted under their reason in the summary. 0 = no limit.
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS


def _check_outputs(opts: PreprocessOptions) -> None:
    out_dir = Path(opts.output_prefix).parent
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output-prefix {opts.output_prefix}: {out_dir} is not a folder")
    existing = [str(p) for p in output_files(opts.output_prefix) if p.exists()]
    if existing and not opts.overwrite:
        raise InputError(
            f"--output-prefix {opts.output_prefix}: output exists ({', '.join(existing)}). "
            "Choose another prefix or pass --overwrite."
        )


# Each run's temporary folder holds this file (host and pid), so a later run on the same prefix
# can tell a folder left by a killed run from one a live run is writing.
OWNER_FILE = "owner"
# A folder without an owner file (written before it was kept) counts as stale after this long.
STALE_UNOWNED_SECONDS = 24 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_folders(out_prefix: Path) -> list[Path]:
    """Remove the temporary folders beside ``out_prefix`` left by runs that died (kill -9, a lost
    node); returns them. A folder whose owner runs on another host or is still alive is kept."""
    removed = []
    host = os.uname().nodename
    for folder in sorted(out_prefix.parent.glob(f".{out_prefix.name}.tmp-*")):
        if not folder.is_dir():
            continue
        try:
            owner_host, pid = (folder / OWNER_FILE).read_text().split()
            stale = owner_host == host and not _pid_alive(int(pid))
        except (OSError, ValueError):
            try:
                stale = time.time() - folder.stat().st_mtime > STALE_UNOWNED_SECONDS
            except OSError:
                continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _preflight(units, serializer: RecordSerializer) -> None:
    """Fail fast when the template fits none of the first records (wrong template or key names)."""
    reasons: Counter = Counter()
    keys: set = set()
    seen = 0
    for raw in read_unit(units[0]):
        seen += 1
        if raw.record is not None:
            keys.update(raw.record)
            try:
                if serialize(raw.record, serializer.template).strip():
                    return
                reasons["empty document"] += 1
            except MissingField as e:
                reasons[f"missing field '{e.args[0]}'"] += 1
        else:
            reasons[raw.error.split(" (")[0]] += 1
        if seen >= PREFLIGHT_RECORDS:
            break
    if seen == 0:
        return  # an empty first file is reported by the summary, not an error
    raise InputError(
        f"{units[0].path}: none of the first {seen} records fits template '{serializer.template.name}' "
        f"({dict(reasons)}); keys seen: {sorted(keys)}. Pick the right --template or --text-key."
    )


def _load_domain_filter(opts: PreprocessOptions):
    """The classifier and the threshold it will keep documents above, checked before any work."""
    if opts.domain_filter is None:
        if opts.domain_threshold is not None:
            raise InputError("--domain-threshold needs --domain-filter MODEL_DIR")
        return None, None
    from ellama_megatron.classify.filter import DomainFilter

    try:
        f = DomainFilter(opts.domain_filter, opts.domain_threshold)
    except (ValueError, OSError) as e:
        raise InputError(f"--domain-filter: {e}") from None
    return f.classifier, f.threshold


def domain_filter_manifest(opts: PreprocessOptions, threshold: float, parts) -> dict:
    """What the filter saw and kept over all ``parts`` (classify.FilterStats), and which classifier it was."""
    from ellama_megatron.classify.filter import FilterStats
    from ellama_megatron.classify.model import META_FILE

    stats = FilterStats(threshold)
    for part in parts:
        stats.merge(part)
    meta = Path(opts.domain_filter) / META_FILE
    return {"model": str(opts.domain_filter), "model_sha256": file_sha256(meta), **stats.to_dict()}


def _worker_pool(checked: CheckedInputs, workers: int):
    """The worker processes of ``workers`` > 1 (None for 1: units are encoded in this process).

    Forked, so each inherits the Rust tokenizer this process built for its checks (building Llama
    3's again costs each spawned worker 0.4 s or more, and its imports as much): started before this
    process starts any thread (checksums, progress bar) and after it only ran single-text encodes,
    which leave the tokenizer's thread pool unstarted, the one thing a fork would break. Each worker
    then starts its pool with its share of the cores. A process that already runs threads of its
    own (a caller's) or the tokenizer's pool (a batch encode of an earlier run in the same process)
    spawns its workers instead: a fork copies locks those threads may hold. (numpy's OpenBLAS
    threads are there from its import on; OpenBLAS prepares itself for a fork.)"""
    if workers <= 1:
        return None
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    fork = threading.active_count() == 1 and not indexed_writer.batch_encoded()
    return multiprocessing.get_context("fork" if fork else "spawn").Pool(
        workers,
        initializer=indexed_writer.worker_init,
        initargs=(checked.tok.backend_json, threads, checked.classifier),
    )


class _JoinedParts:
    """The parts of the finished units appended, in input order, to one part per split as they come
    in: with worker processes the main process does it while they encode (it is idle otherwise),
    and the final dataset is then a rename, not a copy of every token at the end."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.files = {s: open(f"{prefix}_{s}.tokens", "wb") for s in SPLITS}
        self.lengths: dict[str, list] = {s: [] for s in SPLITS}

    def append(self, part: str) -> None:
        for s in SPLITS:
            if self.files[s].tell() == 0:  # nothing joined yet: the part becomes the joined file
                self.files[s].close()
                os.replace(f"{part}_{s}.tokens", f"{self.prefix}_{s}.tokens")
                self.files[s] = open(f"{self.prefix}_{s}.tokens", "ab")
            else:
                with open(f"{part}_{s}.tokens", "rb") as f:
                    shutil.copyfileobj(f, self.files[s], 16 << 20)
            self.lengths[s].append(numpy.load(f"{part}_{s}.lengths.npy"))
            for suffix in (".tokens", ".lengths.npy"):
                Path(f"{part}_{s}{suffix}").unlink(missing_ok=True)

    def close(self) -> None:
        for s in SPLITS:
            self.files[s].close()
            lengths = numpy.concatenate(self.lengths[s]) if self.lengths[s] else numpy.zeros(0, numpy.int64)
            numpy.save(f"{self.prefix}_{s}.lengths.npy", lengths)


def _run_units(job: EncodeJob, units, tmp_dir: str, tokenizer_json: str, pool, progress: bool, classifier=None):
    """Encode every unit (in this process, or in ``pool``'s); returns the joined part and the units' results."""
    parts = [os.path.join(tmp_dir, f"part{i:05d}") for i in range(len(units))]
    from tqdm import tqdm

    bar = tqdm(total=sum(u.size for u in units), unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    joined = _JoinedParts(os.path.join(tmp_dir, "joined"))
    results = []
    try:
        if pool is None:
            indexed_writer.install_tokenizer(tokenizer_json)
            indexed_writer.install_domain_classifier(classifier)
            finished = (encode_unit(job, unit, part) for unit, part in zip(units, parts))
        else:
            finished = (r.get() for r in [pool.apply_async(encode_unit, (job, u, p)) for u, p in zip(units, parts)])
        for unit, part, result in zip(units, parts, finished):
            joined.append(part)
            results.append(result)
            bar.update(unit.size)
    finally:
        joined.close()
    bar.close()
    return [joined.prefix], results


@dataclass
class CheckedInputs:
    """What the checks found, before any tokenization: shared by preprocess() and the datatrove
    pipeline (data/pipeline.py)."""

    tok: TokenizerInfo
    specials: DocumentTokens
    files: list[Path]
    units: list[WorkUnit]
    job: EncodeJob
    classifier: object  # classify.DomainClassifier with --domain-filter, else None
    threshold: float | None


def check_inputs(opts: PreprocessOptions, parallel: int | None = None, check_outputs: bool = True) -> CheckedInputs:
    """Every check that can fail cheaply (options, outputs, tokenizer, inputs readable, template fits
    the data, classifier), and the inputs cut into work units for ``parallel`` readers (default
    --workers). InputError (or the tokenizer's and BOS/EOD's errors) naming the option and the fix."""
    if opts.shard_bytes < 1 or opts.workers < 1 or opts.batch_docs < 1:
        raise InputError("--shard-mb, --workers and --batch-docs must be at least 1")
    if opts.max_doc_chars < 0:
        raise InputError(f"--max-doc-chars {opts.max_doc_chars}: must be 0 (no limit) or more")
    if not 0.0 <= opts.valid_fraction < 1.0:
        raise InputError(f"--valid-fraction {opts.valid_fraction}: must be in [0, 1)")
    if check_outputs:
        _check_outputs(opts)
    tok = load_tokenizer_folder(opts.tokenizer_dir)
    specials = document_tokens(
        opts.tokenizer_dir, tok.backend_json, tok.bos_id, tok.eos_id, opts.bos, opts.eod_token, opts.bos_token
    )
    files = expand_inputs(opts.inputs)
    for f in files:
        check_readable(f)
    # About 16 units per reader where inputs can be cut (none under 1 MB), so no reader idles long at
    # the end: the last unit is what one core works on alone.
    parallel = opts.workers if parallel is None else parallel
    total = sum(os.path.getsize(f) for f in files)
    shard = opts.shard_bytes if parallel == 1 else min(opts.shard_bytes, max(1 << 20, total // (16 * parallel)))
    if total == 0 and not opts.allow_empty:
        raise InputError(
            f"--input {' '.join(map(str, files))}: empty (0 bytes); nothing to preprocess. "
            "Check the path, or pass --allow-empty to write a 0-document dataset"
        )
    units = split_into_units(files, shard_bytes=shard)
    _preflight(units, opts.serializer)
    classifier, threshold = _load_domain_filter(opts)
    job = EncodeJob(
        opts.serializer,
        opts.valid_fraction,
        specials.eod_id,
        tok.dtype,
        opts.batch_docs,
        opts.strict,
        threshold,
        specials.add_special_tokens,
        specials.prepend_bos,
        opts.max_doc_chars,
    )
    return CheckedInputs(tok, specials, files, units, job, classifier, threshold)


def build_manifest(
    opts: PreprocessOptions,
    checked: CheckedInputs,
    splits: dict,
    inputs: list[dict],
    skipped: Counter,
    examples: list,
    domain_filter: dict | None,
    seconds: float,
    **extra,
) -> dict:
    """The manifest of one output prefix; ``splits``: {split: {"prefix", **SplitStats.to_dict()}} of
    the splits written; ``extra`` fields (a pipeline task's rank) go at the end."""
    return {
        "format": MANIFEST_FORMAT,
        "source": opts.source or Path(opts.output_prefix).name,
        "splits": splits,
        "valid_fraction": opts.valid_fraction,
        "split_by": f"id:{opts.serializer.id_key}" if opts.serializer.id_key else "text",
        "template": opts.serializer.template.to_dict(),
        "language_key": opts.serializer.language_key,
        "tokenizer": checked.tok.identity(),
        "documents": checked.specials.manifest(),  # the BOS and EOD really written around every document
        "inputs": inputs,
        "records": sum(i["records"] for i in inputs),
        "skipped": {"count": sum(skipped.values()), "by_reason": dict(skipped.most_common()), "examples": examples},
        "domain_filter": domain_filter,
        "seconds": round(seconds, 2),
        "workers": opts.workers,
        **extra,
    }


def no_document_error(files, records: int, skipped: Counter) -> InputError:
    return InputError(
        f"--input {' '.join(map(str, files))}: no document left to write ({records} records read, "
        f"{sum(skipped.values())} skipped: {dict(skipped.most_common(3))}); check --template, "
        "--text-key and the domain filter, or pass --allow-empty to write a 0-document dataset"
    )


def finalize_outputs(
    opts: PreprocessOptions,
    checked: CheckedInputs,
    out_prefix: Path,
    work_dir: Path,
    parts: list[str],
    results: list[UnitResult],
    records_per_file: dict[str, int],
    digests: dict[str, str | None],
    start: float,
    require_documents: bool,
    **extra,
) -> dict:
    """The tail both drivers share (preprocess() and a pipeline task, data/pipeline.py): the counts of
    ``results`` summed, the raw ``parts`` (in ``work_dir``, in input order) merged into one dataset per
    split, the old outputs of ``out_prefix`` replaced, and its manifest written last; returns it.
    ``records_per_file``: records read per input, in the manifest's order; ``digests``: their sha256
    (None where not computed). With ``require_documents``, no document at all is an InputError before
    any output changes. ``extra`` goes to the manifest (a pipeline task's rank)."""
    splits = {s: SplitStats() for s in SPLITS}
    skipped: Counter = Counter()
    examples: list = []
    for r in results:
        for s in SPLITS:
            splits[s].merge(r.splits[s])
        skipped.update(r.skipped)
        examples.extend(r.examples[: MAX_EXAMPLES - len(examples)])
    if require_documents and sum(splits[s].documents for s in SPLITS) == 0:
        raise no_document_error(list(records_per_file), sum(records_per_file.values()), skipped)
    written = [s for s in SPLITS if s == "train" or splits[s].documents > 0]
    for s in written:
        merge_parts([f"{p}_{s}" for p in parts], str(work_dir / s), checked.job.dtype)
    # From here on the outputs change: old ones (when overwriting) go first, manifest first, so an
    # interruption never leaves a manifest describing datasets it does not match.
    for p in output_files(out_prefix):
        p.unlink(missing_ok=True)
    for s in written:
        indexed_dataset.replace(work_dir / s, split_prefix(out_prefix, s))
    domain_filter = None
    if checked.threshold is not None:
        filtered = [r.domain_filter for r in results if r.domain_filter is not None]
        domain_filter = domain_filter_manifest(opts, checked.threshold, filtered)
    manifest = build_manifest(
        opts,
        checked,
        splits={s: {"prefix": Path(split_prefix(out_prefix, s)).name, **splits[s].to_dict()} for s in written},
        inputs=[
            {"path": path, "bytes": os.path.getsize(path), "sha256": digests.get(path), "records": n}
            for path, n in records_per_file.items()
        ],
        skipped=skipped,
        examples=examples,
        domain_filter=domain_filter,
        seconds=time.time() - start,
        **extra,
    )
    write_json_atomic(manifest_path(out_prefix), manifest)
    return manifest


def preprocess(opts: PreprocessOptions) -> dict:
    """Run the whole pipeline; returns the manifest (also written to ``<prefix>.manifest.json``)."""
    start = time.time()
    checked = check_inputs(opts)
    files, job = checked.files, checked.job
    out_prefix = Path(opts.output_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    for folder in remove_stale_temp_folders(out_prefix):
        print(f"removed {folder}: temporary folder of an earlier run on this prefix that died", file=sys.stderr)
    tmp_dir = tempfile.mkdtemp(prefix=f".{out_prefix.name}.tmp-", dir=out_prefix.parent)
    pool = _worker_pool(checked, opts.workers)
    try:
        Path(tmp_dir, OWNER_FILE).write_text(f"{os.uname().nodename} {os.getpid()}\n")
        with ThreadPoolExecutor(1) as hasher:  # checksums overlap with tokenization
            digests = hasher.map(file_sha256, files)
            parts, results = _run_units(
                job, checked.units, tmp_dir, checked.tok.backend_json, pool, opts.progress, checked.classifier
            )
            checksums = list(digests)
        records: Counter = Counter()
        for r in results:
            records[r.unit.path] += r.records
        return finalize_outputs(
            opts,
            checked,
            out_prefix,
            Path(tmp_dir),
            parts,
            results,
            records_per_file={str(f): records[str(f)] for f in files},
            digests=dict(zip(map(str, files), checksums)),
            start=start,
            require_documents=not opts.allow_empty,
        )
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(tmp_dir, ignore_errors=True)


def summary_line(manifest: dict) -> str:
    tr = manifest["splits"]["train"]
    va = manifest["splits"].get("valid", {"documents": 0, "tokens": 0})
    secs = max(manifest["seconds"], 1e-9)
    total = tr["tokens"] + va["tokens"]
    df = manifest.get("domain_filter")
    filtered = f"domain filter kept {df['kept']:,}/{df['docs']:,} docs (score > {df['threshold']}), " if df else ""
    docs = manifest.get("documents")
    if docs:
        bos = f"BOS {docs['bos']['token_id']}" if docs["bos"]["written"] else "no BOS"
        filtered += f"{bos} (--bos {docs['bos']['policy']}), EOD {docs['eod']['token_id']} {docs['eod']['token']}, "
    return (
        f"{manifest['source']}: {tr['documents']:,} train docs / {tr['tokens']:,} tokens, "
        f"{va['documents']:,} valid docs / {va['tokens']:,} tokens, {filtered}"
        f"{manifest['skipped']['count']:,} skipped, {total / secs:,.0f} tokens/s ({manifest['seconds']} s)"
    )
