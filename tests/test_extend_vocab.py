"""Vocabulary extension: old ids keep their meaning, old text encodes as before, the extended model
computes the same logits on old-vocabulary text, and new embedding rows are sub-token means."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, call_tool

from ellama_megatron.data.serializers import load_template, serialize
from ellama_megatron.llama.config import load_model_config
from ellama_megatron.testing.demo_corpora import write_demo_corpora
from ellama_megatron.testing.tiny_llama import sample_texts, train_tiny_tokenizer, write_random_hf_llama

NUM_TOKENS = 40


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """A tiny base Llama (tokenizer trained on general text), extended on demo listings by the CLI."""
    root = tmp_path_factory.mktemp("vocab")
    corpora = write_demo_corpora(root / "corpora", docs=300, seed=0)
    general = [r["text"] for r in _records(corpora["general_en"])]
    tok_dir = train_tiny_tokenizer(sample_texts(300) + general[:100], root / "tok", vocab_size=512)
    base = write_random_hf_llama(root / "base", load_model_config("tiny"), seed=0, tokenizer_dir=tok_dir)
    out = root / "extended"
    r = call_tool(
        "tools/extend_vocab.py",
        "--hf-dir",
        base,
        "--corpus",
        corpora["listings"],
        "--template",
        "listing",
        "--num-tokens",
        NUM_TOKENS,
        "--out",
        out,
        "--general",
        corpora["general_en"],
        "--heldout-fraction",
        "0.1",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("done: 40 new tokens")
    listings = [serialize(rec, load_template("listing")) for rec in _records(corpora["listings"])]
    return {
        "base": base,
        "out": out,
        "general": general,
        "listings": listings,
        "report": json.loads((out / "vocab_extension.json").read_text()),
    }


def _tok(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_old_ids_and_special_tokens_unchanged(extended):
    old = json.loads((extended["base"] / "tokenizer.json").read_text())
    new = json.loads((extended["out"] / "tokenizer.json").read_text())
    for token, i in old["model"]["vocab"].items():
        assert new["model"]["vocab"][token] == i
    assert new["added_tokens"] == old["added_tokens"]
    assert new["model"]["merges"][: len(old["model"]["merges"])] == old["model"]["merges"]
    added = {t: i for t, i in new["model"]["vocab"].items() if t not in old["model"]["vocab"]}
    assert sorted(added.values()) == list(range(512, 512 + NUM_TOKENS))
    assert len(new["model"]["merges"]) == len(old["model"]["merges"]) + NUM_TOKENS


def test_text_without_new_tokens_encodes_identically(extended):
    from transformers import AutoTokenizer

    new_strings = [t["text"] for t in extended["report"]["tokens"]]
    old_tok, new_tok = _tok(extended["base"]), _tok(extended["out"])
    old_hf, new_hf = AutoTokenizer.from_pretrained(extended["base"]), AutoTokenizer.from_pretrained(extended["out"])
    clean = [t for t in extended["general"] + sample_texts(300, seed=9) if not any(s in t for s in new_strings)]
    assert len(clean) > 50
    for text in clean:
        assert new_tok.encode(text).ids == old_tok.encode(text).ids
        assert new_hf(text)["input_ids"] == old_hf(text)["input_ids"]
    # Sharper: any text encodes as before unless its old encoding has two adjacent tokens that
    # one of the new merges joins (old merges always run to completion first).
    merges = {tuple(t["merge"]) for t in extended["report"]["tokens"]}
    changed = 0
    for text in extended["general"]:
        old_tokens = old_tok.encode(text, add_special_tokens=False).tokens
        if not any(p in merges for p in zip(old_tokens, old_tokens[1:])):
            assert new_tok.encode(text).ids == old_tok.encode(text).ids
        else:
            changed += 1
    assert changed < len(extended["general"])
    # Domain text does use the new tokens, and decodes back to itself.
    listing = extended["listings"][0]
    ids = new_tok.encode(listing, add_special_tokens=False).ids
    assert max(ids) >= 512 and len(ids) < len(old_tok.encode(listing, add_special_tokens=False).ids)
    assert new_tok.decode(ids) == listing


def test_compression_report(extended):
    c = extended["report"]["compression"]
    assert c["heldout_domain"]["docs"] == 30
    assert c["heldout_domain"]["tokens_per_doc_after"] < c["heldout_domain"]["tokens_per_doc_before"]
    assert c["heldout_domain"]["reduction"] > 0.05
    # Recompute the held-out-free number on all general docs directly.
    old_tok, new_tok = _tok(extended["base"]), _tok(extended["out"])
    g = extended["general"]
    before = sum(len(e.ids) for e in old_tok.encode_batch(g, add_special_tokens=False)) / len(g)
    after = sum(len(e.ids) for e in new_tok.encode_batch(g, add_special_tokens=False)) / len(g)
    assert c["general"]["tokens_per_doc_before"] == pytest.approx(before, abs=1e-3)
    assert c["general"]["tokens_per_doc_after"] == pytest.approx(after, abs=1e-3)
    assert c["general"]["reduction"] < c["heldout_domain"]["reduction"]


def test_embeddings_resized_with_sub_token_means(extended):
    from safetensors.torch import load_file

    base_w = load_file(extended["base"] / "model.safetensors")
    new_w = load_file(extended["out"] / "model.safetensors")
    config = json.loads((extended["out"] / "config.json").read_text())
    assert config["vocab_size"] == 640  # 512 + 40 padded to a multiple of 128
    old_tok = _tok(extended["base"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old, new = base_w[name], new_w[name]
        assert new.shape == (640, old.shape[1])
        torch.testing.assert_close(new[:512], old, rtol=0, atol=0)
        for t in extended["report"]["tokens"]:
            parts = [x.id for x in old_tok.model.tokenize(t["token"])]
            assert len(parts) >= 2 and parts == t["old_ids"]
            torch.testing.assert_close(new[t["id"]], old[parts].mean(0))
        torch.testing.assert_close(new[512 + NUM_TOKENS :], old.mean(0).expand(640 - 512 - NUM_TOKENS, -1))
    for name in base_w:
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(new_w[name], base_w[name], rtol=0, atol=0)


def test_extended_model_logits_equal_base_on_old_vocab_text(extended):
    from transformers import LlamaForCausalLM

    old_tok = _tok(extended["base"])
    base = LlamaForCausalLM.from_pretrained(extended["base"]).eval()
    ext = LlamaForCausalLM.from_pretrained(extended["out"]).eval()
    assert ext.get_input_embeddings().weight.shape[0] == 640
    ids = torch.tensor(
        [old_tok.encode(extended["general"][0]).ids[:48], old_tok.encode(extended["listings"][1]).ids[:48]]
    )
    with torch.no_grad():
        a, b = base(ids).logits, ext(ids).logits
    assert b.shape[-1] == 640
    torch.testing.assert_close(b[..., :512], a, rtol=1e-5, atol=1e-5)


def test_llama3_layout_and_tied_embeddings(tmp_path):
    """Special tokens after the BPE vocabulary (as Llama 3's 128000..128255): new ids come after
    them; with tied embeddings only the input embedding exists and grows."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ellama_megatron.vocab.extend import extend_vocabulary

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        sample_texts(200),
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    n_bpe = tok.get_vocab_size()
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_0|>"])
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    ).save_pretrained(tok_dir)
    cfg = dataclasses.replace(
        load_model_config("tiny"),
        vocab_size=n_bpe + 3,
        tie_word_embeddings=True,
        bos_token_id=n_bpe,
        eos_token_id=n_bpe + 1,
    )
    base = write_random_hf_llama(tmp_path / "base", cfg, tokenizer_dir=tok_dir)
    domain = ["Brand: Zyntex Quorbel, Condition: refurbished Zyntex quorbelizer"] * 20
    report = extend_vocabulary(base, domain, 5, tmp_path / "ext", pad_to_multiple_of=64)
    assert [t["id"] for t in report["tokens"]] == list(range(n_bpe + 3, n_bpe + 8))
    assert report["model"]["resized"] == ["model.embed_tokens.weight"] and report["model"]["tied"]
    new_json = json.loads((tmp_path / "ext" / "tokenizer.json").read_text())
    assert [(t["id"], t["content"]) for t in new_json["added_tokens"]] == [
        (n_bpe, "<|begin_of_text|>"),
        (n_bpe + 1, "<|end_of_text|>"),
        (n_bpe + 2, "<|reserved_0|>"),
    ]
    ext_tok = Tokenizer.from_file(str(tmp_path / "ext" / "tokenizer.json"))
    assert ext_tok.token_to_id("<|end_of_text|>") == n_bpe + 1
    assert ext_tok.decode(ext_tok.encode(domain[0]).ids) == domain[0]
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path / "ext")
    assert hf.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_0|>"]) == [
        n_bpe,
        n_bpe + 1,
        n_bpe + 2,
    ]
    ids = hf("<|end_of_text|>" + domain[0], add_special_tokens=False)["input_ids"]
    assert ids[0] == n_bpe + 1 and max(ids) >= n_bpe + 3
    w = load_file(tmp_path / "ext" / "model.safetensors")["model.embed_tokens.weight"]
    assert w.shape[0] == 320 and json.loads((tmp_path / "ext" / "config.json").read_text())["vocab_size"] == 320


