"""Plot training loss (overall and, when logging.train_loss_by is set, per data group and source) and
per-domain validation loss against iteration from a Megatron training log (the engine's stdout,
e.g. ${run_dir}/train.log) or its TensorBoard folder.

  python tools/plot_training_curves.py runs/demo/train.log --out reports/curves.png [--json curves.json]
"""

from __future__ import annotations

import argparse
import sys

from ellama_megatron.cli import run_tool
from ellama_megatron.eval.training_curves import plot_training_curves, read_curves
from ellama_megatron.formats.atomic import write_json_atomic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="training log file, TensorBoard event file or TensorBoard folder")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--json", help="also write the parsed curves as JSON")
    p.add_argument("--title", default="Training curves", help="plot title")
    args = p.parse_args(argv)
    try:
        log = read_curves(args.log)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plot_training_curves(log, args.out, args.title)
    if args.json:
        write_json_atomic(
            args.json,
            {
                "train_loss": log.train_loss,
                "valid_loss": log.valid_loss,
                "domain_train_loss": log.domain_train_loss,
                "domain_train_tokens": log.domain_train_tokens,
            },
        )
    domains = ", ".join(f"{d} ({len(v)} points)" for d, v in sorted(log.valid_loss.items())) or "none"
    trained = ", ".join(f"{level}: {', '.join(sorted(d))}" for level, d in log.domain_train_loss.items()) or "none"
    print(
        f"{len(log.train_loss)} training points, training domains: {trained}, validation domains: {domains} "
        f"-> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
