"""tools/merge.py against mergekit and against `cp` of one model: wall time (until the output is on
disk), CPU time, peak RSS; medians of interleaved rounds; bit-identity of the outputs. Prints a
markdown table for docs/benchmarks.md.

    python benchmarks/merge_speed.py --work /tmp/merge_bench --mergekit /tmp/mkvenv/bin/mergekit-yaml

Two random-weight Llama models of 0.95B parameters (hidden 2048, 13 layers, FFN 8192, 16 heads /
8 KV heads, vocab 32000), bf16, 1.9 GB each in 500 MB shards, are written once under --work (kept
with --keep-models for the next run). Each round runs, one after the other: `cp -r` of the base
folder, then for each method ours and mergekit's (the order of the two alternating between rounds);
every run is followed by `sync` inside its timing, its output deleted after. Methods: linear at
alpha 0.5; task arithmetic base + 0.5 (adapted - base); SLERP at t 0.5; mergekit computes in
float32 and writes bf16, as ours does.

--before CHECKOUT also runs that checkout's tools/merge.py (before/after a change); its output is
compared with ours. --model llama31_8b: two random Llama-3.1-8B models instead (16 GB each in 5 GB
shards; needs about 70 GB free under --work); without --mergekit, only ours and `cp` run (mergekit
holds whole models in memory: two 8B models do not fit a 24 GB machine).

mergekit 0.1.5 needs transformers >= 5, < 6 and immutables, peft, sentencepiece; install it in a
scratch virtual environment, not in the project's (it is no dependency of ours).
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

METHODS = ("linear", "task_arithmetic", "slerp")


# mergekit computes in float32 and writes bf16, the arithmetic ours does (with `dtype: bfloat16` its
# task arithmetic rounds every step to bf16; its linear merge computes in float32 either way).
MERGEKIT_DTYPES = "dtype: float32\nout_dtype: bfloat16\n"


def mergekit_config(method: str, base: Path, adapted: Path) -> str:
    if method == "linear":
        return (
            f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {adapted}\n    parameters: {{weight: 0.5}}\n" + MERGEKIT_DTYPES
        )
    if method == "task_arithmetic":
        return (
            f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {adapted}\n"
            "    parameters: {weight: 0.5}\n" + MERGEKIT_DTYPES
        )
    return (
        f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {adapted}\n"
        "parameters: {t: 0.5}\n" + MERGEKIT_DTYPES
    )


def ours_command(method: str, base: Path, adapted: Path, out: Path, checkout: Path = REPO) -> list[str]:
    return [sys.executable, str(checkout / "tools" / "merge.py"), "--base", str(base), "--adapted", str(adapted)] + [
        "--alpha",
        "0.5",
        "--method",
        method,
        "--out",
        str(out),
    ]


def differing_elements(a: Path, b: Path) -> tuple[int, int]:
    """(elements that differ, elements) over the tensors of two Hugging Face folders, by name."""
    fa, fb = HFFolder.open(a), HFFolder.open(b)
    if set(fa.tensors) != set(fb.tensors):
        raise SystemExit(f"{a} and {b} hold different tensor names")
    differ = total = 0
    for name in fa.tensors:
        ta, tb = fa.read(name), fb.read(name)
        differ += int((ta.view(torch.int16) != tb.view(torch.int16)).sum()) if ta.dtype == torch.bfloat16 else 0
        total += ta.numel()
    return differ, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="scratch folder (needs about 12 GB free)")
    p.add_argument("--mergekit", type=Path, help="mergekit-yaml of a mergekit 0.1.5 install (default: not run)")
    p.add_argument("--model", default="small", choices=["small", "llama31_8b"], help="model shape (default: 0.95B)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--keep-models", action="store_true", help="keep the two input models for another run")
    p.add_argument("--before", type=Path, help="another checkout whose tools/merge.py runs too, for comparison")
    args = p.parse_args()
    work = args.work / "merge_bench"
    base, adapted = work / "base", work / "adapted"
    cfg = load_model_config("llama31_8b")
    shard_bytes = None  # Hugging Face's 5 GB
    if args.model == "small":
        cfg, shard_bytes = dataclasses.replace(cfg, **SMALL_LLAMA), 500 * 10**6
    if not (base / "config.json").is_file():
        shutil.rmtree(work, ignore_errors=True)
        nbytes = write_random_llama(base, cfg, seed=0, shard_bytes=shard_bytes)
        write_random_llama(adapted, cfg, seed=1, shard_bytes=shard_bytes)
    else:
        nbytes = sum(e.nbytes for _, e in HFFolder.open(base).tensors.values())
    runs: dict[str, list] = {}
    loads = [load_average()]
    identity: dict[str, tuple[int, int]] = {}
    try:
        for r in range(args.rounds):
            jobs = [("cp", copy_command(base, work / "out_cp"), work / "out_cp")]
            for method in args.methods:
                cfg_file = work / f"{method}.yaml"
                cfg_file.write_text(mergekit_config(method, base, adapted))
                pair = [(f"ours {method}", ours_command(method, base, adapted, work / "out_ours"), work / "out_ours")]
                if args.mergekit:
                    mergekit = [str(args.mergekit), str(cfg_file), str(work / "out_mk")]
                    pair.append((f"mergekit {method}", mergekit, work / "out_mk"))
                if args.before:  # the other version between ours and mergekit's, alternating too
                    cmd = ours_command(method, base, adapted, work / "out_before", args.before)
                    pair.insert(1, (f"before {method}", cmd, work / "out_before"))
                jobs += pair if r % 2 == 0 else pair[::-1]
            for name, cmd, out in jobs:
                t = timed(cmd, work / "last.log", args.before if name.startswith("before") else None)
                loads.append(load_average())
                runs.setdefault(name, []).append(t)
                print(
                    f"round {r + 1} {name}: {t.wall_s:.1f} s, CPU {t.cpu_s:.1f} s, {t.peak_rss_mib:.0f} MiB", flush=True
                )
                method = name.split()[-1]
                if r == 0 and name.startswith("ours") and (args.mergekit or args.before):  # kept for the comparison
                    out.rename(work / f"kept_{method}")
                    continue
                if r == 0 and name.startswith("before"):
                    identity[f"before {method}"] = differing_elements(work / f"kept_{method}", out)
                    if not args.mergekit:  # nothing else compares with it: the disk space back
                        shutil.rmtree(work / f"kept_{method}")
                if r == 0 and name.startswith("mergekit"):
                    identity[method] = differing_elements(work / f"kept_{method}", out)
                    shutil.rmtree(work / f"kept_{method}")
                shutil.rmtree(out)
    finally:
        if not args.keep_models:
            shutil.rmtree(work, ignore_errors=True)
    cp = median([t.wall_s for t in runs["cp"]])
    lines = [
        machine_line(
            f"python benchmarks/merge_speed.py --work {args.work} --rounds {args.rounds} --model {args.model}"
            + (f" --mergekit {args.mergekit}" if args.mergekit else "")
            + (f" --methods {' '.join(args.methods)}" if args.methods != list(METHODS) else "")
            + (f" --before {args.before}" if args.before else ""),
            loads,
        ),
        "",
        f"Two random Llama models of {cfg.num_parameters() / 1e9:.2f}B parameters, bf16, {nbytes / 1e9:.2f} GB each; "
        f"medians of {args.rounds} interleaved rounds; wall time includes `sync`.",
        "",
        "| run | wall (median) | vs `cp` | vs mergekit | CPU time | peak RSS | output vs mergekit (before: vs ours) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, ts in runs.items():
        wall = median([t.wall_s for t in ts])
        method = name.split()[1] if " " in name else None
        mk = median([t.wall_s for t in runs[f"mergekit {method}"]]) if method and args.mergekit else None
        same = ""
        key = f"before {method}" if name.startswith("before") else method
        if not name.startswith("mergekit") and key in identity:
            differ, total = identity[key]
            same = "bit-identical" if differ == 0 else f"{differ:,} of {total:,} elements differ"
        lines.append(
            f"| {name} | {wall:.1f} s | {wall / cp:.2f}x | {f'{wall / mk:.2f}x' if mk else '-'} | "
            f"{median([t.cpu_s for t in ts]):.1f} s | {max(t.peak_rss_mib for t in ts):.0f} MiB | {same} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
