"""tools/merge.py on Megatron torch_dist checkpoints: the same result as exporting both inputs and
merging the Hugging Face folders, the importer's layout (exports, loads in transformers and in the
engine), refusals naming the first difference, nothing half-written."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import call_tool
from conftest import load_safetensors_folder as load_all

from ellama_megatron.convert.exporter import export_hf
from ellama_megatron.convert.importer import import_hf
from ellama_megatron.formats.megatron_checkpoint import find_checkpoint
from ellama_megatron.formats.torch_dist import CheckpointReader
from ellama_megatron.llama.config import load_model_config
from ellama_megatron.merge.merge_hf import merge_hf_folders
from ellama_megatron.merge.merge_megatron import merge_megatron_checkpoints
from ellama_megatron.merge.request import MergeInputError
from ellama_megatron.testing.tiny_llama import write_random_hf_llama


def megatron_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(find_checkpoint(ckpt))
    return {k: reader.read(k) for k, md in reader.metadata.state_dict_metadata.items() if hasattr(md, "size")}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_tokenizer):
    """Two different random tiny HF models with one tokenizer, imported; and their exports."""
    root = tmp_path_factory.mktemp("merge_megatron")
    cfg = load_model_config("tiny")
    out = {"root": root, "cfg": cfg, "tok": tiny_tokenizer}
    for name, seed in (("base", 0), ("adapted", 1)):
        hf = write_random_hf_llama(
            root / f"{name}_hf", cfg, seed=seed, tokenizer_dir=tiny_tokenizer, max_shard_size="100KB"
        )
        import_hf(hf, root / f"{name}_ckpt", quiet=True)
        export_hf(root / f"{name}_ckpt", root / f"{name}_exported", quiet=True)
        out[name] = root / f"{name}_ckpt"
        out[f"{name}_exported"] = root / f"{name}_exported"
    return out


def test_linear_merge_equals_export_then_hf_merge(ckpts, tmp_path):
    alphas = [0.0, 0.5, 1.0]
    outs = merge_megatron_checkpoints(ckpts["base"], [ckpts["adapted"]], alphas, tmp_path / "m", progress=False).outputs
    ref = merge_hf_folders(
        ckpts["base_exported"], [ckpts["adapted_exported"]], alphas, tmp_path / "hf_m", progress=False
    ).outputs
    assert [p.name for p in outs] == ["alpha_0", "alpha_0.5", "alpha_1"]
    for out, hf_out in zip(outs, ref):
        # The importer's layout, weights only.
        assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
        assert (out / "checkpoint_record.yaml").is_file() and (out / "hf" / "tokenizer.json").is_file()
        export_hf(out, tmp_path / f"{out.name}_exported", quiet=True)
        got, want = load_all(tmp_path / f"{out.name}_exported"), load_all(hf_out)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (out.name, k)
    # alpha 0 and 1 give back the input checkpoints' tensors bit for bit.
    tb, ta = megatron_tensors(ckpts["base"]), megatron_tensors(ckpts["adapted"])
    t0, t1 = megatron_tensors(outs[0]), megatron_tensors(outs[2])
    assert t0.keys() == tb.keys()
    for k in tb:
        assert torch.equal(t0[k], tb[k]) and torch.equal(t1[k], ta[k]), k
    # The merged checkpoint's export loads in transformers, tokenizer included.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "alpha_0.5_exported", local_files_only=True)
    AutoTokenizer.from_pretrained(tmp_path / "alpha_0.5_exported", local_files_only=True)
    tm = load_all(tmp_path / "alpha_0.5_exported")
    assert torch.equal(
        m.state_dict()["model.layers.1.self_attn.k_proj.weight"], tm["model.layers.1.self_attn.k_proj.weight"]
    )


@pytest.mark.parametrize("method", ["slerp", "task_arithmetic"])
def test_other_methods_equal_hf_merge(ckpts, tmp_path, method):
    # SLERP runs in Hugging Face's split (q, k, v and gate, up separately), so its angles match.
    out = merge_megatron_checkpoints(
        ckpts["base"], [ckpts["adapted"]], [0.3], tmp_path / "m", method=method, progress=False
    ).outputs[0]
    ref = merge_hf_folders(
        ckpts["base_exported"], [ckpts["adapted_exported"]], [0.3], tmp_path / "hf_m", method=method, progress=False
    ).outputs[0]
    export_hf(out, tmp_path / "exported", quiet=True)
    got, want = load_all(tmp_path / "exported"), load_all(ref)
    for k in want:
        # float64 angle sums may differ in the last bit with the chunking; float32 results agree.
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_different_vocab_padding_is_merged_as_the_real_rows(tmp_path, ckpts):
    # vocab 600: an import for TP 1 pads to 640 rows, one for TP 2 to 768.
    cfg = dataclasses.replace(ckpts["cfg"], vocab_size=600)
    hfs = []
    for name, seed, tp in (("b", 0, 1), ("a", 1, 2)):
        hf = write_random_hf_llama(tmp_path / f"{name}_hf", cfg, seed=seed, tokenizer_dir=ckpts["tok"])
        import_hf(hf, tmp_path / f"{name}_ckpt", target_tp=tp, quiet=True)
        hfs.append(hf)
    out = merge_megatron_checkpoints(
        tmp_path / "b_ckpt", [tmp_path / "a_ckpt"], [0.5], tmp_path / "m", progress=False
    ).outputs[0]
    emb = megatron_tensors(out)["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 640 and torch.count_nonzero(emb[600:]) == 0
    ref = merge_hf_folders(hfs[0], [hfs[1]], [0.5], tmp_path / "hf_m", progress=False).outputs[0]
    export_hf(out, tmp_path / "exported", quiet=True)
    got, want = load_all(tmp_path / "exported"), load_all(ref)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_refuses_different_architecture_and_leaves_nothing(ckpts, tmp_path):
    cfg = dataclasses.replace(ckpts["cfg"], norm_epsilon=1e-6)
    hf = write_random_hf_llama(tmp_path / "eps_hf", cfg, seed=2, tokenizer_dir=ckpts["tok"])
    import_hf(hf, tmp_path / "eps_ckpt", quiet=True)
    with pytest.raises(MergeInputError, match=r"architecture differs: .* at norm_epsilon \(1e-05 vs 1e-06\)"):
        merge_megatron_checkpoints(ckpts["base"], [tmp_path / "eps_ckpt"], [0.5], tmp_path / "m", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eps_ckpt", "eps_hf"]


def test_refuses_different_tokenizer(ckpts, tmp_path):
    other = tmp_path / "other_ckpt"
    shutil.copytree(ckpts["adapted"], other)
    tok = json.loads((other / "hf" / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zebra"] = tok["model"]["vocab"].pop(next(iter(tok["model"]["vocab"])))
    (other / "hf" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(MergeInputError, match=r"tokenizer differs: tokenizer.json .* at model.vocab"):
        merge_megatron_checkpoints(ckpts["base"], [other], [0.5], tmp_path / "m", progress=False)


def test_cli_merges_megatron_and_refuses_mixed_or_unknown_inputs(ckpts, tmp_path, capsys):
    p = call_tool(
        "tools/merge.py",
        "--base",
        ckpts["base"],
        "--adapted",
        ckpts["adapted"],
        "--alpha",
        "0.25",
        "--out",
        tmp_path / "m",
    )
    assert p.returncode == 0, p.stderr
    assert "Megatron checkpoint" in p.stdout.splitlines()[-1]
    want = {
        k: 0.75 * v + 0.25 * megatron_tensors(ckpts["adapted"])[k] for k, v in megatron_tensors(ckpts["base"]).items()
    }
    got = megatron_tensors(tmp_path / "m")
    assert all(torch.equal(got[k], want[k]) for k in want)
    from conftest import load_tool

    merge_main = load_tool("merge").main
    assert (
        merge_main(
            [
                "--base",
                str(ckpts["base"]),
                "--adapted",
                str(ckpts["adapted_exported"]),
                "--alpha",
                "0.5",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "Megatron checkpoint" in err and "Hugging Face folder" in err
    (tmp_path / "junk").mkdir()
    assert (
        merge_main(
            [
                "--base",
                str(ckpts["base"]),
                "--adapted",
                str(tmp_path / "junk"),
                "--alpha",
                "0.5",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "neither a Hugging Face model folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_merged_checkpoint_starts_the_engine_at_its_own_loss(ckpts, tmp_path):
    """checkpoint.init_from=<merged>: the engine's first loss is the merged model's loss in
    transformers on the same tokens (identical documents make every sample doc + doc[0], as in
    test_convert_engine.py), so the merge is what the engine loaded."""
    import math

    import numpy as np
    from conftest import run_cpt
    from transformers import LlamaForCausalLM

    from ellama_megatron.formats import indexed_dataset

    # Weights far from a random init (std 0.4), so a failed load could not pass for a good one.
    cfg = dataclasses.replace(ckpts["cfg"], init_method_std=0.4)
    for name, seed in (("b", 3), ("a", 4)):
        hf = write_random_hf_llama(tmp_path / f"{name}_hf", cfg, seed=seed, tokenizer_dir=ckpts["tok"])
        import_hf(hf, tmp_path / f"{name}_ckpt", quiet=True)
    out = merge_megatron_checkpoints(
        tmp_path / "b_ckpt", [tmp_path / "a_ckpt"], [0.5], tmp_path / "m", progress=False
    ).outputs[0]
    seq = 128  # conf/train/tiny.yaml seq_length
    doc = np.random.default_rng(0).integers(4, 512, seq).astype(np.int32)  # no EOD (id 2) inside
    for split, n in (("train", 64), ("valid", 8)):
        indexed_dataset.write_documents(tmp_path / split, [doc] * n, np.int32)
    data = {"general": {"train": str(tmp_path / "train"), "valid": str(tmp_path / "valid")}}
    export_hf(out, tmp_path / "merged_hf", quiet=True)
    tokens = torch.tensor(np.concatenate([doc, doc[:1]]), dtype=torch.long)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "merged_hf", dtype=torch.float32)
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(model(tokens[None, :-1]).logits[0], tokens[1:]))
    assert abs(want - math.log(512)) > 0.5
    proc, log = run_cpt(
        tmp_path / "run",
        data,
        f"checkpoint.init_from={out}",
        "train.train_tokens=1024",
        "train.exit_interval=1",
        "optim.lr=1e-3",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert log.train_loss[1] == pytest.approx(want, abs=2e-4)
    # The run's own checkpoints/ (engine-written, with optimizer state) merge with the import it
    # started from as their exports do.
    run_ckpts = tmp_path / "run" / "checkpoints"
    again = merge_megatron_checkpoints(
        tmp_path / "b_ckpt", [run_ckpts], [0.25], tmp_path / "m2", progress=False
    ).outputs[0]
    export_hf(again, tmp_path / "m2_hf", quiet=True)
    export_hf(run_ckpts, tmp_path / "run_hf", quiet=True)
    ref = merge_hf_folders(
        tmp_path / "b_hf", [tmp_path / "run_hf"], [0.25], tmp_path / "m2_ref", progress=False
    ).outputs[0]
    got, want_t = load_all(tmp_path / "m2_hf"), load_all(ref)
    assert got.keys() == want_t.keys() and all(torch.equal(got[k], want_t[k]) for k in want_t)
