"""tools/merge.py on tiny random Llama folders: exact formulas, layout, SLERP, refusals."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, load_tool
from conftest import load_safetensors_folder as load_all
from safetensors.torch import load_file, save_file

from ellama_megatron.llama.config import load_model_config
from ellama_megatron.merge.merge_hf import merge_hf_folders
from ellama_megatron.merge.methods import SLERP_PARALLEL_THRESHOLD
from ellama_megatron.merge.request import MergeInputError
from ellama_megatron.testing.tiny_llama import sample_texts, train_tiny_tokenizer, write_random_hf_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("merge_models")
    cfg = load_model_config("tiny")
    # ~100 KB shards: the tiny model (about 1 MB) spans 10 shard files.
    base = write_random_hf_llama(root / "base", cfg, seed=0, tokenizer_dir=tiny_tokenizer, max_shard_size="100KB")
    adapted = write_random_hf_llama(root / "adapted", cfg, seed=1, tokenizer_dir=tiny_tokenizer, max_shard_size="100KB")
    other = write_random_hf_llama(root / "other", cfg, seed=2, tokenizer_dir=tiny_tokenizer, max_shard_size="100KB")
    return {"root": root, "cfg": cfg, "tok": tiny_tokenizer, "base": base, "adapted": adapted, "other": other}


def test_linear_merge_is_the_formula_and_keeps_layout(models, tmp_path):
    base, adapted = models["base"], models["adapted"]
    outs = merge_hf_folders(base, [adapted], [0.0, 0.5, 1.0], tmp_path / "m", progress=False).outputs
    assert [p.name for p in outs] == ["alpha_0", "alpha_0.5", "alpha_1"]
    tb, ta = load_all(base), load_all(adapted)
    assert len(list(base.glob("*.safetensors"))) > 3  # really several shards
    for alpha, out in zip([0.0, 0.5, 1.0], outs):
        # Same layout: same files, same index, config and tokenizer.
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
        for name in [
            "model.safetensors.index.json",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]:
            assert (out / name).read_bytes() == (base / name).read_bytes(), name
        tm = load_all(out)
        assert tm.keys() == tb.keys()
        for k in tb:
            expected = (1.0 - alpha) * tb[k].float() + alpha * ta[k].float()
            assert tm[k].dtype == tb[k].dtype
            assert torch.equal(tm[k], expected.to(tb[k].dtype)), (alpha, k)
    # alpha 0 and 1 give back the inputs bit for bit, down to the shard files.
    for f in base.glob("*.safetensors"):
        assert (outs[0] / f.name).read_bytes() == f.read_bytes()
        assert (outs[2] / f.name).read_bytes() == (adapted / f.name).read_bytes()
    # The merged folder loads in transformers.
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(outs[1], local_files_only=True)
    assert torch.equal(m.state_dict()["model.norm.weight"], tm["model.norm.weight"])


def test_bf16_merge_rounds_once_from_float32(models, tmp_path):
    src = {}
    for name in ("base", "adapted"):
        d = tmp_path / name
        shutil.copytree(models[name], d)
        for f in d.glob("*.safetensors"):
            save_file({k: v.bfloat16() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
        src[name] = d
    out = merge_hf_folders(src["base"], [src["adapted"]], [0.3], tmp_path / "m", progress=False).outputs[0]
    tb, ta, tm = load_all(src["base"]), load_all(src["adapted"]), load_all(out)
    for k in tb:
        assert tm[k].dtype == torch.bfloat16
        assert torch.equal(tm[k], (0.7 * tb[k].float() + 0.3 * ta[k].float()).bfloat16())


def reference_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Spherical interpolation of two whole tensors, written out from the definition (float64)."""
    a, b = v0.astype(np.float64).ravel(), v1.astype(np.float64).ravel()
    cos = float(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)))
    if abs(cos) > SLERP_PARALLEL_THRESHOLD:
        return ((1 - t) * v0.astype(np.float64) + t * v1.astype(np.float64)).astype(v0.dtype)
    theta = math.acos(cos)
    res = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    return res.reshape(v0.shape).astype(v0.dtype)