def test_bad_input_fails_before_work(tmp_path):
    (tmp_path / "base").mkdir()
    r = call_tool(
        "tools/extend_vocab.py",
        "--hf-dir",
        tmp_path / "base",
        "--corpus",
        tmp_path / "c.jsonl",
        "--num-tokens",
        "3",
        "--out",
        tmp_path / "o",
    )
    assert r.returncode != 0 and "tokenizer.json" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_extended_checkpoint_converts_to_megatron_and_trains(extended, tmp_path):
    """The extended HF folder imports with tools/convert_hf.py (logits checked by --verify) and
    recipes/cpt.py continues training from it on data tokenized with the new tokenizer."""
    import numpy as np
    from conftest import run_cpt

    from ellama_megatron.formats import indexed_dataset

    ckpt = tmp_path / "ckpt"
    r = subprocess.run(
        [
            sys.executable,
            "tools/convert_hf.py",
            "import",
            "--hf-dir",
            str(extended["out"]),
            "--out",
            str(ckpt),
            "--verify",
            "--quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    new_tok = _tok(extended["out"])
    data = {}
    for name, texts in (("ecommerce", extended["listings"]), ("general", extended["general"])):
        for split, part in (("train", texts[:250]), ("valid", texts[250:])):
            prefix = tmp_path / f"{name}_{split}"
            docs = [enc.ids + [2] for enc in new_tok.encode_batch(part, add_special_tokens=False)]
            indexed_dataset.write_documents(prefix, docs, np.int32)
            data.setdefault(name, {})[split] = str(prefix)
    assert any(i >= 512 for i in new_tok.encode(extended["listings"][0]).ids)
    proc, log = run_cpt(tmp_path / "run", data, "model.vocab_size=640", f"checkpoint.init_from={ckpt}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert log.last_iteration == 20
    assert log.train_loss[20] < log.train_loss[1]
    assert set(log.valid_loss) == {"ecommerce", "general"}
