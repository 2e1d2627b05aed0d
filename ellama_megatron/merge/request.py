"""What both merges (Hugging Face folders, Megatron checkpoints) share before and after the work:
the options checked before any input is opened, where the outputs go, the comparisons that name
the first difference between two inputs, and what a merge reports."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ellama_megatron.formats.tokenizer_folder import tokenizer_files_in
from ellama_megatron.merge.methods import METHODS

# Rows of a tensor merged at once: bounds the working memory for big tensors (the 8B model's
# embedding is 1 GB in bf16) to about this many bytes per input in float32, times the few chunks
# in flight (formats.prefetch.ordered_map).
DEFAULT_CHUNK_BYTES = 16 * 2**20
# Tokenizer-config keys that record where a tokenizer was loaded from.
TOKENIZER_KEYS_IGNORED = {"name_or_path", "tokenizer_file"}


class MergeInputError(ValueError):
    """The inputs cannot be merged; the message names the first difference and the fix."""


@dataclasses.dataclass
class MergeResult:
    outputs: list[Path]
    tensors: int
    bytes_per_output: int
    notes: list[str] = dataclasses.field(default_factory=list)  # what the checks could not check


def check_merge_request(
    method: str, adapted: list, alphas: list[float], weights: list[float] | None, extrapolate: bool = False
) -> None:
    """The options, checked before the inputs are opened."""
    if method not in METHODS:
        raise MergeInputError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if not alphas:
        raise MergeInputError("no --alpha given")
    # A NaN or infinite weight makes every merged tensor NaN; nothing downstream would notice.
    for name, values in (("--alpha", alphas), ("--weight", weights or [])):
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise MergeInputError(f"{name} {bad[0]}: not a finite number; give a value such as 0.5")
    outside = [a for a in alphas if not 0.0 <= a <= 1.0]
    if outside and not extrapolate:
        raise MergeInputError(
            f"--alpha {outside[0]:g}: outside [0, 1], so the merge extrapolates beyond the "
            "two models; pass --extrapolate if that is meant (task arithmetic), else use 0..1"
        )
    if method in ("linear", "slerp") and len(adapted) != 1:
        raise MergeInputError(
            f"--method {method} merges one adapted model, got {len(adapted)}; use task_arithmetic for several"
        )
    if weights is not None and len(weights) != len(adapted):
        raise MergeInputError(
            f"--weight given {len(weights)} times for {len(adapted)} adapted models; give one per model"
        )
    if method == "slerp" and any(not 0.0 <= a <= 1.0 for a in alphas):
        raise MergeInputError(f"--alpha {alphas}: SLERP interpolates, alpha must be in [0, 1]")
    if len(set(alphas)) != len(alphas):
        raise MergeInputError(f"--alpha {alphas}: repeated value")


def adapted_roles(count: int) -> list[str]:
    """How messages name the adapted inputs: "adapted", or "adapted #i" when there are several."""
    return [f"adapted #{i + 1}" if count > 1 else "adapted" for i in range(count)]


def output_dirs(out: Path, alphas: list[float]) -> list[Path]:
    """One alpha: the model goes to ``out``; several: ``out/alpha_<a>`` each."""
    if len(alphas) == 1:
        return [out]
    return [out / f"alpha_{a:g}" for a in alphas]


def check_outputs(dests: list[Path], overwrite: bool, inputs: list[Path], what: str) -> None:
    """Before any work: an existing output needs --overwrite, and no output may be an input ``what``."""
    for d in dests:
        if d.exists() and not overwrite:
            raise MergeInputError(f"output {d} exists; choose another --out or pass --overwrite")
        for src in inputs:
            if d.resolve() == src.resolve():
                raise MergeInputError(f"output {d} is an input {what}; choose another --out")


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Path of the first place two JSON values differ (``added_tokens[3].content``), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{where}.{k}".lstrip(".") + (" (missing in base)" if k not in a else " (missing in adapted)")
            d = first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where.lstrip('.') or '<root>'} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{where.lstrip('.') or '<root>'} ({a!r} vs {b!r})"


def compare_tokenizer_dirs(
    base: Path, other: Path, role: str, base_label: str | None = None, other_label: str | None = None
) -> None:
    """Raise MergeInputError naming the first tokenizer difference (which files, then contents).
    The labels name the models in the message when the tokenizer folders are not the model folders."""
    bl, ol = base_label or str(base), other_label or str(other)
    bt, ot = tokenizer_files_in(base), tokenizer_files_in(other)
    if bt != ot:
        only_b = sorted(set(bt) - set(ot))
        only_o = sorted(set(ot) - set(bt))
        raise MergeInputError(
            f"tokenizer files differ: {only_b or 'none'} only in base {bl}, {only_o or 'none'} only in "
            f"{role} {ol}; copy the base model's tokenizer files into both folders"
        )
    for name in bt:
        pb, po = base / name, other / name
        if name.endswith(".json"):
            with open(pb) as f:
                jb = json.load(f)
            with open(po) as f:
                jo = json.load(f)
            if isinstance(jb, dict) and isinstance(jo, dict):
                jb = {k: v for k, v in jb.items() if k not in TOKENIZER_KEYS_IGNORED}
                jo = {k: v for k, v in jo.items() if k not in TOKENIZER_KEYS_IGNORED}
            diff = first_difference(jb, jo)
        else:
            diff = None if pb.read_bytes() == po.read_bytes() else "contents"
        if diff:
            raise MergeInputError(
                f"tokenizer differs: {name} in base {bl} and {role} {ol} differ at {diff}; "
                "models trained with different tokenizers cannot be merged"
            )
