"""The launcher's commands for slurm/launch.sh:

python -m ellama_megatron.launch layout SBATCH_FILE
    cluster.nodes=N cluster.procs_per_node=P of the allocation (or of the #SBATCH header)
python -m ellama_megatron.launch prepare SBATCH_FILE PRESET_OVERRIDE... -- USER_OVERRIDE...
    compose, check and record the job's config; prints shell assignments (ELLAMA_CONFIG, RUN_DIR,
    NODES, PROCS_PER_NODE, JOB_LOG_DIR, START_ITER, LAUNCH_ID, HEARTBEAT_DIR, RANK_STDERR,
    HANG_DETECTION, FINISHED); exit 2 when the config is invalid
python -m ellama_megatron.launch end-job CONFIG SIGNAL EXIT_CODE START_ITER JOB_LOG_DIR
    after the ranks: classify how they ended (run/faults.py), requeue the job when the run goes on;
    exits with the job's exit status
python -m ellama_megatron.launch watchdog CONFIG PROCS_PER_NODE
    one node's hang watchdog, one task per node beside the ranks' step (launch/watchdog.py)
"""

from __future__ import annotations

import sys
from pathlib import Path

from ellama_megatron.launch import slurm


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    if command == "layout" and len(args) == 1:
        print(" ".join(slurm.layout_overrides(Path(args[0]))))
        return 0
    if command == "prepare" and args:
        sbatch_file, rest = Path(args[0]), args[1:]
        preset, user = (rest[: rest.index("--")], rest[rest.index("--") + 1 :]) if "--" in rest else (rest, [])
        status, variables = slurm.prepare_job(sbatch_file, preset, user)
        print(slurm.shell_assignments(variables), end="")
        return status
    if command == "end-job" and len(args) == 5:
        config, signal_name, exit_code, start, log_dir = args
        return slurm.end_job(Path(config), signal_name, int(exit_code), int(start), Path(log_dir))
    if command == "watchdog" and len(args) == 2:
        from ellama_megatron.launch.watchdog import watch_node

        return watch_node(Path(args[0]), int(args[1]))
    print(
        f"python -m ellama_megatron.launch: unknown command or arguments: {' '.join(argv)}\n{__doc__}", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
