"""Megatron checkpoint folders: found, recognised, and the record (model config and provenance)
kept beside them. The tensors inside are read and written by torch_dist.py.

A Megatron save folder holds ``latest_checkpointed_iteration.txt`` (which checkpoint to load) and one
folder per checkpoint (``iter_0000100``, or ``release`` for weights without training state), each a
torch_dist checkpoint. Beside them, ``checkpoint_record.yaml`` says what they are: a ``model``
section (the Llama config) and how they were made (a run's whole config, or the import's / merge's
options). Export, merge and evaluation need nothing else to read them. This module imports no torch:
the launcher writes a run's record without paying for it.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ellama_megatron.formats.atomic import write_text_atomic
from ellama_megatron.formats.hf_folder import is_hf_folder
from ellama_megatron.formats.tokenizer_folder import has_tokenizer

TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron's pointer to the checkpoint to load
RELEASE_DIR = "release"  # Megatron loads it with iteration 0, no optimizer
RECORD_FILE = "checkpoint_record.yaml"
# What the record was called before it had a name of its own (it shared it with the run config):
# folders written then are still read.
OLD_RECORD_FILE = "ellama_config.yaml"
HF_FILES_DIR = "hf"  # beside an import's or merge's checkpoint: the tokenizer and generation files


class CheckpointFormatError(ValueError):
    """A folder is not the Megatron checkpoint it should be; the message names the file and the fix."""


def megatron_layout(root: Path) -> Path:
    """Mark ``root`` as a Megatron checkpoint folder whose only checkpoint is ``release/``."""
    (root / TRACKER_FILE).write_text(RELEASE_DIR)
    return root / RELEASE_DIR


def is_checkpoint_folder(path: Path) -> bool:
    """One torch_dist checkpoint (an ``iter_*`` or ``release`` folder), not a save folder."""
    return (path / ".metadata").exists() and ((path / "metadata.json").exists() or (path / "common.pt").exists())


def iteration_folder(save_dir: Path, iteration: int) -> Path:
    """Where Megatron saves iteration ``iteration`` in a save folder (``iter_0000100``)."""
    return save_dir / f"iter_{iteration:07d}"


def complete_iterations(save_dir: Path) -> list[int]:
    """The iterations of the save folder's complete checkpoints (torch_dist's metadata written,
    which it does last), oldest first."""
    found = []
    for folder in Path(save_dir).glob("iter_*"):
        match = re.fullmatch(r"iter_(\d+)", folder.name)
        if match and is_checkpoint_folder(folder):
            found.append(int(match.group(1)))
    return sorted(found)


def retained_iterations(
    complete: list[int], keep_last: int | None, keep_every: int | None, keep_from: int | None = None
) -> set[int]:
    """Which of a save folder's complete checkpoints (iterations) a retention policy keeps: the
    newest ``keep_last`` (all when None), every iteration divisible by ``keep_every``, and every
    one at or after ``keep_from`` (what a rollback may still need)."""
    if keep_last is None:
        return set(complete)
    kept = set(sorted(complete)[-keep_last:])
    kept |= {i for i in complete if keep_every and i % keep_every == 0}
    kept |= {i for i in complete if keep_from is not None and i >= keep_from}
    return kept


def _delete_checkpoint(save_dir: Path, iteration: int) -> None:
    """Renamed first (atomic), then removed: a kill mid-delete leaves no iter_* folder that looks
    complete, only a hidden leftover a later delete of the same iteration clears."""
    folder = iteration_folder(save_dir, iteration)
    doomed = folder.with_name(f".deleting-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def prune_checkpoints(
    save_dir: Path, keep_last: int | None, keep_every: int | None, keep_from: int | None = None
) -> list[int]:
    """Delete the complete checkpoints ``retained_iterations`` does not keep, never the one the
    tracker names (an async save may be complete before the tracker moves to it); incomplete
    folders (a save in flight, or one a kill cut short) are left alone. Returns the deleted ones."""
    save_dir = Path(save_dir)
    complete = complete_iterations(save_dir)
    kept = retained_iterations(complete, keep_last, keep_every, keep_from) | {saved_iteration(save_dir)}
    doomed = [i for i in complete if i not in kept]
    for iteration in doomed:
        _delete_checkpoint(save_dir, iteration)
    return doomed


def roll_back_to(save_dir: Path, iteration: int) -> list[int]:
    """Make the complete checkpoint ``iteration`` the one the next launch resumes from: the
    tracker names it, and every checkpoint after it (a branch of the run being abandoned, and
    which a later save of the same iteration would overwrite only in part) is deleted. Returns
    the deleted iterations."""
    save_dir = Path(save_dir)
    if not is_checkpoint_folder(iteration_folder(save_dir, iteration)):
        raise CheckpointFormatError(
            f"{iteration_folder(save_dir, iteration)}: not a complete checkpoint to roll back to"
        )
    write_text_atomic(save_dir / TRACKER_FILE, str(iteration))  # first: a kill after it resumes from there
    newer = sorted(
        int(f.name[5:]) for f in save_dir.glob("iter_*") if f.name[5:].isdigit() and int(f.name[5:]) > iteration
    )
    for later in newer:
        _delete_checkpoint(save_dir, later)
    return newer


def is_megatron_checkpoint(path: str | Path) -> bool:
    """A Megatron save folder (``latest_checkpointed_iteration.txt`` / ``iter_*``) or one checkpoint in it."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / TRACKER_FILE).exists() or any(p.glob("iter_[0-9]*")) or is_checkpoint_folder(p)


