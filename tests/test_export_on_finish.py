"""checkpoint.export_hf: a finished run writes its final model as a Hugging Face folder, once, with
the same weights and logits as tools/convert_hf.py export of its last checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_safetensors_folder, run_cpt


@pytest.mark.slow
def test_a_finished_run_exports_its_model_once(domain_data, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    proc, _ = run_cpt(run_dir, domain_data, "checkpoint.export_hf=true", "train.train_tokens=4096")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = run_dir / "hf"
    assert (final / "config.json").is_file() and "checkpoint.export_hf: writing the final model" in proc.stdout
    by_hand = tmp_path / "by_hand"
    tool = subprocess.run(
        [
            sys.executable,
            "tools/convert_hf.py",
            "export",
            "--ckpt",
            str(run_dir / "checkpoints"),
            "--out",
            str(by_hand),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert tool.returncode == 0, tool.stderr[-3000:]
    ours, theirs = load_safetensors_folder(final), load_safetensors_folder(by_hand)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    tokens = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(p)(tokens).logits for p in (final, by_hand)]
    assert torch.equal(*logits)
    # Once: a relaunch of the finished run leaves it alone; with it gone, a relaunch writes it.
    stamp = (final / "config.json").stat().st_mtime_ns
    again, _ = run_cpt(run_dir, domain_data, "checkpoint.export_hf=true", "train.train_tokens=4096")
    assert again.returncode == 0 and "run already finished" in again.stdout
    assert (final / "config.json").stat().st_mtime_ns == stamp
    import shutil

    shutil.rmtree(final)
    third, _ = run_cpt(run_dir, domain_data, "checkpoint.export_hf=true", "train.train_tokens=4096")
    assert third.returncode == 0 and (final / "config.json").is_file(), third.stderr[-3000:]
