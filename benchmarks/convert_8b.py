"""Conversion at the real Llama-3.1-8B shape against a plain copy of the same bytes: wall time
(until the output is on disk), CPU time and peak RSS of import and export, medians of interleaved
rounds; the round trip checked bit for bit. Prints a markdown table for docs/benchmarks.md.

    python benchmarks/convert_8b.py --work /big/disk/tmp [--rounds 3]
    python benchmarks/convert_8b.py --work /tmp --model small --before /path/to/other/checkout

Writes a random-weight Llama-3.1-8B Hugging Face folder (16 GB bf16 in 5 GB shards, generated
tensor by tensor, never held in memory). Each round: `cp -r` of that folder, tools/convert_hf.py
import of it, export of the import (each its own process, `sync` inside its timing, outputs
deleted after the round). Needs about 50 GB free under --work; removes it all.
--model small: the 0.95B Llama of benchmarks/merge_speed.py instead (1.9 GB). --before CHECKOUT:
also that checkout's import and export, interleaved with ours (before/after a change).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streaming_bench import (  # noqa: E402
    REPO,
    SMALL_LLAMA,
    copy_command,
    load_average,
    machine_line,
    median,
    timed,
    write_random_llama,
)

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
    p.add_argument("--model", default="llama31_8b", choices=["llama31_8b", "small"], help="model shape")
    p.add_argument("--before", type=Path, help="another checkout whose conversion runs too, for comparison")
    args = p.parse_args()
    cfg = load_model_config("llama31_8b")
    if args.model == "small":
        cfg = dataclasses.replace(cfg, **SMALL_LLAMA)
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
        nbytes = write_random_llama(hf, cfg)
        same = []
        for r in range(args.rounds):
            steps = [("cp -r of the HF folder", copy_command(hf, copy), None, [copy])]
            versions = [("", None)] + ([(" before", args.before)] if args.before else [])
            for suffix, checkout in versions if r % 2 == 0 else versions[::-1]:
                tool = [sys.executable, str((checkout or REPO) / "tools" / "convert_hf.py")]
                imp = [*tool, "import", "--hf-dir", str(hf), "--out", str(ckpt), "--quiet"]
                exp = [*tool, "export", "--ckpt", str(ckpt), "--out", str(back), "--quiet"]
                steps += [
                    (f"import (HF -> torch_dist){suffix}", imp, checkout, []),
                    (f"export (torch_dist -> HF){suffix}", exp, checkout, [ckpt, back]),
                ]
            for name, cmd, checkout, remove in steps:
                t = timed(cmd, work / "last.log", checkout)
                loads.append(load_average())
                runs.setdefault(name, []).append(t)
                print(
                    f"round {r + 1} {name}: {t.wall_s:.1f} s, CPU {t.cpu_s:.1f} s, {t.peak_rss_mib:.0f} MiB", flush=True
                )
                if r == 0 and name.startswith("export"):
                    same.append(bit_identical(hf, back))
                for folder in remove:
                    shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cp = median([t.wall_s for t in runs["cp -r of the HF folder"]])
    lines = [
        machine_line(
            f"python benchmarks/convert_8b.py --work {args.work} --rounds {args.rounds} --model {args.model}"
            + (f" --before {args.before}" if args.before else ""),
            loads,
        ),
        "",
        f"Random-weight {cfg.name} Llama, {nbytes / 1e9:.2f} GB bf16 (shards <= 5 GB); medians of {args.rounds} "
        "interleaved "
        f"rounds; wall time includes `sync`. Round trip bit-identical: {all(same)}.",
        "",
        "| step | wall (median) | rounds | vs `cp` | CPU time | peak RSS |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, ts in runs.items():
        wall = median([t.wall_s for t in ts])
        lines.append(
            f"| {name} | {wall:.1f} s | {', '.join(f'{t.wall_s:.1f}' for t in ts)} | {wall / cp:.2f}x | "
            f"{median([t.cpu_s for t in ts]):.1f} s | {max(t.peak_rss_mib for t in ts):.0f} MiB |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
