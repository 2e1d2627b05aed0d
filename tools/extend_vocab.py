"""Extend a Llama 3.x vocabulary with domain tokens (eBay's follow-up to e-Llama, arXiv 2509.26124).

  python tools/extend_vocab.py --hf-dir BASE --corpus listings.jsonl --template listing \
      --num-tokens 30000 --out BASE-ecom --general web_sample.jsonl

Learns up to N new tokens as BPE merges over the base tokenizer's byte-level BPE (every old id keeps
its meaning; new ids come after the last existing id, special tokens included), writes the
extended Hugging Face folder to --out: tokenizer.json with the new vocabulary and merges appended,
the weights with input and output embeddings grown (each new row = mean of the rows of the old
tokens its string splits into; vocab padded to --pad-to-multiple-of), config.json with the new
vocab_size, and vocab_extension.json with the new tokens and the compression gain: tokens per
document before/after on a held-out part of the corpus and on --general text (about unchanged).
BASE may also be a tokenizer-only folder (then only the tokenizer is extended).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from ellama_megatron.cli import run_tool
from ellama_megatron.data.documents import read_texts
from ellama_megatron.data.readers import InputError, check_readable, expand_inputs
from ellama_megatron.data.serializers import load_template
from ellama_megatron.run.plan import VOCAB_DIVISIBLE_BY


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--hf-dir", required=True, help="base Hugging Face folder (tokenizer.json, config.json, safetensors)"
    )
    p.add_argument(
        "--corpus", nargs="+", required=True, help="domain documents to learn tokens from (files or folders)"
    )
    p.add_argument("--num-tokens", type=int, required=True, help="how many new tokens to learn (at most)")
    p.add_argument("--out", required=True, help="extended folder to write")
    p.add_argument(
        "--template",
        default="plain",
        help="how corpus records become text: plain, listing, review or a template file (default plain)",
    )
    p.add_argument(
        "--text-key", default="text", help="record field holding the text for the plain template (default text)"
    )
    p.add_argument(
        "--general", nargs="*", default=[], help="general-domain documents to report compression on (plain template)"
    )
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.05,
        help="part of the corpus kept out of learning, for the compression report (default 0.05)",
    )
    p.add_argument(
        "--min-frequency", type=int, default=2, help="stop when the best pair occurs fewer times (default 2)"
    )
    p.add_argument(
        "--pad-to-multiple-of",
        type=int,
        default=VOCAB_DIVISIBLE_BY,
        help=(
            f"pad the model's vocab size to a multiple of this (default {VOCAB_DIVISIBLE_BY}, "
            "Megatron's make_vocab_size_divisible_by)"
        ),
    )
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many corpus documents")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    return p


def main(argv=None) -> int:
    from tqdm import tqdm

    from ellama_megatron.formats.hf_folder import has_weights
    from ellama_megatron.vocab.extend import extend_vocabulary, load_base

    args = build_parser().parse_args(argv)
    hf_dir = Path(args.hf_dir)
    if args.num_tokens < 1:
        sys.exit(f"error: --num-tokens must be at least 1, got {args.num_tokens}")
    if not 0.0 <= args.heldout_fraction < 1.0:
        sys.exit(f"error: --heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
    if not hf_dir.is_dir():
        sys.exit(f"error: --hf-dir {hf_dir}: no such folder")
    try:
        load_base(hf_dir)
        if has_weights(hf_dir) and not (hf_dir / "config.json").is_file():
            raise ValueError(f"{hf_dir}: has weights but no config.json")
        for inputs in (args.corpus, args.general):
            for f in expand_inputs(inputs):
                check_readable(f)
        load_template(args.template, args.text_key)
    except (ValueError, InputError) as e:
        sys.exit(f"error: {e}")
    if Path(args.out).resolve() == hf_dir.resolve():
        sys.exit("error: --out must differ from --hf-dir")

    t0 = time.perf_counter()
    texts, counts = read_texts(args.corpus, args.template, args.text_key, args.max_docs)
    if not texts:
        sys.exit(f"error: --corpus: no usable documents ({counts.skipped} skipped: {counts.examples[:2]})")
    general, _ = read_texts(args.general, "plain", args.text_key) if args.general else ([], None)
    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    n_held = int(len(texts) * args.heldout_fraction)
    held = [texts[i] for i in order[:n_held]]
    train = [texts[i] for i in order[n_held:]]
    print(
        f"corpus: {len(train)} documents to learn from, {len(held)} held out; {counts.skipped} records skipped",
        file=sys.stderr,
    )
    with tqdm(total=args.num_tokens, desc="learning merges", unit="tok") as bar:
        report = extend_vocabulary(
            hf_dir,
            train,
            args.num_tokens,
            args.out,
            held,
            general,
            args.min_frequency,
            args.pad_to_multiple_of,
            bar.update,
        )
    c = report["compression"]
    for name, r in c.items():
        if r["docs"]:
            print(
                f"{name}: {r['tokens_per_doc_before']} -> {r['tokens_per_doc_after']} tokens/doc "
                f"({100 * r['reduction']:.1f}% fewer) over {r['docs']} docs",
                file=sys.stderr,
            )
    model = report.get("model")
    size = f"; model vocab {model['old_vocab_size']} -> {model['vocab_size']}" if model else "; tokenizer only"
    print(
        f"done: {report['new_tokens']} new tokens (ids {report['first_new_id']}.."
        f"{(report['first_new_id'] or 0) + report['new_tokens'] - 1}){size}; wrote {args.out} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
