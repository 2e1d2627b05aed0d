"""Train and apply the e-commerce web-page classifier (the e-Llama authors selected FineWeb pages
this way).

  train:  python tools/domain_classifier.py train --positive listings.jsonl --positive-template listing \
              --negative web.jsonl --out models/ecom_clf
          fits a logistic regression over hashed word, word-pair and byte 3-5-gram features on all but
          a held-out part, prints precision/recall on that part, and writes the model folder
          (weights.npz + classifier.json; loading it never unpickles).
  filter: python tools/domain_classifier.py filter --model models/ecom_clf --input web/ \
              --threshold 0.5 --out ecom_web.jsonl.zst
          streams documents through the same readers as tools/preprocess_data.py, writes those scoring
          strictly above the threshold (with their score), and a <out>.stats.json with counts, a
          score histogram and the scoring throughput.

Inputs: JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet, Arrow, folders of them, Hugging Face
save_to_disk folders. Records become text through --*-template (plain: the --text-key field;
listing, review: the built-in serializations; or a template YAML file).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ellama_megatron.classify.features import FeatureConfig
from ellama_megatron.cli import run_tool
from ellama_megatron.data.documents import ReadCounts, iter_documents, read_texts
from ellama_megatron.data.readers import InputError, check_readable, expand_inputs
from ellama_megatron.data.serializers import load_template


def _check_inputs(inputs: list[str], what: str) -> None:
    try:
        for f in expand_inputs(inputs):
            check_readable(f)
    except InputError as e:
        sys.exit(f"error: {what}: {e}")


def _check_template(name: str, text_key: str, what: str):
    try:
        return load_template(name, text_key)
    except ValueError as e:
        sys.exit(f"error: {what}: {e}")


def cmd_train(args) -> int:
    _check_inputs(args.positive, "--positive")
    _check_inputs(args.negative, "--negative")
    _check_template(args.positive_template, args.text_key, "--positive-template")
    _check_template(args.negative_template, args.text_key, "--negative-template")
    if not 0.0 <= args.heldout_fraction < 1.0:
        sys.exit(f"error: --heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
    try:
        features = FeatureConfig(
            n_features=1 << args.hash_bits, char_ngrams=tuple(args.char_ngrams), word_bigrams=not args.no_word_bigrams
        )
    except ValueError as e:
        sys.exit(f"error: {e}")

    from ellama_megatron.classify.model import save_classifier, train_classifier

    t0 = time.perf_counter()
    pos, pos_counts = read_texts(args.positive, args.positive_template, args.text_key, args.max_docs)
    neg, neg_counts = read_texts(args.negative, args.negative_template, args.text_key, args.max_docs)
    for name, counts, texts in (("positive", pos_counts, pos), ("negative", neg_counts, neg)):
        print(f"{name}: {len(texts)} documents, {counts.skipped} records skipped", file=sys.stderr)
        for ex in counts.examples:
            print(f"  skipped {ex}", file=sys.stderr)
        if not texts:
            sys.exit(f"error: no usable {name} documents (check --{name}-template and --text-key)")
    print(f"training on {len(pos) + len(neg)} documents ...", file=sys.stderr)
    clf, est, report = train_classifier(pos, neg, features, args.heldout_fraction, args.c, args.threshold, args.seed)
    extra = {
        "inputs": {
            "positive": args.positive,
            "negative": args.negative,
            "positive_template": args.positive_template,
            "negative_template": args.negative_template,
            "text_key": args.text_key,
        }
    }
    save_classifier(clf, args.out, extra)
    m = report.get("heldout_metrics")
    if m:
        print(
            f"held-out ({report['heldout']['positive']} positive, {report['heldout']['negative']} negative) "
            f"at threshold {m['threshold']}: precision {m['precision']:.4f} recall {m['recall']:.4f} "
            f"F1 {m['f1']:.4f} ROC AUC {m.get('roc_auc', float('nan')):.4f}"
        )
    print(f"done: model written to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_filter(args) -> int:
    from tqdm import tqdm

    from ellama_megatron.classify.filter import DomainFilter, filter_documents
    from ellama_megatron.formats.atomic import write_json_atomic

    _check_inputs(args.input, "--input")
    template = _check_template(args.template, args.text_key, "--template")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        sys.exit(f"error: --threshold must be in [0, 1], got {args.threshold}")
    try:
        dfilter = DomainFilter(args.model, args.threshold)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: --model: {e}")
    out = Path(args.out)
    stats_path = Path(args.stats) if args.stats else out.with_name(out.name + ".stats.json")

    total = sum(f.stat().st_size for f in expand_inputs(args.input))
    counts = ReadCounts()
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="scoring", disable=args.quiet) as bar:
        stats = filter_documents(
            iter_documents(args.input, template, counts),
            dfilter,
            out,
            score_field=args.score_field or None,
            progress=bar.update,
        )
    wall = time.perf_counter() - t0
    summary = stats.to_dict()
    summary.update(
        {
            "model": args.model,
            "inputs": args.input,
            "output": str(out),
            "records_skipped": counts.skipped,
            "skipped_examples": counts.examples,
            "wall_seconds": round(wall, 3),
        }
    )
    write_json_atomic(stats_path, summary)
    if not args.quiet:
        print(stats.histogram_text(), file=sys.stderr)
    print(
        f"done: kept {stats.kept}/{stats.docs} documents ({stats.kept_bytes / 1e6:.2f}/{stats.bytes / 1e6:.2f} MB) "
        f"over threshold {stats.threshold}; {counts.skipped} records skipped; scoring "
        f"{summary['scoring_mb_per_s']} MB/s; wrote {out} and {stats_path}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fit the classifier and report held-out precision/recall")
    t.add_argument("--positive", nargs="+", required=True, help="e-commerce examples (files or folders)")
    t.add_argument("--negative", nargs="+", required=True, help="general-domain examples (files or folders)")
    t.add_argument(
        "--positive-template",
        default="plain",
        help="how positive records become text: plain, listing, review or a template file (default plain)",
    )
    t.add_argument("--negative-template", default="plain", help="same for negative records (default plain)")
    t.add_argument(
        "--text-key", default="text", help="record field holding the text for the plain template (default text)"
    )
    t.add_argument("--out", required=True, help="model folder to write")
    t.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.1,
        help="part of each class held out for precision/recall (default 0.1)",
    )
    t.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="decision threshold stored with the model and used for the held-out report (default 0.5)",
    )
    t.add_argument(
        "--c",
        type=float,
        default=10.0,
        help="inverse L2 regularisation strength of the logistic regression (default 10)",
    )
    t.add_argument(
        "--hash-bits", type=int, default=20, help="log2 of the number of hash buckets (default 20: 1M weights)"
    )
    t.add_argument("--char-ngrams", type=int, nargs="+", default=[3, 4, 5], help="byte n-gram lengths (default 3 4 5)")
    t.add_argument("--no-word-bigrams", action="store_true", help="leave out adjacent word pairs")
    t.add_argument("--max-docs", type=int, default=None, help="read at most this many documents per class")
    t.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("filter", help="keep the documents scoring above a threshold")
    f.add_argument("--model", required=True, help="model folder written by `train`")
    f.add_argument("--input", nargs="+", required=True, help="documents to score (files or folders)")
    f.add_argument("--out", required=True, help="JSONL file for the kept records (.gz/.zst compress)")
    f.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="keep scores strictly above this (default: the model's, 0.5 unless trained otherwise)",
    )
    f.add_argument(
        "--template",
        default="plain",
        help="how records become text: plain, listing, review or a template file (default plain)",
    )
    f.add_argument(
        "--text-key", default="text", help="record field holding the text for the plain template (default text)"
    )
    f.add_argument(
        "--score-field",
        default="domain_score",
        help="field added to kept records with their score; '' to leave records unchanged",
    )
    f.add_argument(
        "--stats", default=None, help="where to write counts and the score histogram (default <out>.stats.json)"
    )
    f.add_argument("--quiet", action="store_true", help="no progress bar or histogram")
    f.set_defaults(func=cmd_filter)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(run_tool(main))
