"""tools/preprocess_data.py: the written datasets read back through Megatron's IndexedDataset
equal the tokenizer's own ids plus EOD; manifests count what was written; results do not depend
on workers, shards or input order; each bad input is counted and reported, or stops --strict."""

import json
import random
import subprocess
import sys

import numpy
import pytest
from conftest import REPO

from ellama_megatron.data.indexed_writer import BadRecordError
from ellama_megatron.data.preprocess import PreprocessOptions, preprocess
from ellama_megatron.data.readers import InputError
from ellama_megatron.data.serializers import RecordSerializer, load_template, serialize
from ellama_megatron.formats import indexed_dataset
from ellama_megatron.formats.tokenizer_folder import TokenizerFolderError, load_tokenizer_folder
from ellama_megatron.testing.demo_corpora import write_demo_corpora


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return write_demo_corpora(tmp_path_factory.mktemp("raw"), docs=120, seed=3)


def _run(inputs, prefix, data_tokenizer, template="listing", **kw):
    ser = RecordSerializer(load_template(template), id_key=kw.pop("id_key", None))
    opts = PreprocessOptions([str(i) for i in inputs], str(prefix), str(data_tokenizer), ser, progress=False, **kw)
    return preprocess(opts)


def _read_docs(prefix):
    ds = indexed_dataset.read(prefix)
    return [numpy.asarray(ds[i]).tolist() for i in range(len(ds))], ds


def test_round_trip_equals_tokenizer_output_plus_eod(tmp_path, data_tokenizer, corpora):
    from transformers import AutoTokenizer

    manifest = _run(
        [corpora["listings"]], tmp_path / "out" / "listings", data_tokenizer, valid_fraction=0.1, id_key="id"
    )
    hf = AutoTokenizer.from_pretrained(str(data_tokenizer))
    tpl = load_template("listing")
    records = [json.loads(line) for line in corpora["listings"].read_text().splitlines()]
    docs = {"train": [], "valid": []}
    from ellama_megatron.data.validation_split import is_validation

    for r in records:
        split = "valid" if is_validation(f"id:{r['id']}", 0.1) else "train"
        docs[split].append(hf(serialize(r, tpl)).input_ids + [hf.eos_token_id])
    assert 0 < len(docs["valid"]) < len(docs["train"])
    for split in ("train", "valid"):
        got, ds = _read_docs(tmp_path / "out" / f"listings_{split}")
        assert got == docs[split]
        assert ds.index.dtype == numpy.uint16  # vocab 400 < 65500, as Megatron-LM chooses
        m = manifest["splits"][split]
        assert m["documents"] == len(ds) == len(docs[split])
        assert m["tokens"] == int(ds.sequence_lengths.sum())
        assert sum(e["documents"] for e in m["languages"].values()) == m["documents"]
        assert sum(e["tokens"] for e in m["languages"].values()) == m["tokens"]
        assert set(m["languages"]) == {"en", "de", "fr"}
        assert list(ds.document_indices) == list(range(len(ds) + 1))  # one sequence per document
    on_disk = json.loads((tmp_path / "out" / "listings.manifest.json").read_text())
    assert on_disk == manifest
    assert (
        on_disk["inputs"][0]["records"] == 120 and on_disk["inputs"][0]["bytes"] == corpora["listings"].stat().st_size
    )
    assert on_disk["tokenizer"]["vocab_size"] == len(hf) and on_disk["tokenizer"]["eos_token_id"] == hf.eos_token_id
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


