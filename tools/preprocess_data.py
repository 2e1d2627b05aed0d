"""Turn corpus files into Megatron indexed datasets (train + held-out validation) and a manifest.

    python tools/preprocess_data.py --input data/raw/listings/ --template listing \\
        --tokenizer /models/Llama-3.1-8B --output-prefix data/ellama/listings_en \\
        --valid-fraction 0.005 --workers 8

Inputs: JSON Lines (.jsonl/.json/.ndjson, optionally .gz or .zst), Parquet, Hugging Face
`datasets` folders (save_to_disk output, or a folder of local data files); folders are searched
recursively. Each record is serialized with a template (listing, review, plain, or a YAML file),
tokenized with the Hugging Face tokenizer folder given (its ids, special tokens included, then its
EOS as end-of-document), and written with Megatron's IndexedDatasetBuilder: the same .bin/.idx
Megatron-LM's tools/preprocess_data.py writes for those ids (uint16 ids below 65500 tokens, int32
above, as Megatron chooses).

Outputs: PREFIX_train.bin/.idx, PREFIX_valid.bin/.idx (documents chosen by a hash of their id or
text, not their position) and PREFIX.manifest.json (counts, languages, input checksums, tokenizer
identity, skipped records with reasons, and with --domain-filter the classifier's counts and
score histogram). Bad records are counted and skipped with file and line
reported; --strict stops at the first one. Nothing is renamed into place until all is written.
See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from ellama_megatron.cli import run_tool

# Megatron-Core's import chatter (no Transformer Engine, no CUDA, no rank) says nothing about data.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Could not determine rank).*")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from ellama_megatron.data.indexed_writer import BadRecordError
from ellama_megatron.data.manifest import ManifestError
from ellama_megatron.data.preprocess import add_preprocess_arguments, preprocess, preprocess_options, summary_line
from ellama_megatron.data.readers import InputError
from ellama_megatron.formats.tokenizer_folder import TokenizerFolderError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/preprocess_data.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_preprocess_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = preprocess_options(args)
        manifest = preprocess(opts)
    except (InputError, TokenizerFolderError, BadRecordError, ManifestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = manifest["skipped"]
    if skipped["count"]:
        print(f"skipped {skipped['count']:,} records: {json.dumps(skipped['by_reason'])}", file=sys.stderr)
        for ex in skipped["examples"][:10]:
            print(f"  {ex['file']}, {ex['location']}: {ex['reason']}", file=sys.stderr)
        if skipped["count"] > 10:
            print(f"  (first {len(skipped['examples'])} in {args.output_prefix}.manifest.json)", file=sys.stderr)
    df = manifest["domain_filter"]
    if df and not args.quiet:
        from ellama_megatron.classify.filter import FilterStats

        print(f"domain filter scores ('>': kept; {args.output_prefix}.manifest.json has them):", file=sys.stderr)
        print(
            FilterStats(df["threshold"], histogram=[b["docs"] for b in df["histogram"]]).histogram_text(),
            file=sys.stderr,
        )
    print(summary_line(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
