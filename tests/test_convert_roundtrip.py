"""tools/convert_hf.py on tiny random Llama checkpoints: keys as Megatron builds them, logits as
transformers computes them, export bit-identical, memory bounded by a tensor, not by the model."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from ellama_megatron.convert.exporter import export_hf
from ellama_megatron.convert.importer import import_hf
from ellama_megatron.formats.megatron_checkpoint import find_checkpoint
from ellama_megatron.formats.safetensors import read_header, read_tensor
from ellama_megatron.formats.torch_dist import CheckpointReader
from ellama_megatron.llama import weights as W
from ellama_megatron.llama.config import load_model_config
from ellama_megatron.run.plan import padded_vocab_size

# Untied, GQA (4 heads, 2 groups), Llama 3.1 RoPE scaling: the tiny preset. Tied: Llama 3.2's tied
# embeddings with Llama 3's unscaled RoPE.
VARIANTS = {
    "untied_llama31": {},
    "tied_llama3": {"tie_word_embeddings": True, "rope_scaling_factor": None},
}


def make_hf(out: Path, tokenizer: Path, seed: int = 0, shard: str = "100KB", **changes) -> Path:
    """A tiny random Hugging Face Llama folder with ``tokenizer`` (conftest's tiny_tokenizer), in
    several shards."""
    from ellama_megatron.testing.tiny_llama import write_random_hf_llama

    cfg = dataclasses.replace(load_model_config("tiny"), **changes)
    return write_random_hf_llama(out, cfg, seed=seed, tokenizer_dir=tokenizer, max_shard_size=shard)


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, entry in read_header(f).items():
            tensors[name] = read_tensor(f, entry)
    return tensors


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def imported(request, tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp(request.param)
    hf = make_hf(root / "hf", tiny_tokenizer, **VARIANTS[request.param])
    stats = import_hf(hf, root / "ckpt", verify=True, quiet=True)
    return hf, root / "ckpt", stats


def test_import_reproduces_transformers_logits(imported):
    _, _, stats = imported
    v = stats["verify"]
    assert v["max_abs_logit_diff"] < 1e-4
    assert v["top1_agreement"] == 1.0
    assert stats["tensors"] == len(hf_tensors(imported[0]))


def test_verify_in_bfloat16(imported):
    """The bfloat16 path (what a 70B verify uses): both models in bfloat16, compared at its tolerance."""
    from ellama_megatron.convert.verify import DEFAULT_TOLERANCE, verify_conversion

    hf, ckpt, _ = imported
    v = verify_conversion(hf, ckpt, dtype="bfloat16", device="cpu")
    assert (v["dtype"], v["device"], v["tolerance"]) == ("bfloat16", "cpu", DEFAULT_TOLERANCE["bfloat16"])
    assert v["max_abs_logit_diff"] <= 1e-2 and v["top1_agreement"] == 1.0


def test_checkpoint_has_exactly_megatrons_keys(imported):
    """The keys, global shapes and objects of GPTModel.sharded_state_dict() at TP=1 PP=1."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from ellama_megatron.convert.verify import init_single_process_group
    from ellama_megatron.formats.megatron_checkpoint import read_record
    from ellama_megatron.llama.config import LlamaConfig
    from ellama_megatron.llama.megatron import CPU_MODEL_ARGS, build_gpt_model, layer_spec, transformer_config
    from ellama_megatron.runtime.cpu import apply_cpu_runtime

    _, ckpt, _ = imported
    cfg = LlamaConfig.from_dict(read_record(ckpt)["model"])
    apply_cpu_runtime()
    init_single_process_group()
    model = build_gpt_model(cfg, transformer_config(cfg, "local", CPU_MODEL_ARGS), layer_spec("local", "sdpa"), 512)
    expected_tensors, expected_objects = {}, set()
    for sh in model.sharded_state_dict().values():
        if isinstance(sh, ShardedTensorFactory):
            sh = sh.build()
            sh = sh[0] if isinstance(sh, list) else sh
        if isinstance(sh, ShardedTensor):
            expected_tensors[sh.key] = tuple(sh.global_shape)
        elif isinstance(sh, ShardedObject):
            expected_objects.add(sh.unique_key)
    md = CheckpointReader(find_checkpoint(ckpt)).metadata.state_dict_metadata
    tensors = {k: tuple(v.size) for k, v in md.items() if hasattr(v, "size")}
    objects = set(md) - set(tensors) - {"common_state/shard_0_1"}
    assert tensors == expected_tensors
    assert objects == expected_objects
    # The table's state-dict names (local spec) are the model's parameter names.
    names = set(model.state_dict())
    for m in W.mappings(cfg):
        for layer in W.layers_of(m, cfg):
            assert m.state_dict_name(layer, "local") in names


# How the export's bytes travel: copied from file to file in the kernel (what an importer checkpoint
# gets), the same through a buffer where copy_file_range is refused (another filesystem), and read
# into memory and written (a checkpoint whose rows are not plain bytes on disk).
EXPORT_PATHS = ("kernel copy", "buffered copy", "through memory")


@pytest.mark.parametrize("path", EXPORT_PATHS)
def test_export_gives_back_every_tensor_bit_identical(imported, tmp_path, monkeypatch, path):
    hf, ckpt, _ = imported
    if path == "buffered copy":

        def refused(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refused)
    elif path == "through memory":
        monkeypatch.setattr(CheckpointReader, "byte_ranges", lambda *args: None)
    stats = export_hf(ckpt, tmp_path / "out", max_shard_bytes=150_000, quiet=True)
    out = tmp_path / "out"
    src, back = hf_tensors(hf), hf_tensors(out)
    assert stats["copied_tensors"] == (0 if path == "through memory" else len(src)) and stats["tensors"] == len(src)
    assert set(src) == set(back)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name].view(torch.uint8), t.view(torch.uint8)), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src) and stats["shards"] > 1
    for f in set(index["weight_map"].values()):
        assert (out / f).stat().st_size <= 150_000 + 4096  # tensors + header
    assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").exists()


