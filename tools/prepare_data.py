"""Preprocess a corpus over N tasks, on this machine or as a Slurm job array (datatrove's executors).

    python tools/prepare_data.py --executor local --tasks 8 --workers 4 --input data/raw/listings/ \\
        --template listing --tokenizer /models/Llama-3.1-8B --output-prefix data/ellama/listings \\
        --valid-fraction 0.005 --id-key id
    python tools/prepare_data.py --executor slurm --tasks 2000 --partition cpu --cpus-per-task 4 \\
        --time 04:00:00 --tasks-per-job 4 --input /fineweb/data/ --tokenizer /models/Llama-3.1-8B \\
        --domain-filter models/ecommerce_clf --output-prefix data/ellama/web_ecommerce

The same options as tools/preprocess_data.py (the same stages: read, serialize, classifier filter,
held-out split by document hash, tokenize), plus the executor's. Task r writes
PREFIX-0000r-of-N_train/_valid.bin/.idx and PREFIX-0000r-of-N.manifest.json; the last task to end
writes PREFIX.manifest.json, their sum, which tools/plan_blend.py and training read with no merge step.
With --executor local, --workers is how many tasks run at once.

Resumable: datatrove records each completed task in PREFIX.prepare/completions/; rerunning the same
command runs only the tasks that did not complete, each from its start, its partial output replaced.
A rerun with other options is refused (--overwrite starts over). On Slurm, each array element
requeues itself on USR1 (sent --requeue-grace seconds before --time) and on preemption.
See docs/data.md ("Many nodes").
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from ellama_megatron.cli import run_tool

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Could not determine rank).*")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from preprocess_data import add_preprocess_arguments, preprocess_options  # tools/: this script's folder

from ellama_megatron.data.document_tokens import DocumentTokensError
from ellama_megatron.data.indexed_writer import BadRecordError
from ellama_megatron.data.manifest import ManifestError
from ellama_megatron.data.pipeline import ExecutorSettings, prepare
from ellama_megatron.data.preprocess import summary_line
from ellama_megatron.data.readers import InputError
from ellama_megatron.formats.tokenizer_folder import TokenizerFolderError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/prepare_data.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_preprocess_arguments(p)
    d = ExecutorSettings()
    e = p.add_argument_group("executor (datatrove)")
    e.add_argument(
        "--executor", choices=("local", "slurm"), default="local", help="where the tasks run (default: local)"
    )
    e.add_argument(
        "--tasks", type=int, default=1, help="tasks the inputs are split into; one output prefix each (default: 1)"
    )
    e.add_argument(
        "--run-dir",
        default=None,
        help="datatrove's folder: completions/, logs/, stats/, slurm_logs/ (default: OUTPUT_PREFIX.prepare)",
    )
    s = p.add_argument_group("slurm (with --executor slurm)")
    s.add_argument("--partition", default=None, help="Slurm partition (required)")
    s.add_argument("--time", default=d.time, help=f"time limit of one array element (default: {d.time})")
    s.add_argument(
        "--cpus-per-task",
        type=int,
        default=d.cpus_per_task,
        help=f"cores per array element; the tokenizer uses them all (default: {d.cpus_per_task})",
    )
    s.add_argument(
        "--mem-per-cpu-gb",
        type=int,
        default=d.mem_per_cpu_gb,
        help=f"memory per core, GB (default: {d.mem_per_cpu_gb})",
    )
    s.add_argument(
        "--tasks-per-job",
        type=int,
        default=d.tasks_per_job,
        help="tasks one array element runs in turn: fewer, longer elements for >1k tasks (default: 1)",
    )
    s.add_argument(
        "--max-array-size",
        type=int,
        default=d.max_array_size,
        help=f"the cluster's MaxArraySize; more elements go in several arrays (default: {d.max_array_size})",
    )
    s.add_argument(
        "--max-running",
        type=int,
        default=d.max_running,
        help="array elements running at once (--array=...%%N); -1: no limit (default)",
    )
    s.add_argument("--qos", default=None, help="Slurm QOS (default: none)")
    s.add_argument("--job-name", default=d.job_name, help=f"Slurm job name (default: {d.job_name})")
    s.add_argument(
        "--env-command",
        default=None,
        help="shell line that sets up Python on the compute nodes (default: this Python's bin folder first on PATH)",
    )
    s.add_argument(
        "--requeue-grace",
        type=int,
        default=d.requeue_grace_s,
        help=f"seconds before --time at which an element gets USR1 and requeues itself (default: {d.requeue_grace_s})",
    )
    s.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra #SBATCH --KEY=VALUE (repeatable), e.g. --sbatch-arg account=proj123",
    )
    s.add_argument(
        "--wait", action="store_true", help="wait for the array to end and report, as the local executor does"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sbatch_args = {}
        for item in args.sbatch_arg:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InputError(f"--sbatch-arg {item!r}: use KEY=VALUE, e.g. account=proj123")
            sbatch_args[key.lstrip("-")] = value
        settings = ExecutorSettings(
            executor=args.executor,
            tasks=args.tasks,
            run_dir=args.run_dir,
            partition=args.partition,
            time=args.time,
            cpus_per_task=args.cpus_per_task,
            mem_per_cpu_gb=args.mem_per_cpu_gb,
            tasks_per_job=args.tasks_per_job,
            max_array_size=args.max_array_size,
            max_running=args.max_running,
            qos=args.qos,
            job_name=args.job_name,
            env_command=args.env_command,
            requeue_grace_s=args.requeue_grace,
            sbatch_args=sbatch_args,
            wait=args.wait,
        )
        manifest = prepare(preprocess_options(args), settings)
    except (InputError, TokenizerFolderError, DocumentTokensError, BadRecordError, ManifestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if manifest is not None:
        print(summary_line(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
