"""Tokens per second of tools/preprocess_data.py on a >= 200 MB corpus with a full-size (128k)
byte-level BPE tokenizer, at 1 and 2 worker processes. Run by hand; results go to docs/benchmarks.md.

    python benchmarks/preprocess_throughput.py --work-dir /tmp/ellama_bench --mb 220

Everything is made locally: the corpus is the demo generator's listings, reviews and general text
(ellama_megatron/testing/demo_corpora.py) serialized to {"text": ...} JSON Lines (the input Megatron-LM's
own tools/preprocess_data.py reads, for a like-for-like comparison), each document followed by a
long tail of made-up words so a byte-level BPE can learn a full 128,256-entry vocabulary (trained
on the first --tokenizer-mb of the corpus). Each run is the whole tool as a subprocess (interpreter
start, checks, checksums, merge and manifest included); the outputs of all runs must be identical.

--with-domain-filter also runs every worker count with `--domain-filter` (a classifier trained here
on the demo corpora's listings and reviews against general text, threshold 0.5), to show what the
filter stage costs inside preprocessing. --baseline also runs Megatron-LM's way
(benchmarks/megatron_lm_preprocess_baseline.py) at each worker count and checks that it wrote the
same bytes.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ellama_megatron.data.serializers import load_template, serialize  # noqa: E402
from ellama_megatron.formats.atomic import atomic_file  # noqa: E402
from ellama_megatron.testing.demo_corpora import make_general, make_listing, make_review  # noqa: E402

_SYL = (
    "ka lo mi ra ne so ti va ze qu or an el is um ba de fi go hu ja ko lu mo nu pe ri sa to vi xo yu zo ch st th"
).split()


def _rare_word(rank: int) -> str:
    out = []
    rank += len(_SYL)  # at least two syllables
    while rank:
        rank, r = divmod(rank, len(_SYL))
        out.append(_SYL[r])
    return "".join(out)


def write_corpus(path: Path, target_bytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    nrng = numpy.random.default_rng(seed)
    listing, review = load_template("listing"), load_template("review")
    langs = ("en", "de", "fr")
    docs = 0
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        while f.tell() < target_bytes:
            kind = rng.random()
            lang = langs[docs % 3]
            if kind < 0.4:
                text = serialize(make_listing(rng, lang, docs), listing)
            elif kind < 0.6:
                text = serialize(make_review(rng, lang, docs), review)
            else:
                text = make_general(rng, "en", docs)["text"]
            ranks = numpy.minimum(nrng.zipf(1.15, rng.randint(10, 60)), 3_000_000)
            text += "\n" + " ".join(_rare_word(int(r)) for r in ranks)
            f.write(json.dumps({"text": text, "language": lang}, ensure_ascii=False) + "\n")
            docs += 1
    return docs


def train_tokenizer(corpus: Path, out: Path, mb: int) -> None:
    from ellama_megatron.testing.tiny_llama import train_tiny_tokenizer

    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size > mb << 20:
                break
    train_tiny_tokenizer(texts, out, vocab_size=128_256)


def train_demo_classifier(out: Path) -> None:
    """A classifier trained on the demo corpora (listings + reviews vs general text)."""
    import tempfile

    from ellama_megatron.classify.features import FeatureConfig
    from ellama_megatron.classify.model import save_classifier, train_classifier
    from ellama_megatron.data.documents import read_texts
    from ellama_megatron.testing.demo_corpora import write_demo_corpora

    with tempfile.TemporaryDirectory() as d:
        c = write_demo_corpora(d, docs=2000, seed=1)
        pos = read_texts([str(c["listings"])], "listing")[0] + read_texts([str(c["reviews"])], "review")[0]
        neg = read_texts([str(c["general_en"]), str(c["general_multilingual"])], "plain")[0]
    clf, est, _ = train_classifier(pos, neg, FeatureConfig(), heldout_fraction=0.0)
    save_classifier(clf, out)


def run_tool(corpus: Path, tok: Path, prefix: Path, workers: int, domain_filter: Path | None = None) -> dict:
    cmd = [
        sys.executable,
        str(REPO / "tools" / "preprocess_data.py"),
        "--input",
        str(corpus),
        "--tokenizer",
        str(tok),
        "--output-prefix",
        str(prefix),
        "--workers",
        str(workers),
        "--quiet",
        "--overwrite",
    ]
    if domain_filter is not None:
        cmd += ["--domain-filter", str(domain_filter)]
    start = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.time() - start
    manifest = json.loads(Path(f"{prefix}.manifest.json").read_text())
    tokens = manifest["splits"]["train"]["tokens"]
    result = {
        "workers": workers,
        "wall_s": round(wall, 1),
        "tool_s": manifest["seconds"],
        "tokens": tokens,
        "documents": manifest["splits"]["train"]["documents"],
        "tokens_per_s": round(tokens / wall),
        "input_mb_per_s": round(corpus.stat().st_size / 1e6 / wall, 2),
    }
    if domain_filter is not None:
        df = manifest["domain_filter"]
        result["domain_filter"] = {k: df[k] for k in ("docs", "kept", "scoring_seconds", "scoring_mb_per_s")}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work-dir", default="/tmp/ellama_bench", help="corpus, tokenizer and outputs (reused when present)"
    )
    p.add_argument("--mb", type=int, default=220, help="corpus size in MB (at least 200 for the issue's figure)")
    p.add_argument("--tokenizer-mb", type=int, default=40, help="MB of the corpus the 128k BPE is trained on")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    p.add_argument("--repeats", type=int, default=1, help="runs per worker count (the best is reported)")
    p.add_argument("--with-domain-filter", action="store_true", help="also run each worker count with --domain-filter")
    p.add_argument("--baseline", action="store_true", help="also run Megatron-LM's way at each worker count")
    args = p.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, tok = work / "corpus.jsonl", work / "bpe128k"
    if not corpus.exists():
        t = time.time()
        docs = write_corpus(corpus, args.mb << 20)
        print(
            f"corpus: {docs:,} documents, {corpus.stat().st_size / 2**20:.0f} MB in {time.time() - t:.0f} s", flush=True
        )
    if not (tok / "tokenizer.json").exists():
        t = time.time()
        train_tokenizer(corpus, tok, args.tokenizer_mb)
        print(f"tokenizer trained in {time.time() - t:.0f} s", flush=True)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size()
    print(
        f"corpus {corpus.stat().st_size / 2**20:.0f} MB, vocabulary {vocab:,}, cores {len(os.sched_getaffinity(0))}, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = []
    for w in args.workers:
        best = max(
            (run_tool(corpus, tok, work / f"out_w{w}", w) for _ in range(args.repeats)), key=lambda r: r["tokens_per_s"]
        )
        results.append(best)
        print(json.dumps(best), flush=True)
    first = work / f"out_w{args.workers[0]}_train"
    same = all(
        filecmp.cmp(f"{first}{e}", f"{work / f'out_w{w}_train'}{e}", shallow=False)
        for w in args.workers
        for e in (".bin", ".idx")
    )
    print(f"outputs identical across worker counts: {same}")
    if args.baseline:
        for w in args.workers:
            prefix = work / f"megatron_lm_w{w}"
            out = subprocess.run(
                [
                    sys.executable,
                    str(REPO / "benchmarks" / "megatron_lm_preprocess_baseline.py"),
                    "--input",
                    str(corpus),
                    "--tokenizer",
                    str(tok),
                    "--output-prefix",
                    str(prefix),
                    "--workers",
                    str(w),
                ],
                check=True,
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["same_bytes_as_ours"] = all(
                filecmp.cmp(f"{first}{e}", f"{prefix}{e}", shallow=False) for e in (".bin", ".idx")
            )
            print(json.dumps({"megatron_lm": True, **result}), flush=True)
    if args.with_domain_filter:
        clf = work / "domain_classifier"
        if not (clf / "classifier.json").exists():
            train_demo_classifier(clf)
        for w in args.workers:
            best = max(
                (run_tool(corpus, tok, work / f"filtered_w{w}", w, clf) for _ in range(args.repeats)),
                key=lambda r: r["tokens_per_s"],
            )
            print(json.dumps({"domain_filter": True, **best}), flush=True)


if __name__ == "__main__":
    main()
