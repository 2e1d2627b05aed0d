"""Continued pretraining of Llama 3.1 on Megatron-Core's own training loop.

    python recipes/cpt.py                                   # the tiny model on this CPU
    python recipes/cpt.py model=llama31_8b parallel=llama31_8b_node train=paper cluster=slurm_h100 launch=none

Composes the presets (ellama_megatron/conf), checks them in seconds, writes ${run_dir}/config.yaml,
then starts the ranks with torchrun (launch=torchrun) or leaves that to srun (launch=none, see
slurm/launch.sh).
Set ELLAMA_DRY_RUN=1 to print the plan and stop.
"""

import sys

import hydra

from ellama_megatron.launch.torchrun import run_recipe


@hydra.main(config_path="pkg://ellama_megatron.conf", config_name="config", version_base=None)
def main(cfg) -> None:
    code = run_recipe(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
