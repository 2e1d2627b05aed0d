"""The merge curve (table + PNG) and the training-curve plot."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from ellama_megatron.eval.heldout_data import parse_domain_spec
from ellama_megatron.eval.merge_curve import run_merge_curve
from ellama_megatron.eval.perplexity import evaluate_model_dir
from ellama_megatron.eval.training_curves import plot_training_curves, read_curves
from ellama_megatron.llama.config import load_model_config
from ellama_megatron.testing.tiny_llama import sample_texts, write_random_hf_llama


@pytest.mark.slow
def test_merge_curve_writes_table_json_and_png(tmp_path, tiny_tokenizer):
    cfg = load_model_config("tiny")
    base = write_random_hf_llama(tmp_path / "base", cfg, seed=0, tokenizer_dir=tiny_tokenizer, max_shard_size="200KB")
    adapted = write_random_hf_llama(
        tmp_path / "adapted", cfg, seed=1, tokenizer_dir=tiny_tokenizer, max_shard_size="200KB"
    )
    specs = []
    for name, seed in [("general", 1), ("ecommerce", 2)]:
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(6, seed)))
        specs.append(parse_domain_spec(f"{name}={p}"))
    out = tmp_path / "report"
    report = run_merge_curve(
        base, adapted, [0.5], specs, out, seq_length=32, batch_size=4, device="cpu", progress=False
    )
    assert [p["alpha"] for p in report["points"]] == [0.0, 0.5, 1.0]
    assert [p["label"] for p in report["points"]] == ["base", "merged", "adapted"]
    assert not (out / "merged").exists()  # merged models removed after evaluation
    # End points are the input models themselves.
    direct = evaluate_model_dir(base, specs, seq_length=32, batch_size=4, device="cpu", progress=False)
    assert report["points"][0]["domains"]["general"]["perplexity"] == pytest.approx(
        direct["domains"]["general"]["perplexity"], rel=1e-6
    )
    saved = json.loads((out / "curve.json").read_text())
    assert (
        saved["points"][1]["domains"]["ecommerce"]["perplexity"]
        == report["points"][1]["domains"]["ecommerce"]["perplexity"]
    )
    table = (out / "curve.md").read_text().splitlines()
    assert table[0] == "| alpha | model | general ppl | ecommerce ppl |" and len(table) == 5
    assert table[3].startswith("| 0.5 | merged | ")
    img = np.asarray(Image.open(out / "curve.png"))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0


@pytest.mark.slow
def test_merge_curve_of_megatron_checkpoints_equals_the_curve_of_their_hf_folders(tmp_path, tiny_tokenizer):
    """--base/--adapted as Megatron checkpoints (mixed with a HF folder too): exported once each,
    the same numbers as the curve of the Hugging Face folders they came from."""
    from ellama_megatron.convert.importer import import_hf

    cfg = load_model_config("tiny")
    hf = {
        n: write_random_hf_llama(tmp_path / f"{n}_hf", cfg, seed=s, tokenizer_dir=tiny_tokenizer)
        for n, s in (("b", 0), ("a", 1))
    }
    for n in hf:
        import_hf(hf[n], tmp_path / f"{n}_ckpt", quiet=True)
    p = tmp_path / "general.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(4, 1)))
    q = tmp_path / "ecommerce.jsonl"
    q.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(4, 2)))
    specs = [parse_domain_spec(f"general={p}"), parse_domain_spec(f"ecommerce={q}")]
    kw = dict(seq_length=32, batch_size=4, device="cpu", progress=False)
    want = run_merge_curve(hf["b"], hf["a"], [0.5], specs, tmp_path / "hf_report", **kw)
    got = run_merge_curve(
        tmp_path / "b_ckpt", tmp_path / "a_ckpt", [0.5], specs, tmp_path / "report", keep_merged=True, **kw
    )
    mixed = run_merge_curve(tmp_path / "b_ckpt", hf["a"], [0.5], specs, tmp_path / "mixed", **kw)
    for report in (got, mixed):
        assert [x["domains"] for x in report["points"]] == [x["domains"] for x in want["points"]]
    assert got["points"][0]["model"] == str(tmp_path / "b_ckpt")
    assert sorted(x.name for x in (tmp_path / "report" / "merged").iterdir()) == ["alphas"]  # exports removed
    assert (tmp_path / "report" / "curve.png").is_file()


@pytest.mark.slow
def test_merge_curve_with_the_average_of_a_runs_last_checkpoints(tmp_path, tiny_tokenizer):
    """--average-of SAVE --last 3: one more point, off the alpha axis, whose perplexities are those
    of the average written as a Hugging Face folder."""
    from test_average import make_run

    from ellama_megatron.merge.average import average_checkpoints, select_checkpoints

    save = make_run(tmp_path / "run" / "checkpoints", load_model_config("tiny"), tiny_tokenizer, [10, 20, 30, 40])
    p = tmp_path / "general.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(4, 1)))
    q = tmp_path / "ecommerce.jsonl"
    q.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(4, 2)))
    specs = [parse_domain_spec(f"general={p}"), parse_domain_spec(f"ecommerce={q}")]
    kw = dict(seq_length=32, batch_size=4, device="cpu", progress=False)
    request = select_checkpoints([save], 3, None)
    report = run_merge_curve(save / "iter_0000010", save, [0.5], specs, tmp_path / "report", average=request, **kw)
    assert [x["label"] for x in report["points"]] == ["base", "merged", "adapted", "average of 3"]
    assert report["points"][-1]["alpha"] is None
    avg = average_checkpoints(request, tmp_path / "avg_hf", "hf", progress=False).outputs[0]
    direct = evaluate_model_dir(avg, specs, **kw)
    assert report["points"][-1]["domains"] == direct["domains"]
    table = (tmp_path / "report" / "curve.md").read_text().splitlines()
    assert table[-1].startswith("| - | average of 3 | ")
    assert not (tmp_path / "report" / "merged").exists() and (tmp_path / "report" / "curve.png").is_file()


MEGATRON_LOG = """\
 [2026-11-21 10:00:00] iteration        5/      20 | consumed samples:           40 | elapsed time per iteration (ms): 120.0 | learning rate: 3.000000E-05 | global batch size:     8 | lm loss: 5.900000E+00 | loss scale: 1.0 | grad norm: 1.234 | number of skipped iterations:   0 | number of nan iterations:   0 |
 [2026-11-21 10:00:01] iteration       10/      20 | consumed samples:           80 | elapsed time per iteration (ms): 118.0 | learning rate: 3.000000E-05 | global batch size:     8 | lm loss: 5.500000E+00 | loss scale: 1.0 | grad norm: 1.100 | number of skipped iterations:   0 | number of nan iterations:   0 |
