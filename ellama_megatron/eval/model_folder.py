"""The model to evaluate as a Hugging Face folder: a Hugging Face folder as it is, a Megatron
checkpoint exported (ellama_megatron.convert.exporter) into a temporary folder that is deleted
afterwards. The export is bit-exact, so the perplexity is the checkpoint's own."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from ellama_megatron.formats.megatron_checkpoint import folder_kind


@contextlib.contextmanager
def hf_folder_of(
    path: str | Path,
    role: str = "--model",
    work_dir: str | Path | None = None,
    iteration: int | None = None,
    tokenizer: str | Path | None = None,
    progress: bool = True,
):
    """Yields a Hugging Face folder for ``path``; an unknown folder kind is refused before any work.
    ``work_dir`` holds the temporary export (the system temp folder by default; it needs the
    model's size in free space)."""
    kind = folder_kind(path, role)
    if kind == "hf":
        if iteration is not None:
            raise ValueError(
                f"--iteration {iteration}: {role} {path} is a Hugging Face folder, which has no iterations"
            )
        yield Path(path)
        return
    from ellama_megatron.convert.exporter import export_hf

    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ellama_eval_export_", dir=work_dir) as tmp:
        out = Path(tmp) / "hf"
        stats = export_hf(Path(path), out, iteration, quiet=not progress)
        if stats["tokenizer"] != "carried" and tokenizer is None:
            raise ValueError(
                f"{role} {path}: no tokenizer found beside the checkpoint (hf/, the run's checkpoint.init_from/hf "
                "or data.tokenizer_dir); pass --tokenizer DIR (a folder with tokenizer.json)"
            )
        yield out
