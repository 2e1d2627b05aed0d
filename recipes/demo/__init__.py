"""The e-Llama method end to end in miniature, on CPU: the stages behind recipes/demo.py.

Every stage calls the command-line tool a user would run (tools/*.py, recipes/cpt.py,
slurm/8b.sbatch) as a subprocess, so the demo exercises the same code paths as a real run. Each
stage leaves a marker file (``stages/<key>.json``: seconds, one-line summary, results); a second
run reuses the stages whose marker exists and says so. Changed options start clean.

  runner.py    options, the output folder, the stage runner with its markers, running a tool
  training.py  a training run through slurm/8b.sbatch (local Slurm) or recipes/cpt.py
  stages.py    the stages in order (run_demo)
  report.py    REPORT.md

The demo is not part of the library: it lives beside the recipes and shares the test suite's
stand-ins (ellama_megatron.testing: tiny Llama, local Slurm).
"""
