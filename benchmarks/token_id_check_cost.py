"""What checking every micro-batch's token ids against the vocabulary (resilience.check_token_ids,
engine/token_ids.py) costs: the check alone, timed in-process on micro-batches of the tiny run's and
of an 8B run's shape, and the same tiny CPU run with it off and on, launches interleaved so that a
slower minute of the machine falls on both settings. Run by hand; results go to docs/benchmarks.md.

    python benchmarks/token_id_check_cost.py --iters 200 --repeats 3

Each launch is recipes/cpt.py on the tiny model (2 CPU ranks, 8 x 128 tokens per step) over two
synthetic prefixes written here with Megatron's IndexedDatasetBuilder (formats/indexed_dataset.py),
every iteration logged, the order of the two settings alternating from one repeat to the next. The
figures are the median and the 10th percentile of Megatron's own "elapsed time per iteration" over a
launch's iterations after the first 10 (start-up), then the median over the launches of a setting
(on a machine other jobs load, a launch's median moves with them; its fastest tenth much less). What
the check adds per micro-batch (one max per tensor on the host, a sample's number carried through
the data loader) does not grow with the model: the tiny model is its worst case."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "recipes"))  # the demo's tiny run: recipes/demo/training.py

from demo.training import TINY, tokens_per_iteration  # noqa: E402

from ellama_megatron.formats.train_log import parse_train_log  # noqa: E402

SETTINGS = {"off": "false", "on": "true"}  # label -> resilience.check_token_ids
WARMUP = 10  # iterations left out of each launch's median: process start-up, first allocations
VOCAB = 512  # conf/model/tiny.yaml
# (micro-batch, sequence) of the in-process timing: the tiny run's, an 8B run's (conf/train/paper.yaml)
SHAPES = {"tiny run (2 x 128)": (2, 128), "8B run (1 x 8192)": (1, 8192)}


def write_data(folder: Path) -> dict[str, str]:
    """Two prefixes of 2000 documents each (ids 4..499, EOD 2), as another tool would write them."""
    from ellama_megatron.formats import indexed_dataset

    rng = np.random.default_rng(0)
    prefixes = {}
    for name in ("general", "ecommerce"):
        for split, docs in (("train", 2000), ("valid", 40)):
            prefix = folder / f"{name}_{split}"
            documents = [
                np.append(rng.integers(4, 500, size=int(rng.integers(20, 400)), dtype=np.int32), np.int32(2))
                for _ in range(docs)
            ]
            indexed_dataset.write_documents(prefix, documents, np.int32)
            prefixes[f"{name}_{split}"] = str(prefix)
    return prefixes


def launch(data: dict[str, str], iters: int, check: str, run_dir: Path) -> list[float]:
    train = ",".join(f"{{prefix:{data[f'{n}_train']},weight:1,group:{n}}}" for n in ("general", "ecommerce"))
    valid = ",".join(f"{n}:[{data[f'{n}_valid']}]" for n in ("general", "ecommerce"))
    cmd = [
        sys.executable,
        "recipes/cpt.py",
        *TINY,
        f"data.train=[{train}]",
        f"data.valid={{{valid}}}",
        f"run_dir={run_dir}",
        f"train.train_tokens={iters * tokens_per_iteration([])}",
        f"train.eval_interval={iters}",
        "train.log_interval=1",
        f"resilience.check_token_ids={check}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    log = parse_train_log(proc.stdout + proc.stderr)
    return [ms for it, ms in sorted(log.iteration_ms.items()) if it > WARMUP]


def check_alone_us(repeats: int = 2000) -> dict[str, float]:
    """Microseconds per micro-batch of TokenIdCheck on a batch as the data loader returns it."""
    import torch

    from ellama_megatron.engine.token_ids import TokenIdCheck

    check, out = TokenIdCheck(VOCAB), {}
    for label, (mbs, seq) in SHAPES.items():
        batch = {k: torch.randint(0, VOCAB, (mbs, seq), dtype=torch.long) for k in ("tokens", "labels")}
        times = timeit.repeat(lambda b=batch: check(b), number=repeats, repeat=5)
        out[label] = min(times) / repeats * 1e6
    return out


def data_path_us(data: dict[str, str], cache: Path, samples: int = 1000, passes: int = 9) -> dict[str, float]:
    """Microseconds the check adds per micro-batch of 2 x 128 to the rank's data path as the tiny
    run has it: Megatron's blend of the two training prefixes read through a data loader (default
    collate, no workers, as on a CPU), plain, or traced (SampleOrigins) and every batch checked
    (TokenIdCheck). Passes over ``samples`` samples, plain and checked interleaved; the median and
    the best of the differences."""
    import types

    import torch
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from ellama_megatron.engine.datasets import gpt_dataset_config
    from ellama_megatron.engine.token_ids import SampleOrigins, TokenIdCheck

    blend = [([data["general_train"], data["ecommerce_train"]], [1.0, 1.0]), None, None]
    config = gpt_dataset_config(types.SimpleNamespace(seed=1234, seq_length=128), 2, VOCAB, blend, cache)
    plain, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [samples, None, None], lambda: True, config).build()
    check = TokenIdCheck(VOCAB)
    loaders = {
        "plain": (torch.utils.data.DataLoader(plain, batch_size=2), None),
        "checked": (torch.utils.data.DataLoader(SampleOrigins(plain), batch_size=2), check),
    }
    per_batch: dict[str, list[float]] = {label: [] for label in loaders}
    for _ in range(passes):
        for label, (loader, checker) in loaders.items():
            start = time.perf_counter()
            for batch in loader:
                if checker is not None:
                    checker(batch)
            per_batch[label].append((time.perf_counter() - start) / len(loader) * 1e6)
    added = [c - p for c, p in zip(per_batch["checked"], per_batch["plain"])]
    return {
        "plain_us": statistics.median(per_batch["plain"]),
        "added_us_median": statistics.median(added),
        "added_us_best": min(per_batch["checked"]) - min(per_batch["plain"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200, help="iterations per launch (default 200)")
    p.add_argument(
        "--repeats", type=int, default=3, help="launches per setting (default 3; 0: the in-process timings only)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = p.parse_args(argv)
    start = time.time()
    per_launch: dict[str, list[float]] = {k: [] for k in SETTINGS}
    # A launch's 10th-percentile iteration: its least disturbed steps, when other jobs load the machine
    fastest: dict[str, list[float]] = {k: [] for k in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="token_id_check_cost_") as tmp:
        data = write_data(Path(tmp))
        alone = check_alone_us()
        path = data_path_us(data, Path(tmp) / "cache")
        for label, us in alone.items():
            print(f"TokenIdCheck alone, {label}: {us:.1f} us per micro-batch", flush=True)
        print(
            f"data path, micro-batch of 2 x 128: {path['plain_us']:.0f} us plain, "
            f"{path['added_us_median']:+.1f} us traced and checked (median; best {path['added_us_best']:+.1f})",
            flush=True,
        )
        if not a.repeats:
            return 0
        for r in range(a.repeats):
            for label, value in list(SETTINGS.items())[:: -1 if r % 2 else 1]:
                times = launch(data, a.iters, value, Path(tmp) / f"{label}_{r}")
                per_launch[label].append(statistics.median(times))
                fastest[label].append(statistics.quantiles(times, n=10)[0])
                print(
                    f"repeat {r + 1}/{a.repeats} {label:>3}: median {per_launch[label][-1]:.1f} ms per iteration, "
                    f"10th percentile {fastest[label][-1]:.1f} ({len(times)} iterations)",
                    flush=True,
                )
    base = statistics.median(per_launch["off"])
    base_p10 = statistics.median(fastest["off"])
    result = {
        label: {
            "median_ms": statistics.median(v),
            "launches_ms": v,
            "overhead": statistics.median(v) / base - 1,
            "p10_ms": statistics.median(fastest[label]),
            "launches_p10_ms": fastest[label],
            "overhead_p10": statistics.median(fastest[label]) / base_p10 - 1,
        }
        for label, v in per_launch.items()
    }
    print(
        "\n| resilience.check_token_ids | ms per iteration: median (launches) | vs off "
        "| 10th percentile (launches) | vs off |"
    )
    print("|---|---|---:|---|---:|")
    for label, r in result.items():
        print(
            f"| {SETTINGS[label]} | {r['median_ms']:.1f} ({', '.join(f'{x:.1f}' for x in r['launches_ms'])}) | "
            f"{r['overhead']:+.1%} | {r['p10_ms']:.1f} ({', '.join(f'{x:.1f}' for x in r['launches_p10_ms'])}) | "
            f"{r['overhead_p10']:+.1%} |"
        )
    if a.json:
        figures = {"iters": a.iters, "repeats": a.repeats, "settings": result, "check_alone_us": alone}
        a.json.write_text(json.dumps({**figures, "data_path_us": path}, indent=2))
    print(
        f"token_id_check_cost: {a.repeats * len(SETTINGS)} launches of {a.iters} iterations in "
        f"{time.time() - start:.0f} s; on {result['on']['overhead']:+.1%} vs off (median), "
        f"{result['on']['overhead_p10']:+.1%} (10th percentile); the check alone "
        + ", ".join(f"{us:.1f} us ({label})" for label, us in alone.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
