"""tools/merge.py --average: the weighted mean of a run's checkpoints, tensor by tensor, against
the mean computed here from the checkpoints themselves; both output formats; refusals."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import call_tool
from conftest import load_safetensors_folder as load_all

from ellama_megatron.convert.exporter import export_hf
from ellama_megatron.formats.megatron_checkpoint import (
    HF_FILES_DIR,
    RECORD_FILE,
    TRACKER_FILE,
    find_checkpoint,
    iteration_folder,
)
from ellama_megatron.formats.torch_dist import TensorChunk, extra_state_objects, write_checkpoint
from ellama_megatron.llama import weights as W
from ellama_megatron.llama.config import load_model_config
from ellama_megatron.merge.average import average_checkpoints, select_checkpoints
from ellama_megatron.run.plan import padded_vocab_size


def write_iteration(save_dir: Path, iteration: int, cfg, seed: int, dtype=torch.bfloat16, wrong_shape: str = ""):
    """One checkpoint of a run written directly (random model tensors in Megatron's layout, no
    optimizer state), as torch_dist at iteration ``iteration``; the tracker names it."""
    g = torch.Generator().manual_seed(seed)
    padded = padded_vocab_size(cfg.vocab_size, 1)
    chunks = []
    for m in W.mappings(cfg):
        shape = m.megatron_shape(cfg, padded)
        if m.megatron == wrong_shape:
            shape = (shape[0] + 1,) + shape[1:]
        full = (cfg.num_layers, *shape) if m.per_layer else shape
        for layer in W.layers_of(m, cfg):
            t = torch.randn(shape, generator=g).mul_(0.05).to(dtype)  # about an initialised model's scale
            chunks.append(TensorChunk.of(m.megatron, full, dtype, layer, lambda t=t: t))
    folder = iteration_folder(save_dir, iteration)
    folder.mkdir(parents=True)
    common = {"iteration": iteration, "checkpoint_version": 3.0}
    write_checkpoint(folder, chunks, extra_state_objects(W.EXTRA_STATE_MODULES, cfg.num_layers), common)
    (save_dir / TRACKER_FILE).write_text(str(iteration))
    return folder


def make_run(save_dir: Path, cfg, tok: Path, iterations, seed0: int = 0, **kw) -> Path:
    """A run's save folder: the record (model section) and the tokenizer beside the checkpoints."""
    save_dir.mkdir(parents=True)
    (save_dir / RECORD_FILE).write_text(yaml.safe_dump({"model": cfg.to_dict()}, sort_keys=False))
    shutil.copytree(tok, save_dir / HF_FILES_DIR)
    for i, it in enumerate(iterations):
        write_iteration(save_dir, it, cfg, seed0 + i, **kw)
    return save_dir


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from ellama_megatron.formats.torch_dist import CheckpointReader

    reader = CheckpointReader(find_checkpoint(folder))
    return {k: reader.read(k) for k, md in reader.metadata.state_dict_metadata.items() if hasattr(md, "size")}