def test_reads_go_straight_into_place_and_equal_torchs_reader(imported, monkeypatch):
    """The export reads the import's tensors from the .distcp straight into place, each the same
    bytes as torch's own reader gives (formats/torch_dist.py, ``_read_in_place``)."""
    _, ckpt, _ = imported
    fast, slow = CheckpointReader(find_checkpoint(ckpt)), CheckpointReader(find_checkpoint(ckpt))
    monkeypatch.setattr(slow, "_read_in_place", lambda *args: False)
    reads = 0
    for key, md in fast.metadata.state_dict_metadata.items():
        if not hasattr(md, "chunks"):
            continue
        for layer in (None, 1) if key.startswith("decoder.layers.") else (None,):
            a, b = fast.read(key, layer), slow.read(key, layer)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            reads += 1
    assert fast.in_place_reads == reads > 10 and slow.in_place_reads == 0


def test_a_tensor_saved_as_a_view_is_read_by_torchs_reader(tmp_path):
    """A chunk saved with other strides than a plain tensor's (torch.save keeps a transposed view's)
    is not the plain bytes the in-place read expects: torch's reader reads it, with the same result.
    (A slice is saved as a tensor of its own: it is read in place.)"""
    import torch.distributed.checkpoint as dcp

    big = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    saved = {"transposed": big.t(), "slice": big[2:5], "plain": big.clone()}
    dcp.save(saved, checkpoint_id=tmp_path, no_dist=True)
    reader = CheckpointReader(tmp_path)
    in_place = {}
    for key, t in saved.items():
        before = reader.in_place_reads
        assert torch.equal(reader.read(key), t), key
        in_place[key] = reader.in_place_reads - before
    assert in_place == {"transposed": 0, "slice": 1, "plain": 1}


def test_byte_ranges_of_rows_across_stored_chunks(tmp_path):
    """Rows of a layer stored in two chunks (a TP split of a column-parallel layer) lie on disk as
    two file ranges holding exactly their bytes; rows of chunks split across the columns (a
    row-parallel layer's) are not one run of bytes per chunk: None (one row alone is: two ranges),
    and read() still gives them whole (torch's reader)."""
    from ellama_megatron.formats.file_ranges import copy_ranges
    from ellama_megatron.formats.torch_dist import TensorChunk, write_checkpoint

    full = torch.arange(3 * 8 * 6, dtype=torch.bfloat16).reshape(3, 8, 6)
    chunks = []
    for layer in range(3):
        for key, dim in (("rows", 1), ("columns", 2)):
            half = full.shape[dim] // 2
            for i in range(2):
                offset = [layer, 0, 0]
                offset[dim] = i * half
                part = full[layer : layer + 1].narrow(dim, i * half, half).clone()
                chunks.append(
                    TensorChunk(key, (3, 8, 6), tuple(offset), tuple(part.shape), part.dtype, lambda p=part: p)
                )
    write_checkpoint(tmp_path, chunks, {}, {})
    reader = CheckpointReader(tmp_path)
    ranges = reader.byte_ranges("rows", 1, (2, 7))
    assert [r.length for r in ranges] == [2 * 6 * 2, 3 * 6 * 2]  # rows 2-3 of one chunk, 4-6 of the other
    with open(tmp_path / "copied", "wb") as f:
        copy_ranges(ranges, f.fileno())
    copied = torch.frombuffer(bytearray((tmp_path / "copied").read_bytes()), dtype=torch.bfloat16)
    assert torch.equal(copied, full[1, 2:7].reshape(-1))
    assert reader.byte_ranges("columns", 1) is None and reader.byte_ranges("columns", 1, (0, 2)) is None
    assert [r.length for r in reader.byte_ranges("columns", 1, (5, 6))] == [3 * 2, 3 * 2]
    before = reader.in_place_reads
    assert torch.equal(reader.read("columns", 2), full[2]) and reader.in_place_reads == before
    assert torch.equal(reader.read("rows", 2), full[2]) and reader.in_place_reads == before + 1


