"""Conversion at the real Llama-3.1-8B shape: wall time and peak RSS of import and export against
a plain copy of the same bytes.

    python benchmarks/convert_8b.py --work /big/disk/tmp [--append-docs]

Writes a random-weight Llama-3.1-8B Hugging Face folder (16 GB bf16, generated tensor by tensor and
streamed into 5 GB shards, never held in memory), converts it to Megatron torch_dist and back with
tools/convert_hf.py (separate processes: their own peak RSS), times a plain copy of the shards, and
checks that the round trip is bit-identical. Needs about 50 GB free under --work; removes it all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ellama_megatron.formats.hf_shards import ShardedWriter  # noqa: E402
from ellama_megatron.formats.safetensors import read_header, read_tensor  # noqa: E402
from ellama_megatron.llama import weights as W  # noqa: E402
from ellama_megatron.llama.config import load_model_config  # noqa: E402
from ellama_megatron.llama.hf import generation_config_dict, hf_config_dict  # noqa: E402
from ellama_megatron.testing.tiny_llama import sample_texts, train_tiny_tokenizer  # noqa: E402


def write_random_8b(folder: Path) -> int:
    cfg = load_model_config("llama31_8b")
    folder.mkdir(parents=True)
    shapes = W.hf_shapes(cfg)
    writer = ShardedWriter(folder, [(n, torch.bfloat16, s) for n, s in shapes.items()])
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        writer.write(name, t)
        del t
    writer.close()
    (folder / "config.json").write_text(json.dumps(hf_config_dict(cfg, torch.bfloat16), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(generation_config_dict(cfg)))
    train_tiny_tokenizer(sample_texts(50), folder / "_tok", 512)
    for f in (folder / "_tok").iterdir():
        shutil.move(str(f), folder / f.name)
    (folder / "_tok").rmdir()
    return writer.total_size


def run_tool(*args: str) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "tools/convert_hf.py", *args, "--quiet"], cwd=REPO, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def plain_copy(src: Path, dst: Path) -> float:
    dst.mkdir()
    start = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
    subprocess.run(["sync"])
    return time.perf_counter() - start


def bit_identical(a: Path, b: Path) -> bool:
    ha = {n: (f, e) for f in a.glob("*.safetensors") for n, e in read_header(f).items()}
    hb = {n: (f, e) for f in b.glob("*.safetensors") for n, e in read_header(f).items()}
    if set(ha) != set(hb):
        return False
    return all(torch.equal(read_tensor(*ha[n]).view(torch.uint8), read_tensor(*hb[n]).view(torch.uint8)) for n in ha)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work", type=Path, required=True, help="scratch folder on a disk with ~50 GB free (removed at the end)"
    )
    p.add_argument("--append-docs", action="store_true", help="append the figures to docs/benchmarks.md")
    args = p.parse_args()
    work = args.work / "convert_8b_bench"
    if work.exists():
        raise SystemExit(f"{work} exists; remove it first")
    try:
        t0 = time.perf_counter()
        nbytes = write_random_8b(work / "hf")
        gen = time.perf_counter() - t0
        copy = plain_copy(work / "hf", work / "copy")
        shutil.rmtree(work / "copy")
        imp_wall, imp = run_tool("import", "--hf-dir", str(work / "hf"), "--out", str(work / "ckpt"))
        exp_wall, exp = run_tool("export", "--ckpt", str(work / "ckpt"), "--out", str(work / "back"))
        same = bit_identical(work / "hf", work / "back")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "bytes": nbytes,
        "generate_s": round(gen, 1),
        "copy_s": round(copy, 1),
        "import_wall_s": round(imp_wall, 1),
        "import_peak_rss_gib": round(imp["peak_rss_bytes"] / 2**30, 2),
        "export_wall_s": round(exp_wall, 1),
        "export_peak_rss_gib": round(exp["peak_rss_bytes"] / 2**30, 2),
        "round_trip_bit_identical": same,
    }
    print(json.dumps(result))
    if args.append_docs:
        text = (
            "\n## Llama-3.1-8B conversion (tools/convert_hf.py)\n\n"
            f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, load average "
            f"{os.getloadavg()[0]:.1f}; `python benchmarks/convert_8b.py --work {args.work} --append-docs`.\n"
            f"Random-weight Llama-3.1-8B HF folder, {nbytes / 1e9:.2f} GB bf16 in 5 GB shards. Wall time of each\n"
            "tool process (start-up included); peak RSS from the process's own getrusage; the plain copy is\n"
            "`shutil.copyfile` of the shards + `sync` (page cache warm for all three).\n\n"
            "| step | wall time | peak RSS | vs copy |\n|---|---|---|---|\n"
            f"| plain copy of the shards | {copy:.0f} s | - | 1.0x |\n"
            f"| import (HF -> torch_dist) | {imp_wall:.0f} s | {imp['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"| {imp_wall / copy:.1f}x |\n"
            f"| export (torch_dist -> HF) | {exp_wall:.0f} s | {exp['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"| {exp_wall / copy:.1f}x |\n\n"
            f"Round trip bit-identical: {same}.\n"
        )
        with open(REPO / "docs" / "benchmarks.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
