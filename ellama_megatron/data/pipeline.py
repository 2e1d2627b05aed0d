"""Preprocessing as datatrove pipeline steps: the same stages as tools/preprocess_data.py, spread
over N tasks that datatrove's executors run on one machine (LocalPipelineExecutor) or as a Slurm
job array (SlurmPipelineExecutor: job arrays, completion markers, requeue on SIGUSR1).

    ReadRecords -> SerializeRecords -> DomainFilterStep (with --domain-filter) -> WriteIndexedDatasets

The inputs are cut into work units once, by the launcher (data/readers.py: byte ranges of JSONL,
row groups of Parquet), and task r reads the r-th contiguous run of them, so the task outputs in
rank order hold the documents in the order preprocess_data.py writes them. Records are read and
serialized by our readers and templates, held out by document hash (data/validation_split.py), and
tokenized and written by our byte-identical writer (data/indexed_writer.py); datatrove's own
MegatronDocumentTokenizer was slower on the same corpus (docs/data.md, "Many nodes").

Task r of N writes ``PREFIX-0000r-of-0000N_train/_valid.bin/.idx`` and its own manifest
``PREFIX-0000r-of-0000N.manifest.json`` (a complete manifest: the engine's checks read it), all
built in ``.PREFIX-0000r-of-0000N.tmp`` and renamed into place at the task's end; a rerun of the
task (after a kill, a failure or a requeue) deletes that folder first, so its output is replaced,
never appended to. Whichever task finds all N task manifests present writes ``PREFIX.manifest.json``,
their sum, whose splits list the task prefixes as ``parts``: tools/plan_blend.py and the engine
read it like any manifest, with no merge step.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.batching import batched

from ellama_megatron.data import indexed_writer
from ellama_megatron.data.indexed_writer import SPLITS, Batch, PartWriter, SplitStats, UnitResult, serialize_record
from ellama_megatron.data.manifest import MANIFEST_FORMAT, file_sha256, manifest_path, output_files, read_manifest
from ellama_megatron.data.preprocess import (
    MAX_EXAMPLES,
    CheckedInputs,
    PreprocessOptions,
    check_inputs,
    finalize_outputs,
    no_document_error,
)
from ellama_megatron.data.readers import InputError, WorkUnit, read_unit
from ellama_megatron.formats.atomic import write_json_atomic

# Test hook: the task of this rank raises after writing its first batch, leaving a partial output
# behind as a killed task does (tests/test_prepare_data.py checks the rerun replaces it).
FAIL_TASK_ENV = "ELLAMA_PREPARE_FAIL_TASK"


def task_prefix(output_prefix: str | Path, rank: int, tasks: int) -> str:
    """The output prefix of one task: ``data/listings-00002-of-00008``."""
    return f"{output_prefix}-{rank:05d}-of-{tasks:05d}"


def assign_units(units: list[WorkUnit], tasks: int) -> list[list[WorkUnit]]:
    """Contiguous runs of ``units`` of about equal bytes, one per task (some empty when there are
    fewer units than tasks): a unit goes to the task its middle byte falls in."""
    total = sum(u.size for u in units)
    out: list[list[WorkUnit]] = [[] for _ in range(tasks)]
    done = 0
    for u in units:
        rank = min(tasks - 1, int((done + u.size / 2) * tasks / total)) if total else 0
        out[rank].append(u)
        done += u.size
    return out


class TaskLedger:
    """What one task read and dropped, shared by its steps (they run in one process, one task at
    a time; an array element with --tasks-per-job runs several in turn): records per input file,
    bad records by reason, split statistics and filter counts."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.totals = UnitResult(None)
        self.records_per_file: Counter = Counter()
        self.checksummed: set[str] = set()  # files whose first unit this task read (it checksums them)


class ReadRecords(PipelineStep):
    """Task ``rank``'s work units through our readers (file and line of every record kept for
    reports); unreadable records are counted, not passed on."""

    name = "our readers"
    type = "📖 - READER"

    def __init__(self, units_per_task: list[list[WorkUnit]], ledger: TaskLedger, strict: bool):
        super().__init__()
        self.units_per_task, self.ledger, self.strict = units_per_task, ledger, strict

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if world_size != len(self.units_per_task):
            raise ValueError(f"planned for {len(self.units_per_task)} tasks, run with {world_size}")
        for unit in self.units_per_task[rank]:
            if unit.start == 0:
                self.ledger.checksummed.add(unit.path)
            for raw in read_unit(unit):
                self.ledger.records_per_file[unit.path] += 1
                if raw.error is not None:
                    self.ledger.totals.bad(raw, raw.error, self.strict)
                    self.stat_update("bad_records")
                    continue
                self.stat_update("records")
                yield Document(text="", id=f"{raw.path}:{raw.location}", metadata={"raw": raw})


