"""Llama 3.x between Hugging Face folders and Megatron torch_dist checkpoints.

    python tools/convert_hf.py import --hf-dir Meta-Llama-3.1-8B --out ckpt/llama31_8b [--target-tp 8] [--verify]
    python tools/convert_hf.py export --ckpt runs/cpt/checkpoints --out hf/cpt_final [--iteration 2000]

import: a Hugging Face Llama folder (config.json, safetensors shards + index, tokenizer files)
becomes a Megatron torch_dist checkpoint that recipes/cpt.py starts from with
checkpoint.init_from=CKPT_DIR, at any TP/PP. It records the model config and the tokenizer.
export: any checkpoint the engine saved (any TP/PP, with or without optimizer state), or an
import output, becomes a Hugging Face folder (shards <= 5 GB, index, config.json readable by
transformers 4 and 5, generation_config.json, tokenizer). Both stream one tensor at a time.
Outputs are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ellama_megatron.cli import run_tool


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face folder -> Megatron torch_dist checkpoint")
    imp.add_argument(
        "--hf-dir", type=Path, required=True, help="Hugging Face Llama folder (config.json, *.safetensors, tokenizer)"
    )
    imp.add_argument(
        "--out", type=Path, required=True, help="checkpoint folder to create (use as checkpoint.init_from)"
    )
    imp.add_argument(
        "--target-tp",
        type=int,
        default=1,
        help="TP the run will use: checked against the head counts; the vocab is padded for it (default 1)",
    )
    imp.add_argument(
        "--target-pp", type=int, default=1, help="PP the run will use: checked against the layer count (default 1)"
    )
    imp.add_argument(
        "--verify",
        action="store_true",
        help="run transformers and the converted Megatron model on fixed tokens; fail above --tolerance",
    )
    imp.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max abs logit difference for --verify (default 1e-4 in float32, 0.5 in bfloat16)",
    )
    imp.add_argument(
        "--verify-device",
        default="auto",
        help="where --verify runs both models, one after the other: auto (a GPU if visible), cpu, cuda[:N]",
    )
    imp.add_argument(
        "--verify-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="precision of --verify: float32 (4 bytes/param: 8B on one 80 GB GPU) or bfloat16 (2 bytes/param)",
    )
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    exp = sub.add_parser("export", help="Megatron checkpoint -> Hugging Face folder")
    exp.add_argument(
        "--ckpt",
        type=Path,
        required=True,
        help="a run's checkpoints/ folder, an import output, or one iter_*/release folder in them",
    )
    exp.add_argument("--out", type=Path, required=True, help="Hugging Face folder to create")
    exp.add_argument("--iteration", type=int, default=None, help="which iter_* to export (default: the latest saved)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    for s in (imp, exp):
        s.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from ellama_megatron.runtime.frozen_imports import import_frozen

    import_frozen("torch", "torch.distributed.checkpoint")  # a second sooner (runtime/frozen_imports.py)
    from ellama_megatron.convert.hf_checkpoint import ConversionError
    from ellama_megatron.convert.summary import summary_line

    try:
        if args.command == "import":
            from ellama_megatron.convert.importer import import_hf

            stats = import_hf(
                args.hf_dir,
                args.out,
                args.target_tp,
                args.target_pp,
                args.overwrite,
                args.verify,
                args.tolerance,
                args.quiet,
                args.verify_device,
                args.verify_dtype,
            )
            if "verify" in stats:
                v = stats["verify"]
                print(
                    f"verify: max abs logit diff {v['max_abs_logit_diff']:.3g} (tolerance {v['tolerance']:g}), "
                    f"top-1 agreement {v['top1_agreement']:.4f} over {v['tokens']} tokens, "
                    f"{v['dtype']} on {v['device']}"
                )
                if v.get("real_text"):
                    t = v["real_text"]
                    print(
                        f"verify: of which {t['tokens']} tokens of English prose (the folder's tokenizer): "
                        f"max abs logit diff {t['max_abs_logit_diff']:.3g}, top-1 agreement {t['top1_agreement']:.4f}"
                    )
        else:
            from ellama_megatron.convert.exporter import export_hf

            stats = export_hf(args.ckpt, args.out, args.iteration, args.overwrite, quiet=args.quiet)
    except (ConversionError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_line(args.command, stats, args.out))
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":  # torch's checkpoint code may start processes that import this file again: keep the guard
    sys.exit(run_tool(main))
