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
from ellama_megatron.data.preprocess import DEFAULT_MAX_DOC_CHARS, PreprocessOptions, preprocess, summary_line
from ellama_megatron.data.readers import InputError
from ellama_megatron.data.serializers import RecordSerializer, load_template
from ellama_megatron.formats.tokenizer_folder import TokenizerFolderError


def add_preprocess_arguments(p) -> None:
    """The options of preprocessing on an argparse parser: this tool's, which tools/prepare_data.py
    shares (one definition, one help text)."""
    p.add_argument("--input", nargs="+", required=True, help="input files or folders (all formats above)")
    p.add_argument("--output-prefix", required=True, help="output path without suffix, e.g. data/ellama/reviews_de")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer folder (with tokenizer.json)")
    p.add_argument(
        "--template",
        default="plain",
        help="listing | review | plain | path to a template YAML (keys: text, required, html_fields). Default: plain",
    )
    p.add_argument(
        "--text-key", default="text", help="record key holding the text for --template plain (default: text)"
    )
    p.add_argument("--language-key", default="language", help="record key holding a language code (default: language)")
    p.add_argument("--default-language", default="und", help="language recorded for records without one (default: und)")
    p.add_argument(
        "--id-key",
        default=None,
        help="record key identifying a document; the validation split hashes it (default: hash the text)",
    )
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=0.0,
        help="fraction of documents held out for validation, e.g. 0.005 (default: 0)",
    )
    p.add_argument(
        "--source", default=None, help="source name recorded in the manifest (default: the prefix's file name)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes; each reads its own shards and batch-encodes on its own threads (default: 1)",
    )
    p.add_argument(
        "--shard-mb",
        type=float,
        default=64,
        help="plain JSONL/Parquet inputs are cut into shards of this size (default: 64)",
    )
    p.add_argument("--batch-docs", type=int, default=1000, help="documents per tokenizer batch (default: 1000)")
    p.add_argument(
        "--domain-filter",
        default=None,
        metavar="MODEL_DIR",
        help="keep only documents this classifier (tools/domain_classifier.py train) scores above the "
        "threshold; runs in the workers on the serialized text, before tokenization",
    )
    p.add_argument(
        "--domain-threshold",
        type=float,
        default=None,
        help="keep scores strictly above this (default: the threshold stored with the classifier)",
    )
    p.add_argument(
        "--bos",
        choices=("auto", "always", "never"),
        default="auto",
        help="BOS before every document: auto = what the tokenizer's template adds (Meta's Llama 3 folders: "
        "<|begin_of_text|>; a bare tokenizer.json: none), always, never; the manifest records what was written",
    )
    p.add_argument(
        "--bos-token",
        default=None,
        help="the BOS token (default: the folder's bos_token); for a folder that names none, e.g. a bare "
        "tokenizer.json: --bos always --bos-token '<|begin_of_text|>'",
    )
    p.add_argument(
        "--eod-token",
        default=None,
        help="token after every document (default: the folder's eos_token; a chat folder's end-of-turn "
        "eos such as <|eot_id|> is refused without this option, e.g. --eod-token '<|end_of_text|>')",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument(
        "--max-doc-chars",
        type=int,
        default=DEFAULT_MAX_DOC_CHARS,
        help="skip (and count in the summary) documents longer than this many characters: tokenizing "
        f"costs ~200x a document's size in memory (default {DEFAULT_MAX_DOC_CHARS:,}; 0: no limit)",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="write a 0-document dataset when no document is left (refused by default: usually a wrong input)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs of --output-prefix")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def preprocess_options(args) -> PreprocessOptions:
    """PreprocessOptions from the parsed ``add_preprocess_arguments`` options (errors of the
    template: InputError/ValueError naming it)."""
    serializer = RecordSerializer(
        template=load_template(args.template, text_key=args.text_key),
        language_key=args.language_key,
        default_language=args.default_language,
        id_key=args.id_key,
    )
    return PreprocessOptions(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_dir=args.tokenizer,
        serializer=serializer,
        source=args.source,
        valid_fraction=args.valid_fraction,
        workers=args.workers,
        shard_bytes=int(args.shard_mb * (1 << 20)),
        batch_docs=args.batch_docs,
        strict=args.strict,
        overwrite=args.overwrite,
        progress=not args.quiet,
        domain_filter=args.domain_filter,
        domain_threshold=args.domain_threshold,
        bos=args.bos,
        eod_token=args.eod_token,
        bos_token=args.bos_token,
        allow_empty=args.allow_empty,
        max_doc_chars=args.max_doc_chars,
    )


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