class SerializeRecords(PipelineStep):
    """Record -> text through the template; the language and the split (by document hash) go to
    the document's metadata. Bad records (missing field, empty, too long) are counted and dropped."""

    name = "template"
    type = "🔧 - SERIALIZER"

    def __init__(self, job: indexed_writer.EncodeJob, ledger: TaskLedger):
        super().__init__()
        self.job, self.ledger = job, ledger

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            raw = doc.metadata["raw"]
            serialized = serialize_record(self.job, raw.record, self.ledger.totals, raw)
            if serialized is None:
                self.stat_update("dropped")
                continue
            doc.text, doc.metadata["language"], doc.metadata["split"] = serialized
            yield doc


class DomainFilterStep(PipelineStep):
    """Keep the documents the domain classifier scores strictly above the threshold (classify/filter.py),
    scored a batch at a time; the counts and score histogram go to the task's manifest."""

    name = "domain classifier"
    type = "🔻 - FILTER"

    def __init__(self, model_dir: str, threshold: float, ledger: TaskLedger, batch_docs: int):
        super().__init__()
        self.model_dir, self.threshold, self.ledger, self.batch_docs = model_dir, threshold, ledger, batch_docs

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from ellama_megatron.classify.filter import DomainFilter

        domain_filter = DomainFilter(self.model_dir, self.threshold)  # loaded in the task, not pickled with it
        self.ledger.totals.domain_filter = domain_filter.stats
        for batch in batched(data, self.batch_docs):
            for doc, kept in zip(batch, domain_filter.keep_batch([d.text for d in batch])):
                self.stat_update("kept" if kept else "dropped")
                if kept:
                    yield doc


