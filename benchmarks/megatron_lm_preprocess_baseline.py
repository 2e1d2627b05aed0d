"""The baseline for tools/preprocess_data.py: Megatron-LM's tools/preprocess_data.py default path,
rebuilt from the megatron-core wheel's own parts (that script is not in the wheel). The comparison
with the real script, cloned from GitHub, is benchmarks/preprocess_vs_megatron_lm.py.

    python benchmarks/megatron_lm_preprocess_baseline.py --input corpus.jsonl --tokenizer DIR \\
        --output-prefix /tmp/mlm --workers 2

What Megatron-LM does with `--tokenizer-type HuggingFaceTokenizer --json-keys text --append-eod`,
one partition, no sentence splitting: a multiprocessing.Pool whose workers each build the tokenizer
with megatron.core's build_tokenizer; the main process feeds it one JSON line per task
(Pool.imap, chunks of 32); each worker parses the line and tokenizes the text alone; the main
process appends every document with IndexedDatasetBuilder.add_document and finalizes the .idx.
Prints one JSON line: documents, tokens, wall seconds, tokens/s. Compare its .bin/.idx with ours
(`benchmarks/preprocess_throughput.py --baseline` runs both and compares the bytes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # ellama_megatron from this checkout

_TOKENIZER = None


def _tokenizer_args(tokenizer_dir: str) -> argparse.Namespace:
    """Megatron-LM's tokenizer arguments at their defaults (the wheel's own parser), as its script sets them."""
    from megatron.training.arguments import _add_tokenizer_args

    args = _add_tokenizer_args(argparse.ArgumentParser()).parse_args(
        ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]
    )
    args.rank, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size, args.vocab_extra_ids = 1, 128, 1, 0
    return args


def _init(tokenizer_dir: str) -> None:
    global _TOKENIZER
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    _TOKENIZER = build_tokenizer(_tokenizer_args(tokenizer_dir))


def _encode(line: str):
    ids = _TOKENIZER.tokenize(json.loads(line)["text"])
    if ids:
        ids.append(_TOKENIZER.eod)
    return ids, len(line)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--input", required=True, help="JSON Lines with a 'text' field")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer folder")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes, as Megatron-LM's --workers")
    args = p.parse_args()

    from megatron.core.datasets.indexed_dataset import DType
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from ellama_megatron.formats import indexed_dataset

    start = time.time()
    vocab = build_tokenizer(_tokenizer_args(args.tokenizer)).vocab_size
    builder = indexed_dataset.builder(args.output_prefix, DType.optimal_dtype(vocab))
    docs = tokens = 0
    with (
        open(args.input, encoding="utf-8") as fin,
        multiprocessing.Pool(args.workers, initializer=_init, initargs=(args.tokenizer,)) as pool,
    ):
        for ids, _ in pool.imap(_encode, fin, 32):
            if ids:
                builder.add_document(ids, [len(ids)])
                docs += 1
                tokens += len(ids)
    indexed_dataset.finalize(builder, args.output_prefix)
    wall = time.time() - start
    print(
        json.dumps(
            {
                "workers": args.workers,
                "documents": docs,
                "tokens": tokens,
                "wall_s": round(wall, 1),
                "tokens_per_s": round(tokens / wall),
            }
        )
    )


if __name__ == "__main__":
    main()