def test_slerp_matches_reference_and_chunking(models, tmp_path):
    base, adapted = models["base"], models["adapted"]
    whole = merge_hf_folders(base, [adapted], [0.3, 0.7], tmp_path / "whole", method="slerp", progress=False).outputs
    # 1 KiB chunks: every matrix is merged in many row chunks; the result must not change.
    chunked = merge_hf_folders(
        base, [adapted], [0.3, 0.7], tmp_path / "chunked", method="slerp", chunk_bytes=1024, progress=False
    ).outputs
    tb, ta = load_all(base), load_all(adapted)
    for t, out_w, out_c in zip([0.3, 0.7], whole, chunked):
        tw, tc = load_all(out_w), load_all(out_c)
        for k in tb:
            ref = torch.from_numpy(reference_slerp(t, tb[k].numpy(), ta[k].numpy()))
            torch.testing.assert_close(tw[k], ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(tc[k], tw[k], rtol=1e-6, atol=1e-7)
        # Random independent tensors are far from parallel: SLERP differs from linear.
        k = "model.layers.0.mlp.up_proj.weight"
        lin = (1 - t) * tb[k] + t * ta[k]
        assert not torch.allclose(tw[k], lin, atol=1e-4)


def test_slerp_falls_back_to_linear_for_parallel_tensors(models, tmp_path):
    scaled = tmp_path / "scaled"
    shutil.copytree(models["base"], scaled)
    for f in scaled.glob("*.safetensors"):
        save_file({k: 2.0 * v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    out = merge_hf_folders(models["base"], [scaled], [0.25], tmp_path / "m", method="slerp", progress=False).outputs[0]
    tb, ts, tm = load_all(models["base"]), load_all(scaled), load_all(out)
    for k in tb:
        assert torch.equal(tm[k], (0.75 * tb[k] + 0.25 * ts[k]).to(tb[k].dtype))


def test_task_arithmetic(models, tmp_path):
    base, a, o = models["base"], models["adapted"], models["other"]
    out = merge_hf_folders(
        base, [a, o], [0.5], tmp_path / "m", method="task_arithmetic", weights=[1.0, 0.4], progress=False
    ).outputs[0]
    tb, ta, to, tm = load_all(base), load_all(a), load_all(o), load_all(out)
    for k in tb:
        delta = torch.zeros_like(tb[k])
        delta += 1.0 * (ta[k] - tb[k])
        delta += 0.4 * (to[k] - tb[k])
        assert torch.equal(tm[k], tb[k] + 0.5 * delta)


def _variant(models, tmp_path, name, **cfg_changes) -> Path:
    cfg = dataclasses.replace(models["cfg"], **cfg_changes)
    return write_random_hf_llama(tmp_path / name, cfg, seed=3, tokenizer_dir=models["tok"], max_shard_size="100KB")


def test_refuses_different_architecture(models, tmp_path):
    d = _variant(models, tmp_path, "eps", norm_epsilon=1e-6)
    with pytest.raises(MergeInputError, match=r"architecture differs.*rms_norm_eps"):
        merge_hf_folders(models["base"], [d], [0.5], tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_refuses_different_shapes(models, tmp_path):
    # Same config.json except the width: edit the file so only the tensors disagree.
    d = _variant(models, tmp_path, "ffn", ffn_hidden_size=128)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = models["cfg"].ffn_hidden_size
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        MergeInputError, match=r"tensor shapes differ: model\.layers\.0\.mlp\.down_proj\.weight is \[64, 160\]"
    ):
        merge_hf_folders(models["base"], [d], [0.5], tmp_path / "m", progress=False)


def test_refuses_missing_tensor_and_dtype(models, tmp_path):
    d = tmp_path / "missing"
    shutil.copytree(models["adapted"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop("model.norm.weight")
    tensors = load_file(d / shard)
    del tensors["model.norm.weight"]
    save_file(tensors, d / shard, metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        MergeInputError, match=r"tensor names differ.*model\.norm\.weight is in base but not in adapted"
    ):
        merge_hf_folders(models["base"], [d], [0.5], tmp_path / "m", progress=False)

    d = tmp_path / "half"
    shutil.copytree(models["adapted"], d)
    for f in d.glob("*.safetensors"):
        save_file({k: v.half() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    with pytest.raises(MergeInputError, match=r"tensor dtypes differ: .* is F32 in base .* but F16 in adapted"):
        merge_hf_folders(models["base"], [d], [0.5], tmp_path / "m", progress=False)


def test_refuses_different_tokenizer(models, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(models["adapted"], d)
    train_tiny_tokenizer(sample_texts(100, seed=7)[::-1] + ["zebra quokka"] * 20, tmp_path / "tok2")
    shutil.copy2(tmp_path / "tok2" / "tokenizer.json", d / "tokenizer.json")
    with pytest.raises(MergeInputError, match=r"tokenizer differs: tokenizer\.json .* differ at model\."):
        merge_hf_folders(models["base"], [d], [0.5], tmp_path / "m", progress=False)


def test_cli_refusals(models, tmp_path, capsys):
    merge_main = load_tool("merge").main
    meg = tmp_path / "megatron_ckpt"
    meg.mkdir()
    (meg / "latest_checkpointed_iteration.txt").write_text("10")
    # A Hugging Face folder and a Megatron checkpoint are not merged together (tests/test_merge_megatron.py
    # merges two Megatron checkpoints).
    assert (
        merge_main(
            ["--base", str(models["base"]), "--adapted", str(meg), "--alpha", "0.5", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "is a Megatron checkpoint" in err and "tools/convert_hf.py" in err
    (tmp_path / "junk").mkdir()
    assert (
        merge_main(
            [
                "--base",
                str(tmp_path / "junk"),
                "--adapted",
                str(models["adapted"]),
                "--alpha",
                "0.5",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "neither a Hugging Face model folder" in capsys.readouterr().err
    args = ["--base", str(models["base"]), "--adapted", str(models["adapted"]), "--adapted", str(models["other"])]
    assert merge_main(args + ["--alpha", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "use task_arithmetic" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert merge_main(args[:4] + ["--alpha", "0.5", "--out", str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk", "megatron_ckpt", "taken"]  # nothing half-written


def test_cli_runs_from_repo_root(models, tmp_path):
    out = tmp_path / "ok"
    args = ["--base", models["base"], "--adapted", models["adapted"], "--alpha", "0.5", "--out", out]
    r = subprocess.run([sys.executable, "tools/merge.py", *map(str, args)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("merged Hugging Face folders: 39 tensors")
    assert (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_kernels_are_the_whole_tensor_expressions_bit_for_bit(dtype):
    """The block-by-block arithmetic (blocks of BLOCK_ELEMENTS, a ragged last one, a transposed
    input) gives what the whole-tensor float32 expressions give, rounded once."""
    from ellama_megatron.merge.methods import BLOCK_ELEMENTS, WeightedAccumulator, merge_chunk, weighted_sum

    g = torch.Generator().manual_seed(0)
    n = 3 * BLOCK_ELEMENTS + 7
    b, a, c = (torch.randn(n, generator=g).to(dtype) for _ in range(3))
    t = torch.randn(257, 301, generator=g).to(dtype).T  # not contiguous
    want = ((0.7 * b.float() + 0.3 * a.float()) / 1.0).to(dtype)
    assert torch.equal(weighted_sum([b, a], [0.7, 0.3]), want)
    assert torch.equal(merge_chunk("linear", 0.3, [b, a]), want)
    assert torch.equal(weighted_sum([t, t], [0.25, 0.5]), (0.25 * t.float() + 0.5 * t.float()).to(dtype))
    mean = ((b.float() * 1.0 + a.float() * 1.0 + c.float() * 1.0) / 3.0).to(dtype)
    acc = WeightedAccumulator()
    for x in (b, a, c):
        acc.add(x, 1.0)
    assert torch.equal(weighted_sum([b, a, c], [1.0, 1.0, 1.0], 3.0), mean) and torch.equal(acc.result(3.0), mean)
    delta = 0.4 * (a.float() - b.float()) + 1.3 * (c.float() - b.float())
    ta = merge_chunk("task_arithmetic", 0.6, [b, a, c], [0.4, 1.3])
    assert torch.equal(ta, (b.float() + 0.6 * delta).to(dtype))
