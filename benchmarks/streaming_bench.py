"""What the merge and conversion benchmarks share: random-weight Llama folders written tensor by
tensor, one timed command (wall time until its output is on disk, its CPU time and peak RSS),
interleaved rounds and their medians, and the line that says where and when a table was measured.
Not a benchmark itself: benchmarks/merge_speed.py and benchmarks/convert_8b.py import it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ellama_megatron.formats.hf_shards import ShardedWriter  # noqa: E402
from ellama_megatron.llama import weights as W  # noqa: E402
from ellama_megatron.llama.hf import generation_config_dict, hf_config_dict  # noqa: E402
from ellama_megatron.testing.tiny_llama import sample_texts, train_tiny_tokenizer  # noqa: E402

# A Llama of 0.95B parameters (1.9 GB in bf16): big enough that per-byte costs dominate, small
# enough for a 2-core VM's page cache to hold two of them and their outputs.
SMALL_LLAMA = dict(
    hidden_size=2048,
    num_layers=13,
    ffn_hidden_size=8192,
    num_attention_heads=16,
    num_query_groups=8,
    kv_channels=128,
    vocab_size=32000,
    name="bench_0.95b",
)


def write_random_llama(folder: Path, cfg, seed: int = 0, shard_bytes: int | None = None) -> int:
    """A random-weight Llama Hugging Face folder of ``cfg``'s shape in bf16 (std 0.02), generated
    and streamed into shards tensor by tensor (never the whole model in memory), with a tiny
    tokenizer; returns the weight bytes."""
    folder.mkdir(parents=True)
    shapes = W.hf_shapes(cfg)
    plan = [(n, torch.bfloat16, s) for n, s in shapes.items()]
    writer = ShardedWriter(folder, plan) if shard_bytes is None else ShardedWriter(folder, plan, shard_bytes)
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        writer.write(name, torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02).to(torch.bfloat16))
    writer.close()
    config = hf_config_dict(cfg, torch.bfloat16)
    config.update(bos_token_id=1, eos_token_id=2)  # ids of the tiny tokenizer's vocabulary
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(generation_config_dict(cfg)))
    train_tiny_tokenizer(sample_texts(50), folder / "_tok", 512)
    for f in (folder / "_tok").iterdir():
        shutil.move(str(f), folder / f.name)
    (folder / "_tok").rmdir()
    return writer.total_size


@dataclasses.dataclass
class Timing:
    wall_s: float  # from start until the output is on disk (the command, then sync)
    cpu_s: float  # the command's user + system CPU time
    peak_rss_mib: float  # the command's peak resident memory


def timed(cmd: list[str], log: Path, pythonpath: Path | None = None) -> Timing:
    """Run ``cmd`` (cwd: the repository), then ``sync``: its output is on disk when the clock
    stops, as it is for a copy timed the same way. CPU time and peak RSS come from GNU time (the
    command's own: a child forked from this process would report this process's peak). A failure
    stops the benchmark; its output is in ``log``. ``pythonpath``: the checkout whose package the
    command imports (another version of the tools, to compare with)."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath else None
    usage = log.with_suffix(".time")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%U %S %M", "-o", str(usage), *cmd],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    user, system, max_kb = usage.read_text().split()[-3:]
    return Timing(wall, float(user) + float(system), int(max_kb) / 1024)


def copy_command(src: Path, dst: Path) -> list[str]:
    """The floor: ``cp -r`` of a model folder."""
    return ["cp", "-r", str(src), str(dst)]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_line(command: str, loads: list[float]) -> str:
    """When, where and under what load a table was measured, and the command that measures it."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs ({cpu}), {ram:.0f} GiB RAM, "
        f"load average (1 min) {min(loads):.1f}-{max(loads):.1f} during the runs; torch {torch.__version__}; "
        f"`{command}`"
    )


def load_average() -> float:
    return os.getloadavg()[0]
