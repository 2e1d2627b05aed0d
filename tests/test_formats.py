"""ellama_megatron/formats: one reader/writer per file format, used by every room that reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ellama_megatron.formats.atomic import atomic_file, write_json_atomic
from ellama_megatron.formats.hf_folder import CARRIED_FILES, HFFolder, HFFolderError, carry_hf_files
from ellama_megatron.formats.megatron_checkpoint import (
    OLD_RECORD_FILE,
    RECORD_FILE,
    CheckpointFormatError,
    checkpoint_root,
    folder_kind,
    locate,
    megatron_layout,
    read_record,
    saved_iteration,
    write_record,
)
from ellama_megatron.formats.safetensors import StreamingWriter, read_header, read_tensor
from ellama_megatron.formats.tokenizer_folder import TOKENIZER_FILES

PACKAGE = Path(__file__).resolve().parent.parent


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    writer = StreamingWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    return path


def test_rows_read_are_the_rows_of_the_whole_tensor(tmp_path):
    weight = torch.arange(40, dtype=torch.bfloat16).reshape(10, 4)
    scale = torch.tensor(3.5)
    path = write_safetensors(tmp_path / "t.safetensors", {"w": weight, "s": scale})
    header = read_header(path)
    assert torch.equal(read_tensor(path, header["w"]), weight)
    assert torch.equal(read_tensor(path, header["w"], (3, 7)), weight[3:7])
    assert read_tensor(path, header["w"], (10, 10)).shape == (0, 4)
    assert torch.equal(read_tensor(path, header["s"], (0, 0)), scale)  # a scalar is read whole


def test_one_safetensors_header_parser():
    """The 8-byte header length is decoded in formats/safetensors.py only, and no room opens
    safetensors files through the library's memory-mapped reader any more."""
    found = []
    for folder in ("ellama_megatron", "tools", "benchmarks", "recipes"):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            text = path.read_text()
            if re.search(r"""unpack\(\s*["']<Q["']""", text) or "safe_open" in text:
                found.append(str(path.relative_to(PACKAGE)))
    assert found == ["ellama_megatron/formats/safetensors.py"]