def reference_mean(tensors: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean, computed here: float32 sum of weight * tensor, over the total, cast back."""
    total = sum(weights)
    return {
        k: (sum(w * t[k].float() for w, t in zip(weights, tensors)) / total).to(tensors[0][k].dtype) for k in tensors[0]
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("average")
    cfg = load_model_config("tiny")
    save = make_run(root / "run" / "checkpoints", cfg, tiny_tokenizer, [10, 20, 30, 40])
    (save / "iter_0000050").mkdir()  # a save cut short: no .metadata
    return {"root": root, "cfg": cfg, "tok": tiny_tokenizer, "save": save}


@pytest.mark.parametrize("fmt", ["megatron", "hf"])
def test_average_of_the_last_three_equals_their_mean(run, tmp_path, fmt):
    save = run["save"]
    request = select_checkpoints([save], 3, None)
    assert [c.name for c in request.checkpoints] == ["iter_0000020", "iter_0000030", "iter_0000040"]
    assert any("iter_0000050" in n for n in request.notes)
    result = average_checkpoints(request, tmp_path / "avg", fmt, progress=False)
    assert result.outputs == [tmp_path / "avg"]
    if fmt == "megatron":
        inputs = [tensors_of(c) for c in request.checkpoints]
        want = reference_mean(inputs, [1.0, 1.0, 1.0])
        got = tensors_of(tmp_path / "avg")
        assert (tmp_path / "avg" / TRACKER_FILE).read_text() == "release"
        record = yaml.safe_load((tmp_path / "avg" / RECORD_FILE).read_text())
        assert record["model"] == run["cfg"].to_dict()
        assert record["average"]["checkpoints"] == [str(c) for c in request.checkpoints]
        assert (tmp_path / "avg" / HF_FILES_DIR / "tokenizer.json").is_file()
    else:
        # The mean of the three iterations' exports (export is bit-exact), in Hugging Face's names.
        inputs = []
        for it in (20, 30, 40):
            export_hf(save, tmp_path / f"exp{it}", iteration=it, quiet=True)
            inputs.append(load_all(tmp_path / f"exp{it}"))
        want = reference_mean(inputs, [1.0, 1.0, 1.0])
        got = load_all(tmp_path / "avg")
        assert (tmp_path / "avg" / "tokenizer.json").is_file() and (tmp_path / "avg" / "config.json").is_file()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.bfloat16, k
        assert torch.equal(got[k], want[k]), k
    # Really averaged (not a copy of one input), and not the result of rounding after each addition.
    k = next(iter(want))
    assert not any(torch.equal(got[k], t[k]) for t in inputs)


def test_weighted_average_of_named_checkpoints(run, tmp_path):
    save = run["save"]
    named = [save / "iter_0000010", save / "iter_0000040"]
    out = average_checkpoints(select_checkpoints(named, None, [1.0, 3.0]), tmp_path / "w", progress=False).outputs[0]
    want = reference_mean([tensors_of(p) for p in named], [1.0, 3.0])
    got = tensors_of(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # The Hugging Face output is the Megatron output exported, bit for bit.
    average_checkpoints(select_checkpoints(named, None, [1.0, 3.0]), tmp_path / "w_hf", "hf", progress=False)
    export_hf(out, tmp_path / "w_exported", quiet=True)
    a, b = load_all(tmp_path / "w_hf"), load_all(tmp_path / "w_exported")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_float32_checkpoints_average_in_float32(run, tmp_path):
    save = make_run(tmp_path / "fp32", run["cfg"], run["tok"], [1, 2, 3], dtype=torch.float32)
    request = select_checkpoints([save], 3, None)
    out = average_checkpoints(request, tmp_path / "avg", progress=False).outputs[0]
    want = reference_mean([tensors_of(c) for c in request.checkpoints], [1.0, 1.0, 1.0])
    got = tensors_of(out)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)


def test_cli_average_and_refusals(run, tmp_path, capsys):
    from conftest import load_tool

    save = run["save"]
    # The run folder works as well as its checkpoints/.
    p = call_tool("tools/merge.py", "--average", save.parent, "--last", "3", "--out", tmp_path / "cli")
    assert p.returncode == 0, p.stderr
    assert "averaged 3 checkpoints (iter_0000020, iter_0000030, iter_0000040)" in p.stdout
    assert "skipped incomplete iter_0000050" in p.stderr
    want = reference_mean([tensors_of(save / f"iter_00000{i}0") for i in (2, 3, 4)], [1.0, 1.0, 1.0])
    got = tensors_of(tmp_path / "cli")
    assert all(torch.equal(got[k], want[k]) for k in want)

    # Shapes that differ: a checkpoint of the same model config with one tensor one row longer.
    odd = make_run(tmp_path / "odd", run["cfg"], run["tok"], [10], wrong_shape="decoder.final_layernorm.weight")
    # A different architecture.
    other_cfg = dataclasses.replace(run["cfg"], ffn_hidden_size=run["cfg"].ffn_hidden_size * 2)
    other = make_run(tmp_path / "other", other_cfg, run["tok"], [10])
    hf = tmp_path / "hf_folder"
    export_hf(save, hf, iteration=10, quiet=True)
    refusals = [
        (("--average", save, "--last", "5"), "4 complete checkpoint(s) (iter_0000010, iter_0000020, iter_0000030, "),
        (("--average", save, "--last", "3", "--weight", "1", "--weight", "2"), "--weight given 2 times for 3"),
        (("--average", save / "iter_0000010", save / "iter_0000050"), "iter_0000050: incomplete checkpoint"),
        (("--average", save / "iter_0000010", odd / "iter_0000010"), "tensor shapes differ: decoder.final_layernorm"),
        (("--average", save / "iter_0000010", other / "iter_0000010"), "architecture differs"),
        (("--average", save / "iter_0000010", save / "iter_0000010"), "the same checkpoint as"),
        (("--average", save / "iter_0000010", hf), "a Hugging Face folder"),
        (("--average", save / "iter_0000010"), "one checkpoint; name at least 2"),
        (("--average", save, "--last", "2", "--weight", "1", "--weight", "-1"), "--weight -1.0: an average takes"),
        (("--average", save, "--last", "2", "--base", save), "averaging takes no base"),
        (("--last", "2", "--base", save, "--adapted", save, "--alpha", "0.5"), "--last: only with --average"),
    ]
    merge_main = load_tool("merge").main
    capsys.readouterr()
    for args, message in refusals + [(("--average", save, "--last", "2"), "exists")]:
        out = tmp_path / ("cli" if message == "exists" else "refused")
        assert merge_main([*map(str, args), "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (args, err)
        assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_average_of_a_real_runs_last_three_checkpoints(domain_data, tmp_path):
    """The engine's own checkpoints (with optimizer state): the average of its last three saves,
    as a Megatron checkpoint that exports, against the mean of their model tensors."""
    from conftest import run_cpt

    proc, _ = run_cpt(tmp_path / "run", domain_data, "checkpoint.save_interval=5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    save = tmp_path / "run" / "checkpoints"
    request = select_checkpoints([save], 3, None)
    assert [c.name for c in request.checkpoints] == ["iter_0000010", "iter_0000015", "iter_0000020"]
    out = average_checkpoints(request, tmp_path / "avg", progress=False).outputs[0]
    got = tensors_of(out)
    inputs = [tensors_of(c) for c in request.checkpoints]
    model_keys = set(got)
    want = reference_mean([{k: t[k] for k in model_keys} for t in inputs], [1.0, 1.0, 1.0])
    assert all(torch.equal(got[k], want[k]) for k in want)
    export_hf(out, tmp_path / "avg_hf", quiet=True)  # the average exports like any checkpoint
    assert (tmp_path / "avg_hf" / "model.safetensors.index.json").is_file()
