"""Per-domain perplexity of a model (Hugging Face folder or Megatron checkpoint) on held-out sets,
with a per-language breakdown where JSONL records carry a `language` field.

  python tools/evaluate.py --model MODEL_DIR \
      --data general=heldout/general.jsonl --data ecommerce=heldout/ecom_text_document \
      --out results/ppl.json [--seq-length 2048 --batch-size 8 --device auto --dtype bfloat16]

--data DOMAIN=PATH (repeatable): PATH is a JSON Lines file (one record per line with a text field,
  `text` unless --text-key says otherwise, optional `language`) or a Megatron indexed dataset
  prefix (PATH.bin + PATH.idx, as written by the data pipeline).
Each document (JSONL: tokenizer's BOS + text + EOS) is cut into non-overlapping windows of
--seq-length tokens; perplexity = exp(total next-token NLL / number of predicted tokens).
--model may be a Megatron checkpoint (a run's checkpoints/ folder: its latest iteration, or
--iteration N; one iter_* folder; a tools/convert_hf.py import or tools/merge.py output): it is
exported (bit-exact) to a temporary Hugging Face folder under --work-dir, evaluated, and deleted.
Results: JSON {model, seq_length, device, dtype, domains: {name: {perplexity, mean_loss, tokens,
sequences, documents, source, languages}}}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ellama_megatron.cli import run_tool
from ellama_megatron.eval.heldout_data import check_documents, parse_domain_spec
from ellama_megatron.formats.atomic import write_json_atomic
from ellama_megatron.merge.request import MergeInputError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        help="Hugging Face model folder (config.json, safetensors, tokenizer) or Megatron checkpoint",
    )
    p.add_argument(
        "--iteration", type=int, help="Megatron checkpoint: which iter_* to evaluate (default: the latest saved)"
    )
    p.add_argument(
        "--work-dir",
        help="Megatron checkpoint: where the temporary export goes (default: system temp; needs the model's size)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder, when the model's own cannot be found (default: the model's)")
    p.add_argument("--data", required=True, action="append", help="DOMAIN=PATH held-out set (repeatable)")
    p.add_argument("--out", help="results JSON file (default: print only)")
    p.add_argument("--seq-length", type=int, default=2048, help="window length in tokens (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default %(default)s)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default %(default)s)",
    )
    p.add_argument("--text-key", default="text", help="JSONL field holding the text (default %(default)s)")
    p.add_argument("--max-docs", type=int, help="evaluate at most this many documents per domain")
    return p.parse_args(argv)


def format_table(results: dict) -> str:
    lines = [f"{'domain':<24} {'perplexity':>12} {'loss':>8} {'tokens':>10}"]
    for name, r in results["domains"].items():
        lines.append(f"{name:<24} {r['perplexity']:>12.4f} {r['mean_loss']:>8.4f} {r['tokens']:>10}")
        for lang, lr in r["languages"].items():
            lines.append(
                f"  {name + '/' + lang:<22} {lr['perplexity']:>12.4f} {lr['mean_loss']:>8.4f} {lr['tokens']:>10}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sources = [parse_domain_spec(s) for s in args.data]
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"--data: domain names repeat: {names}")
        if args.seq_length < 2 or args.batch_size < 1:
            raise ValueError("--seq-length must be >= 2 and --batch-size >= 1")
        if args.tokenizer and not (Path(args.tokenizer) / "tokenizer_config.json").is_file():
            raise ValueError(
                f"--tokenizer {args.tokenizer}: no tokenizer_config.json; give a Hugging Face tokenizer folder"
            )
        for src in sources:  # all of the data, before a model is exported or loaded
            check_documents(src, args.text_key, args.max_docs)
        from ellama_megatron.eval.model_folder import hf_folder_of
        from ellama_megatron.eval.perplexity import evaluate_model_dir

        with hf_folder_of(args.model, "--model", args.work_dir, args.iteration, args.tokenizer) as hf_dir:
            results = evaluate_model_dir(
                hf_dir,
                sources,
                args.seq_length,
                args.batch_size,
                args.device,
                args.dtype,
                args.text_key,
                args.max_docs,
                tokenizer=args.tokenizer,
            )
        results["model"] = args.model
    except (MergeInputError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        write_json_atomic(args.out, results)
    summary = ", ".join(f"{k} {v['perplexity']:.3f}" for k, v in results["domains"].items())
    print(f"perplexity of {args.model}: {summary}" + (f" -> {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
