"""Merge a base and an adapted model (Hugging Face folders, or Megatron checkpoints): linear
interpolation (the e-Llama paper's method), SLERP or task arithmetic, at one or several alphas in one
pass over the inputs; or average several checkpoints of a run (--average).

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

Checkpoint averaging (LAWA-style): the mean of a run's last N checkpoints, or of named ones, or
their weighted mean (weights are relative: divided by their sum), streamed tensor by tensor;
written as a weights-only Megatron checkpoint (--format megatron, the default) or a Hugging Face
folder (--format hf). Only model weights are averaged, in float32, rounded once to their dtype.

  python tools/merge.py --average RUN_DIR/checkpoints --last 3 --out ckpt/avg_last3
  python tools/merge.py --average RUN/checkpoints/iter_0000800 RUN/checkpoints/iter_0001000 \
      --weight 1 --weight 3 --format hf --out hf/avg
"""

from __future__ import annotations

import argparse
import sys

from ellama_megatron.runtime.frozen_imports import import_frozen

import_frozen("torch")  # before the imports below need it: a second sooner (runtime/frozen_imports.py)

from ellama_megatron.cli import run_tool  # noqa: E402
from ellama_megatron.formats.megatron_checkpoint import folder_kind  # noqa: E402
from ellama_megatron.merge.merge_hf import merge_hf_folders  # noqa: E402
from ellama_megatron.merge.methods import METHODS  # noqa: E402
from ellama_megatron.merge.request import DEFAULT_CHUNK_BYTES, MergeInputError, check_merge_request  # noqa: E402

KIND_NAMES = {"hf": "Hugging Face folder", "megatron": "Megatron checkpoint"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="base model: Hugging Face folder (safetensors) or Megatron checkpoint")
    p.add_argument(
        "--adapted",
        action="append",
        help="adapted model, same kind as --base (repeat for task_arithmetic)",
    )
    p.add_argument(
        "--alpha",
        action="append",
        type=float,
        help="interpolation weight of the adapted model (repeatable)",
    )
    p.add_argument("--out", required=True, help="output folder (with several alphas: parent of alpha_<a>/ folders)")
    avg = p.add_argument_group("checkpoint averaging (instead of --base/--adapted/--alpha)")
    avg.add_argument(
        "--average",
        nargs="+",
        metavar="CKPT",
        help="average these Megatron checkpoints (iter_* folders), or with --last the newest of one save folder",
    )
    avg.add_argument("--last", type=int, help="average the N newest complete checkpoints of the --average save folder")
    avg.add_argument(
        "--format",
        default="megatron",
        choices=["megatron", "hf"],
        help="average written as a Megatron checkpoint or a Hugging Face folder (default %(default)s)",
    )
    p.add_argument("--method", default="linear", choices=METHODS, help="merge formula (default: linear)")
    p.add_argument(
        "--weight",
        action="append",
        type=float,
        help="task_arithmetic: weight of each --adapted model; --average: of each checkpoint, oldest first (default 1)",
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
    if args.average is not None:
        return average(args)
    missing = [f"--{n}" for n in ("base", "adapted", "alpha") if getattr(args, n) is None]
    if missing:
        print(
            f"error: {', '.join(missing)} missing; a merge needs --base, --adapted and --alpha (or use --average)",
            file=sys.stderr,
        )
        return 2
    if args.last is not None:
        print("error: --last: only with --average RUN_DIR/checkpoints", file=sys.stderr)
        return 2
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
        f"merged {KIND_NAMES[kinds[0]]}s: {result.tensors} tensors ({result.bytes_per_output / 2**20:.1f} MiB per "
        f"model) with {args.method} "
        f"at alpha {', '.join(f'{a:g}' for a in args.alpha)} -> {', '.join(str(p) for p in result.outputs)}"
    )
    return 0


def average(args) -> int:
    from ellama_megatron.merge.average import average_checkpoints, select_checkpoints

    given = [f"--{n}" for n in ("base", "adapted", "alpha") if getattr(args, n) is not None]
    try:
        if given:
            raise MergeInputError(f"--average with {', '.join(given)}: averaging takes no base, adapted or alpha")
        request = select_checkpoints(args.average, args.last, args.weight)
        result = average_checkpoints(request, args.out, args.format, args.overwrite)
    except (MergeInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"merge.py: note: {note}", file=sys.stderr)
    weights = "" if len(set(request.weights)) == 1 else f" with weights {', '.join(f'{w:g}' for w in request.weights)}"
    print(
        f"averaged {len(request.checkpoints)} checkpoints ({', '.join(c.name for c in request.checkpoints)}){weights}: "
        f"{result.tensors} tensors ({result.bytes_per_output / 2**20:.1f} MiB) -> {args.out} ({args.format})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