def folder_kind(path: str | Path, role: str) -> str:
    """'hf' or 'megatron' for a model given on a command line as ``role``; anything else is
    refused here, before any work."""
    p = Path(path)
    if not p.exists():
        raise CheckpointFormatError(f"{role} {p}: does not exist")
    if is_megatron_checkpoint(p):
        return "megatron"
    if is_hf_folder(p):
        return "hf"
    raise CheckpointFormatError(
        f"{role} {p}: neither a Hugging Face model folder (no config.json) nor a Megatron checkpoint "
        "(no latest_checkpointed_iteration.txt, iter_* or torch_dist .metadata); give a save_pretrained "
        "folder, a run's checkpoints/ folder, a tools/convert_hf.py import output or one iter_* folder in them"
    )


def record_path(root: Path) -> Path:
    """The record in ``root``: its current name, or the old one in folders written before."""
    path = root / RECORD_FILE
    old = root / OLD_RECORD_FILE
    return old if not path.exists() and old.exists() else path


def checkpoint_root(ckpt: Path) -> Path:
    """The folder holding the record: ``ckpt`` or, for an iter_*/release folder, its parent."""
    if record_path(ckpt).exists() or not record_path(ckpt.parent).exists():
        return ckpt
    return ckpt.parent


def read_record(root: Path) -> dict:
    path = record_path(root)
    if not path.exists():
        raise CheckpointFormatError(
            f"{path}: missing (nor the older {OLD_RECORD_FILE}); the checkpoint folder must hold the record "
            "that recipes/cpt.py, tools/convert_hf.py import or tools/merge.py writes"
        )
    record = yaml.safe_load(path.read_text())
    if not isinstance(record, dict) or "model" not in record:
        raise CheckpointFormatError(f"{path}: has no 'model' section")
    return record


def write_record(root: Path, record: dict) -> Path:
    """``record`` (a ``model`` section and how the checkpoints were made) as ``root``'s record."""
    return write_text_atomic(root / RECORD_FILE, yaml.safe_dump(record, sort_keys=False))


def saved_iteration(save_dir: Path) -> int:
    """The iteration of the last complete checkpoint in a save folder, as Megatron's tracker names
    it; 0 without a tracker, for weights without training state (release) or a tracker cut short."""
    tracker = save_dir / TRACKER_FILE
    text = tracker.read_text().strip() if tracker.is_file() else ""
    return int(text) if text.isdigit() else 0


def find_checkpoint(root: Path, iteration: int | None = None) -> Path:
    """The torch_dist folder in a Megatron checkpoint folder: ``--iteration`` or the tracker's one;
    ``root`` may also be that folder itself."""
    if is_checkpoint_folder(root) and iteration is None:
        return root
    if iteration is not None:
        folder = iteration_folder(root, iteration)
        if not folder.is_dir():
            found = sorted(p.name for p in root.glob("iter_*")) + (
                [RELEASE_DIR] if (root / RELEASE_DIR).is_dir() else []
            )
            raise FileNotFoundError(f"{folder}: no checkpoint for --iteration {iteration}; found {found}")
        return folder
    tracker = root / TRACKER_FILE
    if not tracker.exists():
        raise FileNotFoundError(
            f"{tracker}: missing; --ckpt must be a Megatron checkpoint folder "
            "(the run's checkpoints/ or a tools/convert_hf.py import output)"
        )
    text = tracker.read_text().strip()
    if text != RELEASE_DIR and not text.isdigit():
        # Megatron truncates the tracker before writing it: a kill then leaves it empty.
        raise CheckpointFormatError(
            f"{tracker}: {'is empty' if not text else f'holds {text!r}, not an iteration'}; pass --iteration N "
            f"for one of {sorted(p.name for p in root.glob('iter_*'))}, or relaunch the run, which repairs it"
        )
    folder = root / RELEASE_DIR if text == RELEASE_DIR else iteration_folder(root, int(text))
    if not folder.is_dir():
        raise FileNotFoundError(f"{tracker} points to {folder.name}, which does not exist")
    return folder


@dataclass(frozen=True)
class LocatedCheckpoint:
    root: Path  # the folder holding the record
    folder: Path  # the torch_dist folder to read (release/ or iter_*)
    record: dict


def locate(path: Path, iteration: int | None = None) -> LocatedCheckpoint:
    """A save folder (or one checkpoint in it) -> its record and the checkpoint to read.
    Raises CheckpointFormatError without a record, FileNotFoundError without that checkpoint."""
    path = Path(path)
    root = checkpoint_root(path)
    record = read_record(root)  # first: a folder without one is no checkpoint of ours at all
    return LocatedCheckpoint(root, find_checkpoint(path, iteration), record)


def tokenizer_source(root: Path, record: dict) -> Path | None:
    """Where the checkpoint's tokenizer files are: the import's or merge's hf/ folder, the run's
    init_from import, or data.tokenizer_dir of the run."""
    candidates = [root / HF_FILES_DIR]
    init_from = (record.get("checkpoint") or {}).get("init_from")
    if init_from:
        candidates.append(Path(init_from) / HF_FILES_DIR)
    tok_dir = (record.get("data") or {}).get("tokenizer_dir")
    if tok_dir:
        candidates.append(Path(tok_dir))
    return next((c for c in candidates if has_tokenizer(c)), None)
