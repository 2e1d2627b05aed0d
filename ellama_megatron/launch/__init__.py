"""From a composed config to running ranks: prepare (check, resolve, record), torchrun on this
machine, the Slurm job's decisions (slurm/launch.sh) and the sweep's points on Slurm.

The shell reaches it as ``python -m ellama_megatron.launch <subcommand>`` (see __main__.py)."""
