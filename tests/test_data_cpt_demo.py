"""The data pipeline into training: demo corpora preprocessed with a tiny tokenizer, the blend
planned from conf/data/demo_blend.yaml by the engine, and a tiny CPU run that logs a general and
an e-commerce validation loss."""

import subprocess
import sys

import pytest
from conftest import REPO

from ellama_megatron.data.preprocess import PreprocessOptions, preprocess
from ellama_megatron.data.serializers import RecordSerializer, load_template
from ellama_megatron.formats.train_log import parse_train_log
from ellama_megatron.testing.demo_corpora import write_demo_corpora
from ellama_megatron.testing.tiny_llama import train_tiny_tokenizer

TEMPLATES = {"listings": "listing", "reviews": "review", "general_en": "plain", "general_multilingual": "plain"}


@pytest.mark.slow
def test_tiny_cpt_on_preprocessed_demo_corpora_logs_both_domains(tmp_path):
    raw = write_demo_corpora(tmp_path / "raw", docs=300, seed=0)
    texts = [line for p in raw.values() for line in p.read_text(encoding="utf-8").splitlines()]
    tok = train_tiny_tokenizer(texts, tmp_path / "tok", vocab_size=512)  # ids fit model=tiny (vocab 512, EOS 2)
    for name, path in raw.items():
        ser = RecordSerializer(load_template(TEMPLATES[name]), id_key="id")
        preprocess(
            PreprocessOptions(
                [str(path)], str(tmp_path / "data" / name), str(tok), ser, valid_fraction=0.1, progress=False
            )
        )
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "cpt.py"),
        f"run_dir={tmp_path / 'run'}",
        "data=demo_blend",
        f"data.root={tmp_path / 'data'}",
        "optim.lr=2e-3",
        "optim.min_lr=2e-4",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    log = parse_train_log(out)
    assert log.last_iteration == log.train_iters and log.train_iters > 0
    assert set(log.valid_loss) == {"general", "ecommerce"}
    assert all(losses for losses in log.valid_loss.values())
    first, last = log.train_loss[1], log.train_loss[log.last_iteration]
    assert last < first, f"training loss did not fall: {first} -> {last}"
