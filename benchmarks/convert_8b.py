"""Conversion at the real Llama-3.1-8B shape against a plain copy of the same bytes: wall time
(until the output is on disk), CPU time and peak RSS of import and export, medians of interleaved
rounds; the round trip checked bit for bit. Prints a markdown table for docs/benchmarks.md.

    python benchmarks/convert_8b.py --work /big/disk/tmp [--rounds 3]

Writes a random-weight Llama-3.1-8B Hugging Face folder (16 GB bf16 in 5 GB shards, generated
tensor by tensor, never held in memory). Each round: `cp -r` of that folder, tools/convert_hf.py
import of it, export of the import (each its own process, `sync` inside its timing, outputs
deleted after the round). Needs about 50 GB free under --work; removes it all.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streaming_bench import copy_command, load_average, machine_line, median, timed, write_random_llama  # noqa: E402

from ellama_megatron.formats.hf_folder import HFFolder  # noqa: E402
from ellama_megatron.llama.config import load_model_config  # noqa: E402


def bit_identical(a: Path, b: Path) -> bool:
    fa, fb = HFFolder.open(a), HFFolder.open(b)
    if set(fa.tensors) != set(fb.tensors):
        return False
    return all(torch.equal(fa.read(n).view(torch.uint8), fb.read(n).view(torch.uint8)) for n in fa.tensors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work", type=Path, required=True, help="scratch folder on a disk with ~50 GB free (removed at the end)"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    args = p.parse_args()
    work = args.work / "convert_8b_bench"
    if work.exists():
        raise SystemExit(f"{work} exists; remove it first")
    hf, ckpt, back, copy = work / "hf", work / "ckpt", work / "back", work / "copy"
    runs: dict[str, list] = {
        "cp -r of the HF folder": [],
        "import (HF -> torch_dist)": [],
        "export (torch_dist -> HF)": [],
    }
    loads = [load_average()]
    try:
        nbytes = write_random_llama(hf, load_model_config("llama31_8b"))
        same = []
        for r in range(args.rounds):
            tool = [sys.executable, "tools/convert_hf.py"]
            steps = [
                ("cp -r of the HF folder", copy_command(hf, copy)),
                ("import (HF -> torch_dist)", [*tool, "import", "--hf-dir", str(hf), "--out", str(ckpt), "--quiet"]),
                ("export (torch_dist -> HF)", [*tool, "export", "--ckpt", str(ckpt), "--out", str(back), "--quiet"]),
            ]
            for name, cmd in steps:
                t = timed(cmd, work / "last.log")
                loads.append(load_average())
                runs[name].append(t)
                print(
                    f"round {r + 1} {name}: {t.wall_s:.1f} s, CPU {t.cpu_s:.1f} s, {t.peak_rss_gib:.2f} GiB", flush=True
                )
            if r == 0:
                same.append(bit_identical(hf, back))
            for folder in (copy, ckpt, back):
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cp = median([t.wall_s for t in runs["cp -r of the HF folder"]])
    lines = [
        machine_line(f"python benchmarks/convert_8b.py --work {args.work} --rounds {args.rounds}", loads),
        "",
        f"Random-weight Llama-3.1-8B, {nbytes / 1e9:.2f} GB bf16 in 5 GB shards; medians of {args.rounds} interleaved "
        f"rounds; wall time includes `sync`. Round trip bit-identical: {all(same)}.",
        "",
        "| step | wall (median) | rounds | vs `cp` | CPU time | peak RSS |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, ts in runs.items():
        wall = median([t.wall_s for t in ts])
        lines.append(
            f"| {name} | {wall:.1f} s | {', '.join(f'{t.wall_s:.1f}' for t in ts)} | {wall / cp:.2f}x | "
            f"{median([t.cpu_s for t in ts]):.1f} s | {max(t.peak_rss_gib for t in ts):.2f} GiB |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