class WriteIndexedDatasets(PipelineStep):
    """Tokenize and write the task's Megatron datasets and manifest (atomically), then the source's
    manifest when every task has written its own."""

    name = "Megatron indexed datasets"
    type = "🔢 - TOKENIZER"

    def __init__(self, opts: PreprocessOptions, checked: CheckedInputs, ledger: TaskLedger, threads: int | None = None):
        super().__init__()
        # The classifier is loaded by the filter step inside the task; it need not travel with this one.
        self.opts, self.checked, self.ledger, self.threads = (
            opts,
            dataclasses.replace(checked, classifier=None),
            ledger,
            threads,
        )

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        start = time.time()
        # The last step's body runs first (it pulls from the others), so the task's ledger starts here.
        self.ledger.reset()
        if self.threads:  # tasks sharing a machine share its cores (before the tokenizer's pool starts)
            os.environ.setdefault("RAYON_NUM_THREADS", str(self.threads))
        indexed_writer.install_tokenizer(self.checked.tok.backend_json)
        out_prefix = Path(task_prefix(self.opts.output_prefix, rank, world_size))
        tmp = out_prefix.with_name(f".{out_prefix.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a killed attempt's partial output: start over
        tmp.mkdir(parents=True)
        fail = os.environ.get(FAIL_TASK_ENV) == str(rank)
        job = self.checked.job
        # Checksums of the files whose first unit this task reads, on a thread beside tokenization.
        with ThreadPoolExecutor(1) as hasher:
            checksums: dict = {}

            def hash_new_files() -> None:
                for path in self.ledger.checksummed - checksums.keys():
                    checksums[path] = hasher.submit(file_sha256, path)

            writer = PartWriter(job, str(tmp / "part"), self.ledger.totals)
            try:
                for batch in batched(data, job.batch_docs):
                    hash_new_files()
                    with self.track_time(unit="batch"):
                        writer.add(
                            Batch(
                                [d.metadata["raw"] for d in batch],
                                [d.text for d in batch],
                                [d.metadata["language"] for d in batch],
                                [d.metadata["split"] for d in batch],
                            )
                        )
                    self.stat_update("documents", value=len(batch))
                    if fail:
                        raise RuntimeError(
                            f"{FAIL_TASK_ENV}={rank}: task {rank} fails after its first batch (test hook)"
                        )
            finally:
                writer.close()
            writer.save()
            hash_new_files()
            digests = {path: f.result() for path, f in checksums.items()}
        totals = self.ledger.totals
        finalize_outputs(
            self.opts,
            self.checked,
            out_prefix,
            tmp,
            [str(tmp / "part")],
            [totals],
            records_per_file=dict(self.ledger.records_per_file),
            digests=digests,
            start=start,
            require_documents=False,  # a task may hold nothing; finish() checks the sum of the tasks
            task={"rank": rank, "tasks": world_size},
        )
        shutil.rmtree(tmp, ignore_errors=True)
        self.stat_update("tokens", value=sum(totals.splits[s].tokens for s in SPLITS))
        write_source_manifest(self.opts.output_prefix, world_size)
        return
        yield  # a generator that yields nothing: the last step


def build_pipeline(opts: PreprocessOptions, checked: CheckedInputs, tasks: int, threads: int | None = None) -> list:
    """The datatrove pipeline of ``opts`` over ``tasks`` tasks (``checked`` from check_inputs)."""
    ledger = TaskLedger()
    steps = [
        ReadRecords(assign_units(checked.units, tasks), ledger, opts.strict),
        SerializeRecords(checked.job, ledger),
    ]
    if checked.threshold is not None:
        steps.append(DomainFilterStep(str(opts.domain_filter), checked.threshold, ledger, opts.batch_docs))
    steps.append(WriteIndexedDatasets(opts, checked, ledger, threads))
    return steps


def task_manifests(output_prefix: str | Path, tasks: int) -> list[dict] | None:
    """Every task's manifest, in rank order, or None while one is missing."""
    out = []
    for rank in range(tasks):
        path = manifest_path(task_prefix(output_prefix, rank, tasks))
        if not path.is_file():
            return None
        out.append(read_manifest(path))
    return out


def sum_manifests(manifests: list[dict], source_prefix: str | Path) -> dict:
    """The source's manifest: the tasks' counts summed; each split lists its non-empty task
    prefixes as ``parts`` (relative to the manifest's folder, as ``prefix`` is)."""
    from ellama_megatron.classify.filter import FilterStats

    first = manifests[0]
    splits = {}
    for s in SPLITS:
        entries = [m["splits"][s] for m in manifests if s in m["splits"]]
        if not entries:
            continue
        total = SplitStats()
        for e in entries:
            total.merge(SplitStats(e["documents"], e["tokens"], e["text_bytes"], e["languages"]))
        parts = [
            {"prefix": e["prefix"], "documents": e["documents"], "tokens": e["tokens"]}
            for e in entries
            if e["documents"] > 0
        ]
        splits[s] = {**total.to_dict(), "parts": parts}
    inputs: dict[str, dict] = {}
    for m in manifests:
        for i in m["inputs"]:
            entry = inputs.setdefault(i["path"], {**i, "records": 0})
            entry["records"] += i["records"]
            entry["sha256"] = entry["sha256"] or i["sha256"]
    skipped: Counter = Counter()
    examples: list = []
    for m in manifests:
        skipped.update(m["skipped"]["by_reason"])
        examples.extend(m["skipped"]["examples"][: MAX_EXAMPLES - len(examples)])
    domain_filter = None
    if first["domain_filter"] is not None:
        stats = FilterStats(first["domain_filter"]["threshold"])
        for m in manifests:
            stats.merge(FilterStats.from_dict(m["domain_filter"]))
        domain_filter = {k: first["domain_filter"][k] for k in ("model", "model_sha256")} | stats.to_dict()
    return {
        "format": MANIFEST_FORMAT,
        "source": first["source"],
        "splits": splits,
        **{k: first[k] for k in ("valid_fraction", "split_by", "template", "language_key", "tokenizer", "documents")},
        "inputs": list(inputs.values()),
        "records": sum(m["records"] for m in manifests),
        "skipped": {"count": sum(skipped.values()), "by_reason": dict(skipped.most_common()), "examples": examples},
        "domain_filter": domain_filter,
        "seconds": round(sum(m["seconds"] for m in manifests), 2),  # task-seconds: the cost, not the wall time
        "workers": first["workers"],
        "tasks": len(manifests),
    }


def write_source_manifest(output_prefix: str | Path, tasks: int) -> dict | None:
    """Write ``PREFIX.manifest.json`` once every task's manifest is there; returns it, or None while
    tasks are missing. Tasks finishing together may both write it: the same content, renamed atomically."""
    manifests = task_manifests(output_prefix, tasks)
    if manifests is None:
        return None
    manifest = sum_manifests(manifests, output_prefix)
    write_json_atomic(manifest_path(output_prefix), manifest)
    return manifest


@dataclass
class ExecutorSettings:
    """Which datatrove executor runs the tasks, and its Slurm settings (tools/prepare_data.py)."""

    executor: str = "local"  # local | slurm
    tasks: int = 1
    run_dir: str | None = None  # datatrove's logging folder (completions/, logs/, stats/); default PREFIX.prepare
    partition: str | None = None
    time: str = "24:00:00"  # per array task
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    tasks_per_job: int = 1  # datatrove tasks run one after another by one array element
    max_array_size: int = 1001  # the cluster's MaxArraySize; more elements are submitted as several arrays
    max_running: int = -1  # array elements running at once (sbatch --array=...%N); -1: no limit
    qos: str | None = None
    job_name: str = "prepare_data"
    env_command: str | None = None  # default: put this Python's bin folder first on PATH
    requeue_grace_s: int = 120  # USR1 this long before the time limit: the task requeues itself
    sbatch_args: dict = field(default_factory=dict)
    wait: bool = False  # slurm: wait for the array to end, then report

    def check(self) -> None:
        if self.executor not in ("local", "slurm"):
            raise InputError(f"--executor {self.executor!r}: use local or slurm")
        if self.tasks < 1 or self.tasks_per_job < 1 or self.cpus_per_task < 1:
            raise InputError("--tasks, --tasks-per-job and --cpus-per-task must be at least 1")
        if self.executor == "slurm" and not self.partition:
            raise InputError("--partition: needed with --executor slurm (sinfo lists the cluster's partitions)")


def run_dir(output_prefix: str | Path, settings: ExecutorSettings) -> Path:
    return Path(settings.run_dir) if settings.run_dir else Path(f"{output_prefix}.prepare")


RUN_OPTIONS_FILE = "options.json"  # in the run folder: what a rerun must match to resume


def _run_options(opts: PreprocessOptions, checked: CheckedInputs, tasks: int) -> dict:
    """What decides the outputs: a rerun with other values would mix two datasets."""
    options = dataclasses.asdict(opts)
    for k in ("workers", "progress", "overwrite", "strict", "allow_empty"):  # how it runs, not what it writes
        options.pop(k)
    return json.loads(
        json.dumps(
            {
                "tasks": tasks,
                "options": options,
                "tokenizer_json_sha256": checked.tok.sha256,
                "inputs": [[str(f), os.path.getsize(f)] for f in checked.files],
            },
            default=str,
        )
    )


def _remove_outputs(output_prefix: Path, rdir: Path) -> None:
    shutil.rmtree(rdir, ignore_errors=True)
    for p in output_files(output_prefix):
        p.unlink(missing_ok=True)
    for p in output_prefix.parent.glob(f"{glob.escape(output_prefix.name)}-?????-of-?????*"):
        p.unlink(missing_ok=True)
    for p in output_prefix.parent.glob(f".{glob.escape(output_prefix.name)}-?????-of-?????.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def _resume_check(opts: PreprocessOptions, rdir: Path, recorded: dict) -> None:
    """A rerun resumes only the run its options describe; anything else is refused before any work."""
    out = Path(opts.output_prefix)
    previous = rdir / RUN_OPTIONS_FILE
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old != recorded:
            differ = sorted(
                {k for k in recorded["options"] if old.get("options", {}).get(k) != recorded["options"][k]}
                | {k for k in ("tasks", "tokenizer_json_sha256", "inputs") if old.get(k) != recorded[k]}
            )
            raise InputError(
                f"--output-prefix {out}: {rdir} is an earlier run with other options (differing: {', '.join(differ)}); "
                "rerun with the same options to resume it, or pass --overwrite to start over"
            )
        return
    existing = [str(p) for p in output_files(out) if p.exists()]
    existing += [str(p) for p in out.parent.glob(f"{glob.escape(out.name)}-?????-of-?????.manifest.json")]
    if existing:
        raise InputError(
            f"--output-prefix {out}: output exists ({', '.join(existing[:3])}) without the run folder "
            f"{rdir}; choose another prefix or pass --overwrite"
        )


def prepare(opts: PreprocessOptions, settings: ExecutorSettings) -> dict | None:
    """Run (local) or submit (slurm) the pipeline of ``opts`` over ``settings.tasks`` tasks; tasks
    completed by an earlier run with the same options are skipped. Returns the source manifest, or
    None when Slurm tasks were submitted and not waited for."""
    settings.check()
    out = Path(opts.output_prefix)
    rdir = run_dir(out, settings)
    if opts.overwrite:
        _remove_outputs(out, rdir)
    checked = check_inputs(opts, parallel=settings.tasks, check_outputs=False)
    recorded = _run_options(opts, checked, settings.tasks)
    _resume_check(opts, rdir, recorded)
    rdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(rdir / RUN_OPTIONS_FILE, recorded)
    if settings.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        workers = min(opts.workers, settings.tasks)
        threads = max(1, len(os.sched_getaffinity(0)) // workers) if workers > 1 else None
        executor = LocalPipelineExecutor(
            build_pipeline(opts, checked, settings.tasks, threads),
            tasks=settings.tasks,
            workers=workers,
            logging_dir=str(rdir),
            start_method="spawn",
        )
        try:
            executor.run()
        except Exception as e:
            raise RuntimeError(
                f"a task failed: {e} (its log: {rdir}/logs/); the completed tasks are kept, "
                "rerun the same command to resume"
            ) from e
        return finish(opts, settings)
    executor = _slurm_executor(build_pipeline(opts, checked, settings.tasks), settings, rdir)
    executor.run()
    if executor.job_id == -1:  # every task was complete
        return finish(opts, settings)
    print(
        f"submitted Slurm job {executor.job_id}: {len(executor.get_incomplete_ranks())} of {settings.tasks} tasks; "
        f"logs in {rdir}/logs and {executor.slurm_logs_folder}; {manifest_path(out)} appears when the last task "
        "ends; rerun the same command to resume after failures",
        file=sys.stderr,
    )
    if not settings.wait:
        return None
    _wait_for_slurm(str(executor.job_id))
    return finish(opts, settings)


def finish(opts: PreprocessOptions, settings: ExecutorSettings) -> dict:
    """The source manifest after the tasks ended; InputError naming the failed tasks and their logs."""
    manifest = write_source_manifest(opts.output_prefix, settings.tasks)
    if manifest is None:
        rdir = run_dir(opts.output_prefix, settings)
        missing = [
            r
            for r in range(settings.tasks)
            if not manifest_path(task_prefix(opts.output_prefix, r, settings.tasks)).is_file()
        ]
        raise InputError(
            f"--output-prefix {opts.output_prefix}: tasks {missing} did not complete (their logs: "
            f"{rdir}/logs/task_{missing[0]:05d}.log ...); rerun the same command: completed tasks are skipped"
        )
    if not opts.allow_empty and sum(s["documents"] for s in manifest["splits"].values()) == 0:
        raise no_document_error(opts.inputs, manifest["records"], Counter(manifest["skipped"]["by_reason"]))
    return manifest


def _slurm_executor(pipeline: list, settings: ExecutorSettings, rdir: Path):
    from datatrove.executor import SlurmPipelineExecutor

    class Executor(SlurmPipelineExecutor):
        def launch_merge_stats(self):
            # Our summary is the source manifest, written by the last task. datatrove's stats merge
            # job waits with afterok, so one failed task would leave it pending forever.
            pass

    env_command = settings.env_command or f"export PATH={Path(sys.executable).parent}:$PATH"
    return Executor(
        pipeline,
        tasks=settings.tasks,
        time=settings.time,
        partition=settings.partition,
        cpus_per_task=settings.cpus_per_task,
        mem_per_cpu_gb=settings.mem_per_cpu_gb,
        workers=settings.max_running,
        job_name=settings.job_name,
        qos=settings.qos or "",
        env_command=env_command,
        # Slurm sends USR1 to the task before the time limit; datatrove's handler requeues the
        # element, which reruns its task from the start (the training launcher's convention).
        sbatch_args={"signal": f"USR1@{settings.requeue_grace_s}", **settings.sbatch_args},
        max_array_size=settings.max_array_size,
        tasks_per_job=settings.tasks_per_job,
        logging_dir=str(rdir),
        requeue_signals=("SIGUSR1",),
        requeue=True,
        mail_type="NONE",
    )


def _wait_for_slurm(job_id: str, poll_s: float = 2.0, max_failures: int = 30) -> None:
    """Until no element of the array job is pending or running (squeue failing for a minute: an error)."""
    failures = 0
    while True:
        out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i"], capture_output=True, text=True)
        if (out.returncode == 0 and not out.stdout.strip()) or "Invalid job id" in out.stderr:  # ended (and purged)
            return
        failures = failures + 1 if out.returncode != 0 else 0
        if failures >= max_failures:
            raise InputError(
                f"squeue -j {job_id} keeps failing ({out.stderr.strip()}); the job may still run: "
                "rerun the same command later (completed tasks are kept)"
            )
        time.sleep(poll_s)
