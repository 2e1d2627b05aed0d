"""Rebuild the table of a sweep (recipes/sweep.py): each point's overrides, final training loss and
final per-domain validation losses, as <sweep dir>/sweep_table.md and .json.

    python tools/sweep_table.py runs/sweeps/lr-mix

recipes/sweep.py writes it when its jobs end; run this while points still run, or after the
driver was stopped (the Slurm jobs go on without it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ellama_megatron.cli import run_tool
from ellama_megatron.sweep.table import POINT_FILE, write_tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the sweep's hydra.sweep.dir (holds one folder per point)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(
            f"tools/sweep_table.py: {args.sweep_dir} is not a folder; give the sweep's hydra.sweep.dir", file=sys.stderr
        )
        return 2
    if not list(args.sweep_dir.glob(f"*/{POINT_FILE}")):
        print(
            f"tools/sweep_table.py: no */{POINT_FILE} under {args.sweep_dir}: no point has started yet, "
            "or this is not a recipes/sweep.py sweep folder",
            file=sys.stderr,
        )
        return 2
    md_path, json_path, rows = write_tables(args.sweep_dir)
    print(md_path.read_text(), end="")
    done = sum(r["finished"] for r in rows)
    print(f"{len(rows)} points ({done} finished) -> {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
