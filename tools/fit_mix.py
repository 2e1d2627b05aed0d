"""Choose the data mix from a sweep: fit the D-CPT law (Que et al., arXiv 2406.01375) to each
domain's final validation loss over the sweep's shares r and token budgets D (and model sizes N when
it has three or more), then predict each domain's loss at the target scale for any share and
recommend the domain share with the lowest domain loss whose general loss rises by at most
--max-general-rise over the reference (the base model's: --base-loss, or the sweep's own validation
at iteration 0; else the law's own general loss with no domain data at the target budget).

    python recipes/sweep.py -m hydra/sweeper=mix_tiny hydra/launcher=slurm_cpu ... hydra.sweep.dir=runs/sweeps/mix
    python tools/fit_mix.py runs/sweeps/mix --tokens 1e6 --max-general-rise 0.02

Writes OUT/fit_mix.md (laws, each point's fit and leave-one-out error, predicted losses, the
recommendation), fit_mix.json (the same; recommendation.overrides is the Hydra override line and
recommendation.yaml the conf/data snippet) and fit_mix.png (both domains' loss along the share).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ellama_megatron.cli import run_tool


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", type=Path, help="the sweep's folder (hydra.sweep.dir) or its sweep_table.json")
    p.add_argument("--domain", help="the domain's data group (default: the one group besides --general)")
    p.add_argument("--general", default="general", help="the general (replay) data group (default %(default)s)")
    p.add_argument("--tokens", type=float, help="target training tokens D (default: the sweep's largest budget)")
    p.add_argument(
        "--parameters",
        type=float,
        help="target model parameters N (default: the sweep's largest model; "
        "another size needs a sweep over at least 3)",
    )
    p.add_argument(
        "--max-general-rise",
        type=float,
        default=0.02,
        help="allowed rise of the general loss over the reference, a fraction (default %(default)s = 2%%)",
    )
    p.add_argument(
        "--base-loss",
        type=float,
        help="the reference general loss: the base model's on the same "
        "validation set (default: the sweep's iteration-0 validation when it ran with train.eval_at_start, "
        "else the fitted general loss with no domain data)",
    )
    p.add_argument(
        "--share",
        type=float,
        action="append",
        help="domain share to predict the losses at (repeatable; "
        "default 11 shares from 0 to the most the other groups leave)",
    )
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fit only the points with this override (repeatable), e.g. optim.lr=3e-5 in an LR x mix sweep",
    )
    p.add_argument("--out", type=Path, help="report folder (default: fit_mix/ beside the table)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    where = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--where {item!r}: give KEY=VALUE as the sweep's override, e.g. optim.lr=3e-5")
        where[key] = value
    from ellama_megatron.sweep.mix_report import fit_mix

    table_dir = args.table if args.table.is_dir() else args.table.parent
    out = args.out or table_dir / "fit_mix"
    result = fit_mix(
        args.table,
        out,
        args.domain,
        args.general,
        args.tokens,
        args.parameters,
        args.max_general_rise,
        args.base_loss,
        args.share,
        where,
    )
    print((out / "fit_mix.md").read_text(), end="")
    rec, laws = result["recommendation"], result["laws"]
    held = [f["max_held_out_error"] for f in laws.values() if f["max_held_out_error"] is not None]
    max_error = max(f["max_error"] for f in laws.values())
    print(
        f"fit_mix: {result['points']} points, {len(laws)} laws (max fit error {max_error:.2%}"
        + (f", max held-out error {max(held):.2%}" if held else "")
        + f"); recommended {rec['overrides']} -> {out}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
