"""lm_eval runs the shipped e-commerce tasks offline on a tiny random model and the sample data."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ellama_megatron.eval import TASKS_DIR
from ellama_megatron.eval.sample_tasks import LANGUAGES, TASK_TYPES, write_sample_task_data

LM_EVAL = shutil.which("lm_eval", path=str(Path(os.sys.executable).parent))


def ecom_data_module():
    spec = importlib.util.spec_from_file_location("ecom_data", TASKS_DIR / "ecom_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_task_file_has_sample_data_and_loads(tmp_path):
    files = write_sample_task_data(tmp_path, per_task=5)
    assert len(files) == len(TASK_TYPES) * len(LANGUAGES)
    ecom_data = ecom_data_module()
    for t in TASK_TYPES:
        for lang in LANGUAGES:
            assert (TASKS_DIR / f"ecom_{t}_{lang}.yaml").is_file()
            ds = ecom_data.load_task(f"{t}_{lang}.jsonl", t, ecom_data_dir=str(tmp_path), version=1.0)["test"]
            assert len(ds) == 5 and all(0 <= r["label"] < len(r["choices"]) for r in ds)
    bad = tmp_path / "category_xx.jsonl"
    bad.write_text('{"title": "x", "choices": ["a"], "label": 3}\n')
    with pytest.raises(ValueError, match=r"category_xx\.jsonl:1: label 3 is not an index into choices"):
        ecom_data.load_task("category_xx.jsonl", "category", ecom_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no data folder"):
        os.environ.pop("ELLAMA_ECOM_DATA", None)
        ecom_data.load_task("category_en.jsonl", "category")


@pytest.mark.slow
@pytest.mark.skipif(LM_EVAL is None, reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
def test_lm_eval_runs_ecom_tasks_offline(tmp_path, tiny_hf):
    model = tiny_hf
    data = tmp_path / "data"
    write_sample_task_data(data, per_task=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        LM_EVAL,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model}",
        "--include_path",
        str(TASKS_DIR),
        "--tasks",
        "ecom_en,ecom_sentiment_de,ecom_aspect_ll_fr",
        "--device",
        "cpu",
        "--batch_size",
        "8",
        "--metadata",
        json.dumps({"ecom_data_dir": str(data)}),
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    results_file = next((tmp_path / "out").rglob("results_*.json"))
    res = json.loads(results_file.read_text())["results"]
    for task in ["ecom_category_en", "ecom_aspect_en", "ecom_sentiment_en", "ecom_relevance_en", "ecom_sentiment_de"]:
        assert 0.0 <= res[task]["acc,none"] <= 1.0, task
    assert "ecom_en" in res and res["ecom_aspect_ll_fr"]["perplexity,none"] > 1.0
    # The prompts and choices came from the shipped templates and the sample records.
    samples = [
        json.loads(line) for f in (tmp_path / "out").rglob("samples_ecom_sentiment_de_*.jsonl") for line in open(f)
    ]
    assert len(samples) == 4
    ctx, cont = samples[0]["arguments"]["gen_args_0"]["arg_0"], samples[0]["arguments"]["gen_args_0"]["arg_1"]
    assert ctx.startswith("Bewertung: ") and ctx.endswith("\nStimmung:") and cont == " negativ"
