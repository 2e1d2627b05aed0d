"""`python recipes/demo.py --real`, the demo on a real model and real prose, in CI's budget.

The full run (SmolLM2-135M, about 10 minutes on 2 cores) is measured by hand in docs/benchmarks.md (The demo); a
SmolLM2 run of even 2 iterations takes minutes here (its import, a 135M-parameter torchrun start,
five evaluations), so this test runs the same --real pipeline on the tiny random Llama given as
``--hf-model`` (the stage that differs: where the Hugging Face folder comes from) and checks that the
stages chain: real prose corpora, the model's own tokenizer and eos as EOD, the blend that never
trains on the general validation text, validation at iteration 0, the report and plots re-read.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "recipes"))  # the demo is no part of the library: recipes/demo/
STAGES = 8  # corpora, model, preprocess, import, plan_blend, cpt (exports on finish), merge_curve, report


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    from ellama_megatron.llama.config import load_model_config
    from ellama_megatron.testing.real_prose import licence_paragraphs
    from ellama_megatron.testing.tiny_llama import train_tiny_tokenizer, write_random_hf_llama

    root = tmp_path_factory.mktemp("tiny_hf")
    cfg = load_model_config("tiny")
    train_tiny_tokenizer(licence_paragraphs(), root / "tokenizer", vocab_size=cfg.vocab_size)
    return write_random_hf_llama(root / "hf", cfg, seed=0, tokenizer_dir=root / "tokenizer")


@pytest.mark.slow
def test_real_demo_stages_chain_on_a_given_hf_model(tiny_hf, tmp_path):
    out = tmp_path / "demo_real"
    proc = subprocess.run(
        [
            sys.executable,
            "recipes/demo.py",
            "--real",
            "--hf-model",
            str(tiny_hf),
            "--out",
            str(out),
            "--docs",
            "40",
            "--cpt-iters",
            "2",
            "--eval-interval",
            "1",
            "--alpha",
            "0.5",
            "--launcher",
            "direct",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    for i in range(1, STAGES + 1):
        assert f"[{i}/{STAGES}]" in proc.stdout
    assert f"({STAGES} stages run, 0 reused)" in proc.stdout

    # Real prose, and the model's own tokenizer with its eos as every document's EOD.
    raw = {p.stem for p in (out / "raw").glob("*.jsonl")}
    assert raw == {"listings", "reviews", "prose_licences", "prose_python_reference"}
    eos = json.loads((tiny_hf / "config.json").read_text())["eos_token_id"]
    for name in raw:
        m = json.loads((out / "data" / f"{name}.manifest.json").read_text())
        assert m["documents"]["eod"]["token_id"] == eos and m["tokenizer"]["vocab_size"] == 512
    # General replay is the licences; the general validation text is never trained on.
    blend = json.loads((out / "blend.json").read_text())
    trained = {Path(t["prefix"]).name for t in blend["train"] if t["weight"] > 0}
    assert trained == {"prose_licences_train", "listings_train", "reviews_train"}
    assert [Path(p).name for p in blend["valid"]["general"]] == ["prose_python_reference_valid"]

    # Validation at iteration 0 (before the first step), then every iteration.
    cpt = json.loads((out / "stages" / "cpt.json").read_text())["result"]
    assert {d: [i for i, _ in pts] for d, pts in cpt["valid"].items()} == {"general": [0, 1, 2], "ecommerce": [0, 1, 2]}
    assert "validation-general loss at iteration 0 |" in (out / "cpt_run" / "train.log").read_text()

    points = json.loads((out / "merge_curve" / "curve.json").read_text())["points"]
    assert [p["alpha"] for p in points] == [0.0, 0.5, 1.0]
    report = (out / "REPORT.md").read_text()
    assert "# e-Llama on a real model" in report and f"`{tiny_hf}`" in report
    base, adapted = points[0]["domains"]["ecommerce"]["perplexity"], points[-1]["domains"]["ecommerce"]["perplexity"]
    assert f"{base:.2f} -> {adapted:.2f}" in report  # the report states the measured numbers
    from PIL import Image

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(images) == ["cpt_run/report/run_timeline.png", "loss_curves.png", "merge_curve/curve.png"]
    for rel in images:
        with Image.open(out / rel) as im:
            im.verify()


def test_real_options_and_refusals(tmp_path):
    from demo.runner import REAL_DEFAULTS, DemoError, DemoOptions

    real = DemoOptions.defaults(real=True)
    assert real.real and real.base_iters == 0 and real.hf_model is None
    assert {k: getattr(real, k) for k in REAL_DEFAULTS} == REAL_DEFAULTS
    assert real.fingerprint() != DemoOptions.defaults(real=False).fingerprint()  # a switch starts clean
    with pytest.raises(DemoError, match="--base-iters 5 with --real"):
        DemoOptions(real=True, base_iters=5).check()
    with pytest.raises(DemoError, match="--hf-model is for --real"):
        DemoOptions(hf_model=str(tmp_path)).check()
    with pytest.raises(DemoError, match="no config.json or tokenizer.json"):
        DemoOptions(real=True, base_iters=0, hf_model=str(tmp_path)).check()
