"""Estimate per-GPU memory and model FLOPs of a training layout, and refuse layouts that do not fit;
print the save interval against the failure rate (Young/Daly, what checkpoint.save_interval=auto
takes) and the learning-rate curve of the run (Megatron's scheduler for the run's conf/optim flags).

    python tools/plan.py model=llama31_70b parallel=llama31_70b_480 optim=cpt_70b train=paper cluster=slurm_h100
    python tools/plan.py --list-layouts model=llama31_70b train=paper cluster=slurm_h100 cluster.nodes=60
    python tools/plan.py --json model=llama31_8b parallel=llama31_8b_node train=paper cluster=slurm_h100

Arguments after the options are Hydra overrides of ellama_megatron/conf/config.yaml, as for recipes/cpt.py
(`+plan.list_layouts=true` is the same as --list-layouts). Exit status: 0 the layout fits,
1 it does not fit the GPU (cluster.gpu_memory_gb), 2 the config is invalid.
Formulas: docs/planner.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ellama_megatron import CONF_DIR
from ellama_megatron.cli import run_tool
from ellama_megatron.engine.lr_schedule import format_lr_curve, key_iterations, lr_curve
from ellama_megatron.run.memory import check_fits, enumerate_layouts, report_for
from ellama_megatron.run.plan import LayoutError, RunPlan
from ellama_megatron.run.schema import ConfigError, typed

# The groups a plan is made from whose values have checks of their own (run/schema.py).
CHECKED_GROUPS = ("train", "cluster", "optim", "checkpoint")


def check_values(cfg) -> None:
    """ConfigError listing every value of the plan's groups the schema refuses (a zero node MTBF,
    an MFU above 1, save_interval=-1), before any number is derived from them."""
    errors = [e for group in CHECKED_GROUPS for e in typed(cfg, group).problems()]
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def list_layouts(cfg) -> int:
    base = RunPlan.from_cfg(cfg)
    model = base.model
    limit = cfg.cluster.gpu_memory_gb
    reports = sorted(
        (report_for(layout, limit) for layout in enumerate_layouts(base)),
        key=lambda r: (not r.fits, r.layout.tp * r.layout.pp * r.layout.cp, r.memory.total),
    )
    print(
        f"{model.name} on {base.nodes} nodes x {base.procs_per_node} = {base.world_size} GPUs, "
        f"micro/global batch {base.micro_batch_size}/{base.global_batch_size}, seq {base.seq_length}, "
        f"recompute {base.recompute}"
    )
    print(f"{'layout':<24} {'accum':>5} {'GiB/GPU':>8}  fits {limit or '-'} GB")
    for r in reports:
        fits = "yes" if r.fits else "no"
        print(f"{r.layout.describe():<24} {r.layout.grad_accumulation:>5} {r.memory.total / 2**30:>8.1f}  {fits}")
    fitting = sum(r.fits for r in reports)
    print(f"{fitting} of {len(reports)} valid layouts fit")
    return 0 if fitting else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--list-layouts", action="store_true", help="list every valid TP/PP/CP layout for the node count, with memory"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of ellama_megatron/conf/config.yaml (model=..., parallel=..., cluster.nodes=...)",
    )
    args = parser.parse_args(argv)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=args.overrides)
    except Exception as exc:  # Hydra's own message names the override that failed
        print(f"error: override: {exc}; see ellama_megatron/conf for the groups and keys", file=sys.stderr)
        return 2
    check_values(cfg)  # ConfigError: run_tool's one error line, exit 2
    if args.list_layouts or OmegaConf.select(cfg, "plan.list_layouts", default=False):
        return list_layouts(cfg)
    try:
        report = check_fits(cfg)
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        lr = lr_curve(cfg, list(key_iterations(cfg)))
        print(
            json.dumps(
                {
                    **report.as_dict(),
                    "save_interval": report.layout.save_interval_figures(),
                    "learning_rate": {str(it): v for it, v in lr.items()},
                },
                indent=2,
            )
        )
    else:
        print(report.table())
        for line in report.layout.save_interval_lines():
            print(line)
        print(format_lr_curve(cfg))
    if not report.fits:
        print(f"REFUSED: {report.refusal()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
