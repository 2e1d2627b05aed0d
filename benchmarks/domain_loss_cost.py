"""What the per-domain training loss (logging.train_loss_by, engine/domain_loss.py) costs per
iteration: the same tiny CPU run with it off, per group and per source, launches interleaved so that
a slower minute of the machine falls on every setting. Run by hand; results go to docs/benchmarks.md.

    python recipes/demo.py --out demo_output          # the data (any demo output folder)
    python benchmarks/domain_loss_cost.py --demo demo_output --iters 200 --repeats 3

Each launch is recipes/cpt.py on the tiny model (2 CPU ranks, 8 x 128 tokens per step) over the
demo's 1:1 blend, every iteration logged; the figure is the median of Megatron's own "elapsed time
per iteration" over a launch's iterations after the first 10 (start-up), then the median over the
launches of a setting. The tiny model is the worst case for this cost: what the feature adds per
iteration (an index_add per microbatch, one all-reduce of a few numbers per log interval) does not
grow with the model, the step does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "recipes"))  # the demo's tiny run: recipes/demo/training.py

from demo.training import TINY, tokens_per_iteration  # noqa: E402

from ellama_megatron.formats.train_log import parse_train_log  # noqa: E402

SETTINGS = {"off": "null", "group": "group", "source": "source"}  # label -> logging.train_loss_by
WARMUP = 10  # iterations left out of each launch's median: process start-up, first allocations


def launch(demo: Path, data: str, iters: int, train_loss_by: str, run_dir: Path) -> list[float]:
    cmd = [
        sys.executable,
        "recipes/cpt.py",
        *TINY,
        f"data={data}",
        f"data.root={demo / 'data'}",
        f"run_dir={run_dir}",
        f"train.train_tokens={iters * tokens_per_iteration([])}",
        f"train.eval_interval={iters}",
        "train.log_interval=1",
        f"logging.train_loss_by={train_loss_by}",
        "data.max_epochs=10",
    ]
    if (demo / "base_megatron").is_dir():
        cmd.append(f"checkpoint.init_from={demo / 'base_megatron'}")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    log = parse_train_log(proc.stdout + proc.stderr)
    return [ms for it, ms in sorted(log.iteration_ms.items()) if it > WARMUP]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--demo",
        type=Path,
        default=REPO / "demo_output",
        help="a recipes/demo.py output folder: its data/ (and base_megatron/ if there) (default demo_output)",
    )
    p.add_argument(
        "--data",
        default="demo_blend",
        help="the conf/data blend over that folder's data (demo_blend; demo_prose_blend after --general prose)",
    )
    p.add_argument("--iters", type=int, default=200, help="iterations per launch (default 200)")
    p.add_argument("--repeats", type=int, default=3, help="launches per setting (default 3)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = p.parse_args(argv)
    if not (a.demo / "data").is_dir():
        p.error(f"--demo {a.demo}: no data/ folder; run python recipes/demo.py --out {a.demo} first")
    per_launch: dict[str, list[float]] = {k: [] for k in SETTINGS}
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="domain_loss_cost_") as tmp:
        for r in range(a.repeats):
            for label, value in SETTINGS.items():
                times = launch(a.demo.resolve(), a.data, a.iters, value, Path(tmp) / f"{label}_{r}")
                per_launch[label].append(statistics.median(times))
                print(
                    f"repeat {r + 1}/{a.repeats} {label:>6}: median {per_launch[label][-1]:.1f} ms per iteration "
                    f"({len(times)} iterations)",
                    flush=True,
                )
    base = statistics.median(per_launch["off"])
    result = {
        label: {"median_ms": statistics.median(v), "launches_ms": v, "overhead": statistics.median(v) / base - 1}
        for label, v in per_launch.items()
    }
    print(
        "\n| logging.train_loss_by | ms per iteration (median of launches) | launches | vs off |\n|---|---:|---|---:|"
    )
    for label, r in result.items():
        print(
            f"| {SETTINGS[label]} | {r['median_ms']:.1f} | {', '.join(f'{x:.1f}' for x in r['launches_ms'])} | "
            f"{r['overhead']:+.1%} |"
        )
    if a.json:
        a.json.write_text(json.dumps({"iters": a.iters, "repeats": a.repeats, "settings": result}, indent=2))
    print(
        f"domain_loss_cost: {a.repeats * len(SETTINGS)} launches of {a.iters} iterations "
        f"in {time.time() - start:.0f} s; "
        f"per group {result['group']['overhead']:+.1%}, per source {result['source']['overhead']:+.1%} vs off"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