def test_atomic_file_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "sub" / "data.jsonl.gz"
    with pytest.raises(RuntimeError):
        with atomic_file(out) as tmp:
            assert tmp.parent == out.parent and tmp.name.endswith(".jsonl.gz")  # same suffix: same compression
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(out.parent.iterdir()) == []
    write_json_atomic(out.with_name("r.json"), {"a": [1, 2]})
    assert json.loads(out.with_name("r.json").read_text()) == {"a": [1, 2]}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_record_is_found_from_the_save_folder_or_one_checkpoint_in_it(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    release = megatron_layout(root)
    release.mkdir()
    (release / ".metadata").write_bytes(b"")
    (release / "metadata.json").write_text("{}")
    write_record(root, {"model": {"name": "tiny"}, "convert": {"source": "hf"}})
    assert (root / RECORD_FILE).is_file()
    assert checkpoint_root(release) == root
    found = locate(release)
    assert (found.root, found.folder, found.record["model"]) == (root, release, {"name": "tiny"})
    assert locate(root).folder == release
    assert folder_kind(root, "--base") == folder_kind(release, "--base") == "megatron"


def test_saved_iteration_is_what_megatrons_tracker_names(tmp_path):
    assert saved_iteration(tmp_path) == 0  # no checkpoint yet
    for text, iteration in (("20\n", 20), ("release", 0), ("", 0)):  # "": a tracker cut short
        (tmp_path / "latest_checkpointed_iteration.txt").write_text(text)
        assert saved_iteration(tmp_path) == iteration


def test_record_of_a_folder_written_under_the_old_name_is_read(tmp_path):
    (tmp_path / OLD_RECORD_FILE).write_text("model:\n  name: old\n")
    assert read_record(tmp_path)["model"] == {"name": "old"}


def test_a_folder_without_a_record_is_refused_naming_it(tmp_path):
    with pytest.raises(CheckpointFormatError, match=RECORD_FILE):
        locate(tmp_path)
    (tmp_path / RECORD_FILE).write_text("convert: {}\n")
    with pytest.raises(CheckpointFormatError, match="has no 'model' section"):
        read_record(tmp_path)
    with pytest.raises(
        CheckpointFormatError, match=r"neither a Hugging Face model folder \(no config.json\) nor a Megatron checkpoint"
    ):
        folder_kind(tmp_path, "--model")


def test_the_tokenizer_files_travel_with_the_weights(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "original").mkdir(parents=True)
    for name in (*TOKENIZER_FILES, "generation_config.json", "original/tokenizer.model", "model.safetensors"):
        (src / name).write_text(name)
    carried = carry_hf_files(src, dst, extra=("config.json",))
    assert set(TOKENIZER_FILES) <= set(CARRIED_FILES)
    assert carried == list(CARRIED_FILES)  # config.json is absent: not carried, no error
    assert not (dst / "model.safetensors").exists() and (dst / "original" / "tokenizer.model").is_file()


def test_hf_folder_shards_and_their_damage(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    a = torch.randn(4, 2)
    write_safetensors(folder / "model-00001-of-00002.safetensors", {"a": a})
    write_safetensors(folder / "model-00002-of-00002.safetensors", {"b": torch.ones(3)})
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    hf = HFFolder.open(folder)
    assert hf.shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert torch.equal(hf.read("a", (1, 3)), a[1:3]) and hf.shape("b") == (3,)
    assert hf.weight_files() == {*hf.shards, "model.safetensors.index.json"}

    index["weight_map"]["b"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFFolderError, match="maps b to model-00001-of-00002.safetensors, which does not contain it"):
        HFFolder.open(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    index["weight_map"]["b"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFFolderError, match="lists shards that are not in the folder"):
        HFFolder.open(folder)
    with pytest.raises(HFFolderError, match="not a directory"):
        HFFolder.open(folder / "config.json")


def test_formats_is_the_bottom_room():
    """formats/ imports no other room of the package (at any depth of its files): every room may
    read files through it without a cycle."""
    import ast

    others = []
    for path in sorted((PACKAGE / "ellama_megatron" / "formats").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            others += [
                f"{path.name}: {n}"
                for n in names
                if n.startswith("ellama_megatron.") and not n.startswith("ellama_megatron.formats")
            ]
    assert others == []


def test_finding_a_checkpoint_record_does_not_import_torch():
    """The launcher writes a run's record while preparing it, in a process that trains nothing."""
    import subprocess
    import sys

    code = "import sys, ellama_megatron.formats.megatron_checkpoint; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_indexed_dataset_pair_is_named_as_megatron_names_it(tmp_path):
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

    from ellama_megatron.formats import indexed_dataset

    prefix = tmp_path / "corpus_train"
    assert indexed_dataset.pair_paths(prefix) == (Path(get_bin_path(str(prefix))), Path(get_idx_path(str(prefix))))
    assert indexed_dataset.prefix_of(tmp_path / "corpus_train.bin") == prefix
    assert indexed_dataset.prefix_of(tmp_path / "corpus_train.idx") == prefix
    assert indexed_dataset.prefix_of(prefix) == prefix
    assert indexed_dataset.missing_files(prefix) == list(indexed_dataset.pair_paths(prefix))
    indexed_dataset.idx_path(prefix).touch()
    assert indexed_dataset.missing_files(prefix) == [indexed_dataset.bin_path(prefix)]
    assert not indexed_dataset.exists(prefix)


def test_indexed_dataset_writers_write_megatrons_bytes(tmp_path):
    """write_documents, write_payloads and concatenate give the bytes of Megatron's builder fed one
    document at a time (what Megatron-LM's preprocess_data does), and appear whole or not at all."""
    import numpy

    from ellama_megatron.formats import indexed_dataset

    docs = [[1, 2, 3, 9], [7, 9], [4, 4, 4, 4, 4, 9]]
    ref = indexed_dataset.builder(tmp_path / "ref", numpy.uint16)
    for d in docs:
        ref.add_document(numpy.array(d), [len(d)])
    indexed_dataset.finalize(ref, tmp_path / "ref")

    def same(prefix) -> bool:
        pairs = zip(indexed_dataset.pair_paths(tmp_path / "ref"), indexed_dataset.pair_paths(prefix))
        return all(a.read_bytes() == b.read_bytes() for a, b in pairs)

    assert same(indexed_dataset.write_documents(tmp_path / "docs", docs, numpy.uint16))
    for i, part in enumerate((docs[:1], docs[1:])):
        (tmp_path / f"part{i}").write_bytes(numpy.array(sum(part, []), dtype=numpy.uint16).tobytes())
    payloads = [(tmp_path / "part0", [4]), (tmp_path / "part1", numpy.array([2, 6]))]
    assert same(indexed_dataset.write_payloads(tmp_path / "payloads", payloads, numpy.uint16))
    (tmp_path / "whole").write_bytes(numpy.array(sum(docs, []), dtype=numpy.uint16).tobytes())
    one = [(tmp_path / "whole", [len(d) for d in docs])]
    assert same(indexed_dataset.write_payloads(tmp_path / "one_payload", one, numpy.uint16))
    indexed_dataset.write_documents(tmp_path / "first", docs[:2], numpy.uint16)
    indexed_dataset.write_documents(tmp_path / "rest", docs[2:], numpy.uint16)
    assert same(indexed_dataset.concatenate([tmp_path / "first", tmp_path / "rest"], tmp_path / "joined"))
    assert [s.tolist() for s in indexed_dataset.read_sequences(tmp_path / "joined")] == docs
    assert [s.tolist() for s in indexed_dataset.read_sequences(tmp_path / "joined", limit=2)] == docs[:2]

    def failing():
        yield docs[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        indexed_dataset.write_documents(tmp_path / "cut", failing(), numpy.uint16)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert not any("cut" in name for name in before)  # nothing half-written, no temporary left


def test_token_dtype_and_index_are_megatrons(tmp_path):
    """optimal_dtype and write_index, which spare preprocessing the import of Megatron-Core (and
    torch), choose and write what Megatron-Core does, for both dtypes and an empty dataset."""
    import numpy
    from megatron.core.datasets.indexed_dataset import DType

    from ellama_megatron.formats import indexed_dataset

    for vocab in (None, 1, 512, 65_499, 65_500, 128_256):
        assert indexed_dataset.optimal_dtype(vocab) is DType.optimal_dtype(vocab)
    for dtype, docs in (
        (numpy.uint16, [[5, 6, 2], [7, 2]]),
        (numpy.int32, [[128000, 70000, 128001]]),
        (numpy.int32, []),
    ):
        built = indexed_dataset.builder(tmp_path / "ref", dtype)
        for d in docs:
            built.add_document(numpy.array(d), [len(d)])
        indexed_dataset.finalize(built, tmp_path / "ref")
        indexed_dataset.write_index(tmp_path / "ours.idx", dtype, [len(d) for d in docs])
        assert (tmp_path / "ours.idx").read_bytes() == indexed_dataset.idx_path(tmp_path / "ref").read_bytes()
