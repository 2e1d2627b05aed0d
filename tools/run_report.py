"""What the allocation bought: a run's goodput report across all its launches and jobs.

  python tools/run_report.py RUN_DIR [--logs slurm/logs] [--out RUN_DIR/report]

Reads RUN_DIR/events.jsonl (every launch's start and end), RUN_DIR/timeline/<launch>.jsonl (rank 0's
record of set-up, each iteration, each save and validation pass) and, for Slurm jobs, the job logs
(when each batch script started). Writes run_report.md (the table), run_report.json (the same
numbers) and run_timeline.png (one bar per launch on the run's time axis) into --out.

Definitions (docs/slurm.md, "The run report"):
  allocated   each launch from its launch event (on Slurm: its batch script's start, when earlier) to
              its end event; the time between jobs (queueing, requeue wait) is shown apart, not
              counted, and unknown after a launch whose launcher never wrote its end
  start-up    launch start to training start; saving, evaluation: each save and validation pass;
              teardown: after the launch's last timeline event to its end (the iteration a fault
              cut short, the time to notice the fault, the exit)
  productive  the iterations in the final model: run by a launch that saved a checkpoint at or after
              them, not removed by a later rollback, not skipped; each from the end of what came
              before it (step, training start, save, validation pass) to its own end
  lost work   iterations run past the launch's last checkpoint (or rolled back), charged to the
              class of the fault that ended the launch (or of the rollback)
  goodput     productive / allocated
  lost per fault class  its lost work + the teardown of the launches it ended + the start-up of the
              launch after each (the restart)
  restarts    launches - 1
  time to recover  from the interrupted launch's last timeline event to the next completed step;
              mean over all interruptions and over the unplanned ones (hang, node_failure, crash,
              rejected_result), preemptions and time limits apart
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ellama_megatron.cli import run_tool
from ellama_megatron.run.report import REPORT_DIR, build_report, summary_line, write_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run folder (run_dir): events.jsonl and timeline/")
    p.add_argument(
        "--logs",
        action="append",
        default=[],
        help="Slurm job log, or a folder of them (<name>-<job>.out; repeatable; default $ELLAMA_LOG_ROOT or "
        "slurm/logs): when each batch script started",
    )
    p.add_argument("--out", help="folder to write into (default RUN_DIR/report)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    report = build_report(run_dir, args.logs)
    out = Path(args.out) if args.out else run_dir / REPORT_DIR
    paths = write_report(report, out)
    print(f"{summary_line(report)} -> {paths['md']}, {paths['json'].name}, {paths['png'].name}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