----------------------------------------------------------------------------------------------------------------
 validation-general loss at iteration 10 | lm loss value: 5.600000E+00 | lm loss PPL: 2.704264E+02 |
----------------------------------------------------------------------------------------------------------------
----------------------------------------------------------------------------------------------------------------
 validation-ecommerce loss at iteration 10 | lm loss value: 5.700000E+00 | lm loss PPL: 2.988674E+02 |
----------------------------------------------------------------------------------------------------------------
 [2026-11-21 10:00:02] iteration       20/      20 | consumed samples:          160 | elapsed time per iteration (ms): 117.0 | learning rate: 3.000000E-05 | global batch size:     8 | lm loss: 5.100000E+00 | loss scale: 1.0 | grad norm: 1.000 | number of skipped iterations:   0 | number of nan iterations:   0 |
 validation-general loss at iteration 20 | lm loss value: 5.300000E+00 | lm loss PPL: 2.003368E+02 |
 validation-ecommerce loss at iteration 20 | lm loss value: 5.200000E+00 | lm loss PPL: 1.812722E+02 |
"""  # noqa: E501 (Megatron's log lines as printed)


def test_training_curves_from_log_and_tensorboard(tmp_path):
    log_file = tmp_path / "train.log"
    log_file.write_text(MEGATRON_LOG)
    log = read_curves(log_file)
    assert log.train_loss == {5: 5.9, 10: 5.5, 20: 5.1}
    assert log.valid_loss == {"general": {10: 5.6, 20: 5.3}, "ecommerce": {10: 5.7, 20: 5.2}}

    from torch.utils.tensorboard import SummaryWriter

    tb = tmp_path / "tensorboard"
    w = SummaryWriter(str(tb))
    for it, v in log.train_loss.items():
        w.add_scalar("lm loss", v, it)
    for d, losses in log.valid_loss.items():
        for it, v in losses.items():
            w.add_scalar(f"lm loss validation-{d}", v, it)
            w.add_scalar(f"lm loss validation-{d} vs samples", v, it * 8)
    w.close()
    tlog = read_curves(tb)
    assert set(tlog.valid_loss) == {"general", "ecommerce"}
    for d in log.valid_loss:
        assert tlog.valid_loss[d] == pytest.approx(log.valid_loss[d])
    assert tlog.train_loss == pytest.approx(log.train_loss)

    png = plot_training_curves(log, tmp_path / "curves.png")
    assert np.asarray(Image.open(png)).shape[0] > 200
    r = subprocess.run(
        [sys.executable, "tools/plot_training_curves.py", str(log_file), "--out", str(tmp_path / "c2.png")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "validation domains: ecommerce (2 points), general (2 points)" in r.stdout
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    with pytest.raises(ValueError, match="no losses found"):
        read_curves(empty)
