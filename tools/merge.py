"""Merge a base and an adapted Hugging Face model: linear interpolation (the e-Llama paper's method),
SLERP or task arithmetic, at one or several alphas in one pass over the inputs.

  python tools/merge.py --base BASE_DIR --adapted ADAPTED_DIR --alpha 0.5 --out merged/
  python tools/merge.py --base B --adapted A --alpha 0.25 --alpha 0.5 --alpha 0.75 --out sweep/
      (several alphas: one folder per alpha, sweep/alpha_0.25, ...)

linear:          w = (1 - alpha) * base + alpha * adapted      (alpha 0 = base, 1 = adapted, bit for bit)
slerp:           spherical interpolation per tensor at t = alpha; near-parallel tensors
                 (|cos| > 0.9995) or zero tensors fall back to linear
task_arithmetic: w = base + alpha * sum_i weight_i * (adapted_i - base)   (--adapted and --weight repeatable)

Inputs must have the same architecture (config.json), tensor names, shapes, dtypes and tokenizer
files; otherwise the merge is refused naming the first difference. The output has the base
folder's layout (same shards, index, config, generation config, tokenizer files). Memory stays
near a small multiple of one shard.
"""

from __future__ import annotations

import argparse
import sys

from ellama_megatron.merge.hf_folder import MergeInputError
from ellama_megatron.merge.megatron_checkpoint import refuse_megatron_checkpoint
from ellama_megatron.merge.merge_hf import DEFAULT_CHUNK_BYTES, merge_hf_folders
from ellama_megatron.merge.methods import METHODS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base model folder (Hugging Face, safetensors)")
    p.add_argument("--adapted", required=True, action="append", help="adapted model folder (repeat for task_arithmetic)")
    p.add_argument("--alpha", required=True, action="append", type=float, help="interpolation weight of the adapted model (repeatable)")
    p.add_argument("--out", required=True, help="output folder (with several alphas: parent of alpha_<a>/ folders)")
    p.add_argument("--method", default="linear", choices=METHODS, help="merge formula (default: linear)")
    p.add_argument("--weight", action="append", type=float, help="task_arithmetic: weight of each --adapted model, in order (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--chunk-mb", type=int, default=DEFAULT_CHUNK_BYTES // 2**20, help="rows merged at once, in MiB of float32 (default %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        for i, path in enumerate([args.base, *args.adapted]):
            refuse_megatron_checkpoint(path, "--base" if i == 0 else "--adapted", "merging")
        result = merge_hf_folders(
            args.base,
            args.adapted,
            args.alpha,
            args.out,
            method=args.method,
            weights=args.weight,
            overwrite=args.overwrite,
            chunk_bytes=args.chunk_mb * 2**20,
        )
    except (MergeInputError, ValueError) as e:
        print(f"merge.py: error: {e}", file=sys.stderr)
        return 2
    print(
        f"merged {result.tensors} tensors ({result.bytes_per_output / 2**20:.1f} MiB per model) with {args.method} "
        f"at alpha {', '.join(f'{a:g}' for a in args.alpha)} -> {', '.join(str(p) for p in result.outputs)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
