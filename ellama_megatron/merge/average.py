"""Checkpoint averaging (LAWA-style): the weighted mean of several Megatron checkpoints of a run,
usually its last few saves, streamed tensor by tensor like the Megatron merge.

  mean = sum_i weight_i * checkpoint_i / sum_i weight_i        (weights default to 1: the plain mean)

Arithmetic: each model tensor (one layer's slice of a stacked key) is read from one input after the
other and added, scaled by its weight, into a float32 running sum (float64 for float64 tensors),
which is divided by the total weight and rounded once to the checkpoints' dtype. So a bf16 run's
average is rounded once, not after every addition; the result is bit for bit the expression
``(w_0 * x_0.float() + w_1 * x_1.float() + ...) / sum(w)`` cast back. Only model weights are read:
optimizer state, the fp32 master copy of a bf16 run included, is left alone.

Memory, per tensor being averaged (the writer's worker threads average a few at once): the running
sum (4 bytes per element) plus one input's tensor, whatever the number of inputs.

Output: a weights-only Megatron checkpoint in the merge's layout (starts runs with
checkpoint.init_from, exports, evaluates), or a Hugging Face folder written as the export writes one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ellama_megatron.formats.hf_folder import is_hf_folder
from ellama_megatron.formats.megatron_checkpoint import (
    RELEASE_DIR,
    TRACKER_FILE,
    complete_iterations,
    is_checkpoint_folder,
    is_megatron_checkpoint,
    iteration_folder,
)
from ellama_megatron.merge.megatron_inputs import MegatronCheckpoint, check_megatron_mergeable
from ellama_megatron.merge.methods import WeightedAccumulator
from ellama_megatron.merge.request import MergeInputError, MergeResult, check_outputs

OUTPUT_FORMATS = ("megatron", "hf")


@dataclass(frozen=True)
class AverageRequest:
    """The checkpoints to average (torch_dist folders, oldest first as given) and their weights."""

    checkpoints: list[Path]
    weights: list[float]
    notes: list[str]


def _iter_number(folder: Path) -> int | None:
    name = folder.name
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None


def select_checkpoints(paths: list[str | Path], last: int | None, weights: list[float] | None) -> AverageRequest:
    """The checkpoints ``--average PATHS [--last N] [--weight W ...]`` names, checked before any
    tensor is read.

    ``--last N``: one save folder (a run's ``checkpoints/``, or the run folder holding it); its N
    newest complete ``iter_*`` checkpoints. A folder whose save was cut short or is still being
    written (no torch_dist ``.metadata``) is skipped, with a note.
    Without ``--last``: each path is one checkpoint (an ``iter_*`` or ``release`` folder, or a save
    folder, meaning the checkpoint its tracker names); a named ``iter_*`` that is incomplete is refused.
    """
    paths = [Path(p) for p in paths]
    for p in paths:
        if is_hf_folder(p) and not is_megatron_checkpoint(p):
            raise MergeInputError(
                f"--average {p}: a Hugging Face folder; averaging reads Megatron checkpoints "
                "(convert it with tools/convert_hf.py import)"
            )
    notes: list[str] = []
    if last is not None:
        if last < 2:
            raise MergeInputError(f"--last {last}: an average needs at least 2 checkpoints")
        if len(paths) != 1:
            raise MergeInputError(
                f"--last {last} with {len(paths)} --average paths: give one save folder (RUN_DIR/checkpoints) "
                "with --last, or name the checkpoints without it"
            )
        save_dir = _save_folder(paths[0])
        complete = complete_iterations(save_dir)
        incomplete = sorted(
            f.name for f in save_dir.glob("iter_*") if _iter_number(f) is not None and _iter_number(f) not in complete
        )
        if len(complete) < last:
            raise MergeInputError(
                f"{save_dir}: {len(complete)} complete checkpoint(s) "
                f"({', '.join(iteration_folder(save_dir, i).name for i in complete) or 'none'}), --last {last} "
                f"asks for {last}{f'; incomplete: {incomplete}' if incomplete else ''}; lower --last or let the run "
                "save more"
            )
        if incomplete:
            notes.append(f"{save_dir}: skipped incomplete {', '.join(incomplete)} (a save cut short or in flight)")
        checkpoints = [iteration_folder(save_dir, i) for i in complete[-last:]]
    else:
        if len(paths) < 2:
            raise MergeInputError(
                f"--average {paths[0] if paths else ''}: one checkpoint; name at least 2, or give a save folder "
                "with --last N"
            )
        checkpoints = [_one_checkpoint(p) for p in paths]
    seen: dict[Path, Path] = {}
    for given, ckpt in zip(paths if last is None else checkpoints, checkpoints):
        key = ckpt.resolve()
        if key in seen:
            raise MergeInputError(
                f"--average {given}: the same checkpoint as {seen[key]} ({ckpt}); name each checkpoint once "
                "and give it a larger --weight instead"
            )
        seen[key] = given
    if weights is None:
        weights = [1.0] * len(checkpoints)
    elif len(weights) != len(checkpoints):
        raise MergeInputError(
            f"--weight given {len(weights)} times for {len(checkpoints)} checkpoints "
            f"({', '.join(c.name for c in checkpoints)}); give one per checkpoint, oldest first"
        )
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise MergeInputError(f"--weight {bad[0]}: an average takes finite weights >= 0")
    if sum(weights) <= 0:
        raise MergeInputError(f"--weight {weights}: all zero; give at least one positive weight")
    return AverageRequest(checkpoints, [float(w) for w in weights], notes)


def _save_folder(path: Path) -> Path:
    """``path`` if it holds iter_* checkpoints, else its ``checkpoints/`` (a run folder)."""
    from ellama_megatron.run.progress import save_folder

    if not path.is_dir():
        raise MergeInputError(f"--average {path}: not a directory; give the run's checkpoints/ folder")
    if not any(path.glob("iter_*")) and any(save_folder(path).glob("iter_*")):
        return save_folder(path)
    if not any(path.glob("iter_*")):
        raise MergeInputError(
            f"--average {path}: no iter_* checkpoints in it; with --last give a run's save folder (RUN_DIR/checkpoints)"
        )
    return path


def _one_checkpoint(path: Path) -> Path:
    """The torch_dist folder a named checkpoint means; an incomplete iter_* is refused."""
    if not path.is_dir():
        raise MergeInputError(f"--average {path}: does not exist or is not a directory")
    if is_checkpoint_folder(path):
        return path
    if _iter_number(path) is not None or path.name == RELEASE_DIR:
        raise MergeInputError(
            f"--average {path}: incomplete checkpoint (no torch_dist .metadata: a save cut short or still being "
            "written); name a complete one"
        )
    if (path / TRACKER_FILE).is_file() or any(path.glob("iter_*")):
        from ellama_megatron.formats.megatron_checkpoint import find_checkpoint

        try:
            return find_checkpoint(path)
        except (FileNotFoundError, ValueError) as e:
            raise MergeInputError(f"--average {path}: {e}") from None
    raise MergeInputError(
        f"--average {path}: not a Megatron checkpoint (no torch_dist .metadata, iter_* or {TRACKER_FILE}); "
        "name iter_* folders of a run, or use --last N with its checkpoints/ folder"
    )


def average_checkpoints(
    request: AverageRequest,
    out: str | Path,
    output_format: str = "megatron",
    overwrite: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Write the weighted mean of ``request.checkpoints`` to ``out``. All checks run before any writing."""
    from ellama_megatron.llama import weights as W

    if output_format not in OUTPUT_FORMATS:
        raise MergeInputError(f"--format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    inputs = [MegatronCheckpoint.open(p, f"checkpoint #{i + 1}") for i, p in enumerate(request.checkpoints)]
    first = inputs[0]
    notes = list(request.notes)
    for other in inputs[1:]:
        notes += check_megatron_mergeable(first, other, other.role)
    notes = list(dict.fromkeys(notes))  # a missing tokenizer is noted once per pair
    out = Path(out)
    check_outputs([out], overwrite, [p for c in inputs for p in (c.root, c.folder)], "checkpoint")

    cfg = first.config
    total = sum(request.weights)
    meta = {m.megatron: first.reader.tensor_metadata(m.megatron) for m in W.mappings(cfg)}
    nbytes = sum(math.prod(md.size) * md.properties.dtype.itemsize for md in meta.values())
    vocab_rows = {m.megatron for m in W.mappings(cfg) if isinstance(m, W.VocabMapping)}

    def averaged(key: str, layer: int | None) -> torch.Tensor:
        acc = WeightedAccumulator()
        shapes = set()
        for c, w in zip(inputs, request.weights):
            t = c.reader.read(key, layer)
            shapes.add(tuple(t.shape))
            if key in vocab_rows and tuple(t.shape) != tuple(meta[key].size):
                t = _padded_like(t, tuple(meta[key].size), cfg.vocab_size)
            acc.add(t, w)
            del t
        mean = acc.result(total)
        if len(shapes) > 1:  # padding rows of different paddings are no weights: zero, as an import writes them
            mean[cfg.vocab_size :] = 0
        return mean

    record = {
        "model": cfg.to_dict(),
        "average": {
            "checkpoints": [str(c.folder) for c in inputs],
            "weights": request.weights,
        },
    }
    if output_format == "hf":
        from ellama_megatron.convert.exporter import write_hf_folder

        write_hf_folder(
            cfg,
            first.root,
            first.record,
            first.reader.tensor_metadata,
            averaged,
            first.folder,
            out,
            quiet=not progress,
            what=f"average of {len(inputs)}",
        )
    else:
        _write_megatron(out, cfg, meta, averaged, record, first, inputs, nbytes, progress)
    return MergeResult([out], len(meta), nbytes, notes)


def _padded_like(t: torch.Tensor, shape: tuple[int, ...], vocab_size: int) -> torch.Tensor:
    """A vocab-row tensor brought to the first input's padded row count (its real rows kept)."""
    out = torch.zeros(shape, dtype=t.dtype)
    out[:vocab_size] = t[:vocab_size]
    return out


def _write_megatron(
    out: Path,
    cfg,
    meta: dict,
    averaged: Callable[[str, int | None], torch.Tensor],
    record: dict,
    first: MegatronCheckpoint,
    inputs: list[MegatronCheckpoint],
    nbytes: int,
    progress: bool,
) -> None:
    from ellama_megatron.convert.summary import Summary
    from ellama_megatron.formats.atomic import staged_output
    from ellama_megatron.formats.torch_dist import TensorChunk, extra_state_objects, write_release
    from ellama_megatron.llama import weights as W

    tokenizer_dir = next((c.tokenizer_dir for c in inputs if c.tokenizer_dir), None)
    chunks = []
    for m in W.mappings(cfg):
        md = meta[m.megatron]
        for layer in W.layers_of(m, cfg):
            chunks.append(
                TensorChunk.of(
                    m.megatron, md.size, md.properties.dtype, layer, lambda k=m.megatron, la=layer: averaged(k, la)
                )
            )
    with staged_output(out) as tmp:
        summary = Summary(f"average of {len(inputs)}", nbytes, quiet=not progress)
        write_release(
            tmp,
            chunks,
            extra_state_objects(W.EXTRA_STATE_MODULES, cfg.num_layers),
            record,
            hf_files_from=tokenizer_dir,
            hf_extra=("config.json",),  # an import's source config: the export keeps its keys
            on_written=summary.add,
        )
        summary.close()
