"""Merge a base and an adapted model (Hugging Face folders, or Megatron checkpoints): linear
interpolation (the e-Llama paper's method), SLERP or task arithmetic, at one or several alphas in
one pass over the inputs.

  python tools/merge.py --base BASE_DIR --adapted ADAPTED_DIR --alpha 0.5 --out merged/
  python tools/merge.py --base B --adapted A --alpha 0.25 --alpha 0.5 --alpha 0.75 --out merged/
      (several alphas: one folder per alpha, merged/alpha_0.25, ...)

linear:          w = (1 - alpha) * base + alpha * adapted      (alpha 0 = base, 1 = adapted, bit for bit)
slerp:           spherical interpolation per tensor at t = alpha; near-parallel tensors
                 (|cos| > 0.9995) or zero tensors fall back to linear
task_arithmetic: w = base + alpha * sum_i weight_i * (adapted_i - base)   (--adapted and --weight repeatable)

Inputs must have the same architecture (config.json), tensor names, shapes, dtypes and tokenizer
files; otherwise the merge is refused naming the first difference. The output has the base
folder's layout (same shards, index, config, generation config, tokenizer files). Memory stays
near a small multiple of one shard.

Megatron checkpoints (a run's checkpoints/ folder: its latest iteration; one iter_* folder in it;
or a tools/convert_hf.py import output) are merged tensor by tensor without exporting: the output
is a weights-only torch_dist checkpoint in the import's layout, to start a run from
(checkpoint.init_from=OUT) or to export (tools/convert_hf.py export --ckpt OUT). Same formulas and
checks (model config in the checkpoint record, tensors, dtypes, tokenizer); every alpha is one pass
over the inputs. Both inputs must be of the same kind.
"""

from __future__ import annotations

import argparse
import sys

from ellama_megatron.cli import run_tool
from ellama_megatron.formats.megatron_checkpoint import folder_kind
from ellama_megatron.merge.merge_hf import merge_hf_folders
from ellama_megatron.merge.methods import METHODS
from ellama_megatron.merge.request import DEFAULT_CHUNK_BYTES, MergeInputError, check_merge_request

KIND_NAMES = {"hf": "Hugging Face folder", "megatron": "Megatron checkpoint"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base model: Hugging Face folder (safetensors) or Megatron checkpoint")
    p.add_argument(
        "--adapted",
        required=True,
        action="append",
        help="adapted model, same kind as --base (repeat for task_arithmetic)",
    )
    p.add_argument(
        "--alpha",
        required=True,
        action="append",
        type=float,
        help="interpolation weight of the adapted model (repeatable)",
    )
    p.add_argument("--out", required=True, help="output folder (with several alphas: parent of alpha_<a>/ folders)")
    p.add_argument("--method", default="linear", choices=METHODS, help="merge formula (default: linear)")
    p.add_argument(
        "--weight",
        action="append",
        type=float,
        help="task_arithmetic: weight of each --adapted model, in order (default 1)",
    )
    p.add_argument(
        "--extrapolate",
        action="store_true",
        help="allow --alpha outside [0, 1] (task arithmetic scaling beyond the adapted model)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument(
        "--chunk-mb",
        type=int,
        default=DEFAULT_CHUNK_BYTES // 2**20,
        help="rows merged at once, in MiB of float32 (default %(default)s)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_merge_request(
            args.method, args.adapted, args.alpha, args.weight, args.extrapolate
        )  # before any input is read
        kinds = [folder_kind(p, "--base" if i == 0 else "--adapted") for i, p in enumerate([args.base, *args.adapted])]
        if len(set(kinds)) > 1:
            raise MergeInputError(
                f"--base {args.base} is a {KIND_NAMES[kinds[0]]} but --adapted "
                f"{next(p for p, k in zip(args.adapted, kinds[1:]) if k != kinds[0])} is a "
                f"{KIND_NAMES[next(k for k in kinds if k != kinds[0])]}; convert one with tools/convert_hf.py "
                "(import or export) so that both are of the same kind"
            )
        if kinds[0] == "megatron":
            from ellama_megatron.merge.merge_megatron import merge_megatron_checkpoints as merge
        else:
            merge = merge_hf_folders
        result = merge(
            args.base,
            args.adapted,
            args.alpha,
            args.out,
            method=args.method,
            weights=args.weight,
            overwrite=args.overwrite,
            chunk_bytes=args.chunk_mb * 2**20,
            extrapolate=args.extrapolate,
        )
    except (MergeInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"merge.py: note: {note}", file=sys.stderr)
    print(
        f"merged {KIND_NAMES[kinds[0]]}s: {result.tensors} tensors "
        f"({result.bytes_per_output / 2**20:.1f} MiB per model) with {args.method} "
        f"at alpha {', '.join(f'{a:g}' for a in args.alpha)} -> {', '.join(str(p) for p in result.outputs)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
