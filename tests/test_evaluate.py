"""tools/evaluate.py: perplexity equals exp(mean token loss) computed independently with transformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from ellama_megatron.eval.heldout_data import parse_domain_spec
from ellama_megatron.eval.perplexity import evaluate_model_dir
from ellama_megatron.testing.tiny_llama import sample_texts

SEQ = 24  # short windows: documents of up to ~50 tokens span several windows


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_hf):
    root = tmp_path_factory.mktemp("eval")
    data = {}
    for name, seed in [("general", 1), ("ecommerce", 2)]:
        p = root / f"{name}.jsonl"
        with open(p, "w") as f:
            for i, t in enumerate(sample_texts(13, seed)):
                f.write(json.dumps({"text": t, "language": ["en", "de", "fr"][i % 3]}) + "\n")
        data[name] = p
    return {"root": root, "model": tiny_hf, "data": data}


def reference_losses(model_dir: Path, texts: list[str], seq: int) -> list[tuple[float, int]]:
    """(summed loss, predicted tokens) per text, one window at a time with transformers' own shifted-label loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text)["input_ids"] + [tok.eos_token_id]
            total, count = 0.0, 0
            for s in range(0, len(ids), seq):
                w = torch.tensor([ids[s : s + seq]])
                if w.shape[1] < 2:
                    continue
                total += model(input_ids=w, labels=w).loss.item() * (w.shape[1] - 1)
                count += w.shape[1] - 1
            out.append((total, count))
    return out


def perplexity_of(losses: list[tuple[float, int]]) -> tuple[float, int]:
    count = sum(n for _, n in losses)
    return math.exp(sum(loss for loss, _ in losses) / count), count


def test_perplexity_equals_transformers(setup):
    sources = [parse_domain_spec(f"{k}={v}") for k, v in setup["data"].items()]
    res = evaluate_model_dir(setup["model"], sources, seq_length=SEQ, batch_size=4, device="cpu", progress=False)
    for name, path in setup["data"].items():
        recs = [json.loads(line) for line in open(path)]
        losses = reference_losses(setup["model"], [r["text"] for r in recs], SEQ)
        ppl, count = perplexity_of(losses)
        got = res["domains"][name]
        assert got["tokens"] == count
        assert got["documents"] == len(recs)
        assert got["perplexity"] == pytest.approx(ppl, rel=1e-5)
        for lang in ("en", "de", "fr"):
            lppl, lcount = perplexity_of([x for x, r in zip(losses, recs) if r["language"] == lang])
            assert got["languages"][lang]["tokens"] == lcount
            assert got["languages"][lang]["perplexity"] == pytest.approx(lppl, rel=1e-5)


def test_indexed_dataset_matches_jsonl(setup, tmp_path):
    """The same documents as a Megatron indexed dataset (BOS + text + EOS ids) give the same perplexity."""
    from transformers import AutoTokenizer

    from ellama_megatron.formats import indexed_dataset

    tok = AutoTokenizer.from_pretrained(setup["model"])
    prefix = tmp_path / "general_text_document"
    docs = [tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id] for line in open(setup["data"]["general"])]
    indexed_dataset.write_documents(prefix, docs, np.int32)
    sources = [parse_domain_spec(f"general={prefix}"), parse_domain_spec(f"g_jsonl={setup['data']['general']}")]
    res = evaluate_model_dir(setup["model"], sources, seq_length=SEQ, batch_size=3, device="cpu", progress=False)
    a, b = res["domains"]["general"], res["domains"]["g_jsonl"]
    assert a["tokens"] == b["tokens"] and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)
    assert a["languages"] == {}


@pytest.mark.slow
def test_cli_writes_json_and_refuses_bad_input(setup, tmp_path):
    out = tmp_path / "ppl.json"
    args = [
        "--model",
        setup["model"],
        "--data",
        f"general={setup['data']['general']}",
        "--data",
        f"ecommerce={setup['data']['ecommerce']}",
        "--seq-length",
        SEQ,
        "--batch-size",
        5,
        "--device",
        "cpu",
        "--out",
        out,
    ]
    r = subprocess.run([sys.executable, "tools/evaluate.py", *map(str, args)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res["domains"]) == {"general", "ecommerce"}
    assert r.stdout.splitlines()[-1].startswith("perplexity of ")
    assert f"general {res['domains']['general']['perplexity']:.3f}" in r.stdout

    with pytest.raises(ValueError, match="expected DOMAIN=PATH"):
        parse_domain_spec("general.jsonl")
    with pytest.raises(ValueError, match=r"missing_text_document\.bin does not exist"):
        parse_domain_spec(f"x={tmp_path / 'missing_text_document'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: record has no string field 'text'"):
        evaluate_model_dir(setup["model"], [parse_domain_spec(f"b={bad}")], device="cpu", progress=False)


def test_megatron_checkpoint_has_the_perplexity_of_its_hf_folder(setup, tmp_path, capsys):
    """tools/evaluate.py on a converted checkpoint (exported to a temporary folder) gives exactly
    the perplexities of the Hugging Face folder it came from; the temporary export is removed."""
    from conftest import load_tool

    from ellama_megatron.convert.importer import import_hf

    ckpt = tmp_path / "ckpt"
    import_hf(setup["model"], ckpt, quiet=True)
    data = [f"{k}={v}" for k, v in setup["data"].items()]
    evaluate = load_tool("evaluate").main
    outs = {}
    for name, model in (("hf", setup["model"]), ("megatron", ckpt)):
        outs[name] = tmp_path / f"{name}.json"
        args = [
            "--model",
            str(model),
            "--seq-length",
            str(SEQ),
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--out",
            str(outs[name]),
            "--work-dir",
            str(tmp_path / "work"),
        ]
        for d in data:
            args += ["--data", d]
        assert evaluate(args) == 0, capsys.readouterr().err
    hf, meg = json.loads(outs["hf"].read_text()), json.loads(outs["megatron"].read_text())
    assert meg["model"] == str(ckpt)
    assert meg["domains"] == hf["domains"]  # bit-exact export: identical numbers, per language too
    assert list((tmp_path / "work").iterdir()) == []

    (tmp_path / "junk").mkdir()
    assert evaluate(["--model", str(tmp_path / "junk"), "--data", data[0]]) == 2
    assert "neither a Hugging Face model folder" in capsys.readouterr().err
    assert evaluate(["--model", str(setup["model"]), "--iteration", "3", "--data", data[0]]) == 2
    assert "has no iterations" in capsys.readouterr().err