def test_a_truncated_source_range_is_named(tmp_path):
    from ellama_megatron.formats.file_ranges import FileRange, copy_ranges

    (tmp_path / "src").write_bytes(b"x" * 100)
    with open(tmp_path / "dst", "wb") as f, pytest.raises(ValueError, match="src: ends before byte 150"):
        copy_ranges([FileRange(tmp_path / "src", 50, 100)], f.fileno())


def test_a_filesystem_whose_copy_file_range_answers_nothing_gets_the_bytes(tmp_path, monkeypatch):
    """Some filesystems (FUSE, /proc) answer 0 bytes where they cannot copy, not an error: that is
    not taken for the end of the file."""
    from ellama_megatron.formats.file_ranges import FileRange, copy_ranges

    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)
    data = bytes(range(256)) * 40
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "dst", "wb") as f:
        copy_ranges([FileRange(tmp_path / "src", 1000, 5000), FileRange(tmp_path / "src", 3, 7)], f.fileno())
    assert (tmp_path / "dst").read_bytes() == data[1000:6000] + data[3:10]


def test_exported_config_reads_the_same_in_transformers_4_and_5(imported, tmp_path):
    from transformers import AutoConfig

    hf, ckpt, _ = imported
    export_hf(ckpt, tmp_path / "out", quiet=True)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    source = AutoConfig.from_pretrained(hf)
    assert written["rope_theta"] == source.rope_parameters["rope_theta"]  # what transformers 4 reads
    if source.rope_parameters["rope_type"] == "llama3":
        assert written["rope_scaling"]["rope_type"] == "llama3"
        assert written["rope_scaling"]["factor"] == source.rope_parameters["factor"]
    else:
        assert written["rope_scaling"] is None
    again = AutoConfig.from_pretrained(tmp_path / "out")
    assert again.rope_parameters == source.rope_parameters
    assert again.tie_word_embeddings == source.tie_word_embeddings


def test_fused_qkv_layout_is_per_query_group():
    cfg = load_model_config("tiny")  # 4 heads, 2 groups, head dim 16
    d, h = cfg.kv_channels, cfg.hidden_size
    q = torch.arange(4 * d).repeat_interleave(h).view(4 * d, h).float()
    k = 1000 + torch.arange(2 * d).repeat_interleave(h).view(2 * d, h).float()
    v = 2000 + torch.arange(2 * d).repeat_interleave(h).view(2 * d, h).float()
    qkv = next(m for m in W.mappings(cfg) if isinstance(m, W.QKVMapping))
    fused = qkv.to_megatron(cfg, 512, [q, k, v])
    # group 0: query heads 0-1, k head 0, v head 0; group 1: query heads 2-3, k head 1, v head 1
    expected = torch.cat([q[: 2 * d], k[:d], v[:d], q[2 * d :], k[d:], v[d:]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(qkv.to_hf(cfg, fused), (q, k, v)))


def test_vocab_padding_for_target_tp(tmp_path, tiny_tokenizer):
    hf = make_hf(tmp_path / "hf", tiny_tokenizer, vocab_size=500)
    import_hf(hf, tmp_path / "ckpt", target_tp=2, quiet=True)
    reader = CheckpointReader(find_checkpoint(tmp_path / "ckpt"))
    emb = reader.read("embedding.word_embeddings.weight")
    assert emb.shape[0] == padded_vocab_size(500, 2) == 512
    assert torch.equal(emb[:500], hf_tensors(hf)["model.embed_tokens.weight"]) and not emb[500:].any()
    export_hf(tmp_path / "ckpt", tmp_path / "back", quiet=True)
    assert hf_tensors(tmp_path / "back")["lm_head.weight"].shape[0] == 500


def _peak_rss_of_import(hf: Path, out: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "tools/convert_hf.py", "import", "--hf-dir", str(hf), "--out", str(out), "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


@pytest.mark.slow
def test_import_memory_is_bounded_by_a_tensor_not_the_model(tmp_path, tiny_tokenizer):
    """Peak RSS above the same tool's on a tiny model stays well under the modest model's size."""
    tiny = make_hf(tmp_path / "tiny", tiny_tokenizer)
    modest = make_hf(
        tmp_path / "modest",
        tiny_tokenizer,
        shard="60MB",
        num_layers=8,
        hidden_size=512,
        ffn_hidden_size=2048,
        num_attention_heads=8,
        num_query_groups=2,
        kv_channels=64,
        vocab_size=8192,
    )
    model_bytes = sum(f.stat().st_size for f in modest.glob("*.safetensors"))
    largest_group = 2 * 8192 * 512 * 4  # the embedding and its padded copy
    baseline = _peak_rss_of_import(tiny, tmp_path / "tiny_ckpt")
    peak = _peak_rss_of_import(modest, tmp_path / "modest_ckpt")
    assert model_bytes > 140e6
    assert peak - baseline < max(3 * largest_group, model_bytes // 4), (peak - baseline, model_bytes)
