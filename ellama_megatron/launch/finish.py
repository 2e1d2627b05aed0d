"""What a launcher does once the run is finished: write its final model as a Hugging Face folder
(checkpoint.export_hf), once. Both launchers call it when a launch ends with the budget spent and
when they are started on a finished run, so an export that was cut short (the job killed during it)
is written by the next launch; staged_output makes the folder appear whole or not at all."""

from __future__ import annotations

from pathlib import Path

from ellama_megatron.run.progress import FINAL_HF_FOLDER, save_folder


def export_finished_run(cfg, log=print) -> Path | None:
    """``${run_dir}/hf`` from the run's last checkpoint, unless it is there already or export_hf is
    off; returns the folder written."""
    if not cfg.checkpoint.get("export_hf"):  # .get: a run folder written before the key existed
        return None
    run_dir = Path(cfg.run_dir)
    out = run_dir / FINAL_HF_FOLDER
    if out.is_dir():
        return None
    from ellama_megatron.convert.exporter import export_hf
    from ellama_megatron.convert.summary import summary_line

    log(f"checkpoint.export_hf: writing the final model to {out}")
    log(summary_line("export", export_hf(save_folder(run_dir), out), out))
    return out
