"""Small-scale ablations on Slurm: a Hydra multirun with one Slurm job per point, then one table.

    python recipes/sweep.py -m optim.lr=1e-5,3e-5 data.groups.general.share=0.5,0.7 \
        model=llama31_8b parallel=llama31_8b_node train=paper cluster=slurm_h100 \
        data=ellama train.train_tokens=2e9 hydra.sweep.dir=runs/sweeps/lr-mix
    python recipes/sweep.py -m hydra/launcher=slurm_cpu optim.lr=1e-3,3e-3 data.blend_file=blend.json

Takes the overrides of recipes/cpt.py; `-m` with comma-separated values sweeps. hydra-submitit-launcher
(`pip install -e .[slurm]`) submits one job per point (ellama_megatron/conf/hydra/launcher: slurm_h100 by default,
slurm_cpu for the local test cluster); its tasks are the ranks, one per GPU, as with slurm/*.sbatch.
Each point trains in <sweep dir>/<point number>/ (checkpoints, config.yaml, point.json: set
hydra.sweep.dir, not run_dir); when all
jobs have ended, <sweep dir>/sweep_table.md and .json hold each point's final training loss and
final per-domain validation losses (`python tools/sweep_table.py <sweep dir>` rebuilds them).
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from ellama_megatron.launch.sweep import run_point

DEFAULT_LAUNCHER = "hydra/launcher=slurm_h100"
TABLE_CALLBACK = "+hydra.callbacks.sweep_table._target_=ellama_megatron.sweep.SweepTableCallback"


@hydra.main(config_path="pkg://ellama_megatron.conf", config_name="config", version_base=None)
def main(cfg) -> None:
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        sys.exit("recipes/sweep.py: run it with -m (a multirun); for one run use recipes/cpt.py")
    run_point(cfg, hc)  # one rank of one point (ellama_megatron/launch/sweep.py)


def default_overrides(argv: list[str]) -> list[str]:
    """The Slurm launcher and the table callback unless the command line chose otherwise."""
    extra = []
    if not any(a.startswith("hydra/launcher=") for a in argv):
        extra.append(DEFAULT_LAUNCHER)
    if not any(a.startswith(("hydra.callbacks", "+hydra.callbacks")) for a in argv):
        extra.append(TABLE_CALLBACK)
    return extra


if __name__ == "__main__":
    if any(a.startswith("run_dir=") for a in sys.argv[1:]):
        # Points sharing a run folder would resume from each other's checkpoints.
        sys.exit("recipes/sweep.py: each point trains in <hydra.sweep.dir>/<point>; set hydra.sweep.dir, not run_dir")
    # Next to the command line's own overrides: Hydra's parser wants them in one run.
    last = max((i for i, a in enumerate(sys.argv) if "=" in a and not a.startswith("-")), default=len(sys.argv) - 1)
    sys.argv[last + 1 : last + 1] = default_overrides(sys.argv[1:])
    main()
