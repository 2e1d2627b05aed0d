"""Per-domain perplexity of a Hugging Face model folder on held-out sets, with a per-language
breakdown where JSONL records carry a `language` field.

  python tools/evaluate.py --model MODEL_DIR \
      --data general=heldout/general.jsonl --data ecommerce=heldout/ecom_text_document \
      --out results/ppl.json [--seq-length 2048 --batch-size 8 --device auto --dtype bfloat16]

--data DOMAIN=PATH (repeatable): PATH is a JSON Lines file (one record per line with a text field,
  `text` unless --text-key says otherwise, optional `language`) or a Megatron indexed dataset
  prefix (PATH.bin + PATH.idx, as written by the data pipeline).
Each document (JSONL: tokenizer's BOS + text + EOS) is cut into non-overlapping windows of
--seq-length tokens; perplexity = exp(total next-token NLL / number of predicted tokens).
Results: JSON {model, seq_length, device, dtype, domains: {name: {perplexity, mean_loss, tokens,
sequences, documents, source, languages}}}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ellama_megatron.eval.heldout_data import parse_domain_spec
from ellama_megatron.eval.results_file import write_json_atomic
from ellama_megatron.merge.megatron_checkpoint import refuse_megatron_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--data", required=True, action="append", help="DOMAIN=PATH held-out set (repeatable)")
    p.add_argument("--out", help="results JSON file (default: print only)")
    p.add_argument("--seq-length", type=int, default=2048, help="window length in tokens (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype (default %(default)s)")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text (default %(default)s)")
    p.add_argument("--max-docs", type=int, help="evaluate at most this many documents per domain")
    return p.parse_args(argv)


def check_model_dir(path: str) -> None:
    refuse_megatron_checkpoint(path, "--model", "evaluation")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"--model {path}: no config.json; give a Hugging Face model folder")


def format_table(results: dict) -> str:
    lines = [f"{'domain':<24} {'perplexity':>12} {'loss':>8} {'tokens':>10}"]
    for name, r in results["domains"].items():
        lines.append(f"{name:<24} {r['perplexity']:>12.4f} {r['mean_loss']:>8.4f} {r['tokens']:>10}")
        for lang, lr in r["languages"].items():
            lines.append(f"  {name + '/' + lang:<22} {lr['perplexity']:>12.4f} {lr['mean_loss']:>8.4f} {lr['tokens']:>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_model_dir(args.model)
        sources = [parse_domain_spec(s) for s in args.data]
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"--data: domain names repeat: {names}")
        if args.seq_length < 2 or args.batch_size < 1:
            raise ValueError("--seq-length must be >= 2 and --batch-size >= 1")
        from ellama_megatron.eval.perplexity import evaluate_model_dir

        results = evaluate_model_dir(
            args.model, sources, args.seq_length, args.batch_size, args.device, args.dtype, args.text_key, args.max_docs
        )
    except ValueError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        write_json_atomic(args.out, results)
    summary = ", ".join(f"{k} {v['perplexity']:.3f}" for k, v in results["domains"].items())
    print(f"perplexity of {args.model}: {summary}" + (f" -> {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