def test_output_equals_megatron_builder_document_by_document(tmp_path, data_tokenizer, corpora):
    """What Megatron-LM's preprocess_data does per document: builder.add_document(ids+eod, [len])."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    _run([corpora["reviews"]], tmp_path / "ours", data_tokenizer, template="review")
    docs, _ = _read_docs(tmp_path / "ours_train")
    builder = IndexedDatasetBuilder(str(indexed_dataset.bin_path(tmp_path / "ref")), dtype=numpy.uint16)
    for d in docs:
        builder.add_document(numpy.array(d), [len(d)])
    builder.finalize(str(indexed_dataset.idx_path(tmp_path / "ref")))
    for ours, ref in zip(
        indexed_dataset.pair_paths(tmp_path / "ours_train"), indexed_dataset.pair_paths(tmp_path / "ref")
    ):
        assert ours.read_bytes() == ref.read_bytes()


def test_int32_merge_for_large_vocabularies(tmp_path):
    from ellama_megatron.data.indexed_writer import merge_parts
    from ellama_megatron.formats.tokenizer_folder import TokenizerInfo

    assert TokenizerInfo("x", "x", 128256, 128001, 128000, "", "").dtype == numpy.int32
    docs = [[128000, 70000, 5, 128001], [128000, 128001]]
    flat = numpy.array(sum(docs, []), dtype=numpy.int32)
    (tmp_path / "p_train.tokens").write_bytes(flat.tobytes())
    numpy.save(tmp_path / "p_train.lengths.npy", numpy.array([4, 2]))
    merge_parts([str(tmp_path / "p_train")], str(tmp_path / "m"), numpy.int32)
    got, ds = _read_docs(tmp_path / "m")
    assert got == docs and ds.index.dtype == numpy.int32


def test_same_output_for_any_workers_shards_and_order(tmp_path, data_tokenizer, corpora):
    lines = corpora["listings"].read_text().splitlines(keepends=True)
    random.Random(0).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(lines))
    a = _run([corpora["listings"]], tmp_path / "a", data_tokenizer, valid_fraction=0.2, id_key="id")
    b = _run(
        [corpora["listings"]],
        tmp_path / "b",
        data_tokenizer,
        valid_fraction=0.2,
        id_key="id",
        workers=2,
        shard_bytes=20_000,
    )
    c = _run([shuffled], tmp_path / "c", data_tokenizer, valid_fraction=0.2, id_key="id")
    for split in ("train", "valid"):
        for a_file, b_file in zip(
            indexed_dataset.pair_paths(tmp_path / f"a_{split}"), indexed_dataset.pair_paths(tmp_path / f"b_{split}")
        ):
            assert a_file.read_bytes() == b_file.read_bytes()
    strip = lambda m: {k: {**v, "prefix": None} for k, v in m["splits"].items()}  # noqa: E731
    assert strip(a) == strip(b)
    # Shuffled input: the same documents are held out (chosen by id, not position).
    va, _ = _read_docs(tmp_path / "a_valid")
    vc, _ = _read_docs(tmp_path / "c_valid")
    assert sorted(va) == sorted(vc) and a["splits"]["valid"]["documents"] == c["splits"]["valid"]["documents"]


def _bad_corpus(path):
    good = {"title": "Good item", "description": "<p>fine</p>", "language": "en"}
    path.write_bytes(
        (json.dumps(good) + "\n").encode()
        + b'{"title": "cut off\n'  # line 2: malformed
        + b'{"title": "Sch\xf6n"}\n'  # line 3: latin-1, not UTF-8
        + b'{"title": "", "description": ""}\n'  # line 4: missing required title
        + b'{"title": "   "}\n'  # line 5: whitespace only -> missing title
        + (json.dumps({**good, "title": "Second good"}) + "\n").encode()
    )
    return path


def test_bad_records_are_counted_reported_and_skipped(tmp_path, data_tokenizer):
    src = _bad_corpus(tmp_path / "bad.jsonl")
    m = _run([src], tmp_path / "o", data_tokenizer)
    assert m["splits"]["train"]["documents"] == 2 and m["records"] == 6
    assert m["skipped"]["count"] == 4
    assert m["skipped"]["by_reason"] == {
        "malformed JSON": 1,
        "not UTF-8": 1,
        "missing field 'title'": 2,
    }
    assert [(e["location"], e["file"]) for e in m["skipped"]["examples"]] == [
        (f"line {i}", str(src)) for i in (2, 3, 4, 5)
    ]


def test_empty_documents_are_skipped(tmp_path, data_tokenizer):
    src = tmp_path / "plain.jsonl"
    src.write_text(json.dumps({"text": "hello world"}) + "\n" + json.dumps({"text": " \n "}) + "\n")
    m = _run([src], tmp_path / "o", data_tokenizer, template="plain")
    assert m["splits"]["train"]["documents"] == 1
    assert m["skipped"]["by_reason"] == {"missing field 'text'": 1}
    tpl = tmp_path / "t.yaml"  # a template whose fields are all optional can render an empty document
    tpl.write_text('text: "{text}"\n')
    opts = PreprocessOptions(
        [str(src)],
        str(tmp_path / "o2"),
        str(data_tokenizer),
        RecordSerializer(load_template(str(tpl))),
        progress=False,
    )
    assert preprocess(opts)["skipped"]["by_reason"] == {"empty document": 1}


def test_strict_stops_at_first_bad_record_and_leaves_nothing(tmp_path, data_tokenizer):
    src = _bad_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(BadRecordError, match=r"bad.jsonl, line 2: malformed JSON"):
        _run([src], tmp_path / "out" / "o", data_tokenizer, strict=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_output_exists_fails_unless_overwrite(tmp_path, data_tokenizer, corpora):
    _run([corpora["reviews"]], tmp_path / "r", data_tokenizer, template="review", valid_fraction=0.3)
    with pytest.raises(InputError, match="output exists.*--overwrite"):
        _run([corpora["reviews"]], tmp_path / "r", data_tokenizer, template="review")
    m = _run([corpora["reviews"]], tmp_path / "r", data_tokenizer, template="review", overwrite=True)
    assert "valid" not in m["splits"] and not indexed_dataset.bin_path(tmp_path / "r_valid").exists()  # no stale split


def test_tokenizer_folder_that_is_not_one(tmp_path):
    with pytest.raises(TokenizerFolderError, match="not a folder"):
        load_tokenizer_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(TokenizerFolderError, match="no tokenizer.json"):
        load_tokenizer_folder(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerFolderError, match="cannot load"):
        load_tokenizer_folder(tmp_path / "broken")


def test_tokenizer_folder_is_cached_by_its_files(tmp_path, data_tokenizer, monkeypatch):
    """What transformers makes of a folder is loaded once: a second process gets the same answer
    without importing transformers; a folder with other files is loaded through transformers again."""
    import shutil

    from ellama_megatron.formats.tokenizer_folder import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    first = load_tokenizer_folder(data_tokenizer)
    code = (
        "import sys; from ellama_megatron.formats.tokenizer_folder import load_tokenizer_folder as load; "
        "i = load(sys.argv[1]); print('transformers' in sys.modules, i.vocab_size, i.eos_id, i.bos_id, i.sha256, "
        "len(i.backend_json))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(data_tokenizer)], capture_output=True, text=True, check=True)
    expected = [first.vocab_size, first.eos_id, first.bos_id, first.sha256, len(first.backend_json)]
    assert out.stdout.split() == ["False", *map(str, expected)]
    assert load_tokenizer_folder(data_tokenizer) == first
    other = shutil.copytree(data_tokenizer, tmp_path / "other")
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["eos_token"] = config["bos_token"]
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer_folder(other).eos_id == first.bos_id != first.eos_id


def test_template_that_fits_no_record_fails_before_work(tmp_path, data_tokenizer, corpora):
    with pytest.raises(InputError, match="none of the first 100 records fits template 'review'.*keys seen"):
        _run([corpora["general_en"]], tmp_path / "o", data_tokenizer, template="review")


@pytest.mark.slow
def test_cli_summary_and_errors(tmp_path, data_tokenizer, corpora):
    def cli(tokenizer, prefix):
        cmd = [
            sys.executable,
            str(REPO / "tools" / "preprocess_data.py"),
            "--input",
            str(corpora["general_en"]),
            "--tokenizer",
            str(tokenizer),
            "--output-prefix",
            str(prefix),
            "--quiet",
            "--valid-fraction",
            "0.1",
        ]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)

    out = cli(data_tokenizer, tmp_path / "g")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("g: 1")
    again = cli(data_tokenizer, tmp_path / "g")
    assert again.returncode == 2 and "output exists" in again.stderr
    bad_tok = cli(tmp_path, tmp_path / "h")
    assert bad_tok.returncode == 2 and "no tokenizer.json" in bad_tok.stderr
