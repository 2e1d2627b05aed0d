"""The merge curve: merge base and adapted models at several alphas (one pass), evaluate each on
every held-out domain, write curve.json, curve.md (table) and curve.png (perplexity along alpha
and general-vs-domain trade-off; base = alpha 0 and adapted = alpha 1 are the end points).

  python tools/merge_curve.py --base BASE --adapted ADAPTED \
      --data general=heldout/general.jsonl --data ecommerce=heldout/ecommerce.jsonl \
      --alpha 0.25 --alpha 0.5 --alpha 0.75 --out reports/merge_curve

--base/--adapted: Hugging Face folders or Megatron checkpoints (a run's checkpoints/ folder, one
iter_* folder, a tools/convert_hf.py import or tools/merge.py output), mixed as you like: a
Megatron checkpoint is exported once (bit-exact) to OUT/merged/exports/, deleted at the end.
Merged models go to OUT/merged/ and are deleted after evaluation unless --keep-merged.

--average-of RUN_DIR/checkpoints --last N adds one more point: the mean of the run's N newest
complete checkpoints (tools/merge.py --average), evaluated like the merges:

  python tools/merge_curve.py --base BASE --adapted runs/cpt/checkpoints \
      --average-of runs/cpt/checkpoints --last 3 --data ... --out reports/merge_curve
"""

from __future__ import annotations

import argparse
import sys

from ellama_megatron.cli import run_tool
from ellama_megatron.eval.heldout_data import parse_domain_spec
from ellama_megatron.merge.methods import METHODS
from ellama_megatron.merge.request import MergeInputError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base model: Hugging Face folder or Megatron checkpoint")
    p.add_argument("--adapted", required=True, help="adapted model: Hugging Face folder or Megatron checkpoint")
    p.add_argument(
        "--alpha", action="append", type=float, help="intermediate alphas (repeatable; default 0.25 0.5 0.75)"
    )
    p.add_argument(
        "--data", required=True, action="append", help="DOMAIN=PATH held-out set (repeatable), as tools/evaluate.py"
    )
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--general-domain", default="general", help="domain on the plot's x axis (default %(default)s)")
    p.add_argument("--domain", default="ecommerce", help="domain on the plot's y axis (default %(default)s)")
    p.add_argument(
        "--method", default="linear", choices=[m for m in METHODS if m != "task_arithmetic"], help="merge formula"
    )
    p.add_argument("--seq-length", type=int, default=2048, help="evaluation window in tokens (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="evaluation dtype")
    p.add_argument("--max-docs", type=int, help="at most this many documents per domain")
    p.add_argument("--keep-merged", action="store_true", help="keep the merged models under OUT/merged/")
    p.add_argument(
        "--average-of",
        nargs="+",
        metavar="CKPT",
        help="also evaluate the average of these Megatron checkpoints (with --last: of one save folder's newest)",
    )
    p.add_argument("--last", type=int, help="--average-of: average the N newest complete checkpoints")
    p.add_argument("--average-weight", action="append", type=float, help="--average-of: weight of each checkpoint")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    alphas = args.alpha or [0.25, 0.5, 0.75]
    try:
        if any(not 0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"--alpha {alphas}: the curve interpolates, alphas must be in [0, 1]")
        sources = [parse_domain_spec(s) for s in args.data]
        average = None
        if args.average_of is not None:
            from ellama_megatron.merge.average import select_checkpoints

            average = select_checkpoints(args.average_of, args.last, args.average_weight)
        elif args.last is not None or args.average_weight is not None:
            raise ValueError("--last / --average-weight: only with --average-of")
        from ellama_megatron.eval.merge_curve import run_merge_curve

        report = run_merge_curve(
            args.base,
            args.adapted,
            alphas,
            sources,
            args.out,
            args.general_domain,
            args.domain,
            args.method,
            args.seq_length,
            args.batch_size,
            args.device,
            args.dtype,
            args.max_docs,
            args.keep_merged,
            average=average,
        )
    except (MergeInputError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ellama_megatron.eval.merge_curve import markdown_table

    print(markdown_table(report["points"], [s.name for s in sources]))
    for note in average.notes if average is not None else []:
        print(f"merge_curve.py: note: {note}", file=sys.stderr)
    print(f"merge curve over {len(report['points'])} points -> {args.out}/curve.md, curve.json, curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
