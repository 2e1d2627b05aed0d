"""tools/prepare_data.py (data/pipeline.py, datatrove's executors): N task outputs read back through
Megatron's IndexedDataset hold exactly preprocess_data.py's documents (same held-out split), their
manifests sum to the source manifest that tools/plan_blend.py reads; a rerun skips completed tasks
and redoes a failed one from its start; the classifier filter step keeps exactly the documents
scored above the threshold; on a real Slurm, a job array whose failed element is rerun alone ends
with the local executor's outputs."""

import json
import random
from pathlib import Path

import numpy
import pytest

from ellama_megatron.data.manifest import read_manifest
from ellama_megatron.data.pipeline import FAIL_TASK_ENV, ExecutorSettings, prepare, task_prefix
from ellama_megatron.data.preprocess import PreprocessOptions, preprocess
from ellama_megatron.data.readers import InputError
from ellama_megatron.data.serializers import RecordSerializer, load_template
from ellama_megatron.formats import indexed_dataset
from ellama_megatron.testing.demo_corpora import write_demo_corpora

SOURCES = {"listings": "listing", "general_en": "plain"}  # source -> template


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return write_demo_corpora(tmp_path_factory.mktemp("raw"), docs=1500, seed=5)  # ~2 MB in these two sources


def _opts(corpus, prefix, data_tokenizer, template, **kw) -> PreprocessOptions:
    return PreprocessOptions(
        [str(corpus)],
        str(prefix),
        str(data_tokenizer),
        RecordSerializer(load_template(template), id_key=kw.pop("id_key", "id")),
        valid_fraction=0.1,
        progress=False,
        shard_bytes=kw.pop("shard_bytes", 64 << 10),
        **kw,
    )


def _docs(prefix) -> list[list[int]]:
    return [numpy.asarray(ids).tolist() for ids in indexed_dataset.read_sequences(prefix)]


def _task_files(prefix: Path, tasks: int) -> dict[str, bytes]:
    out = {}
    for r in range(tasks):
        for split in ("train", "valid"):
            for path in indexed_dataset.pair_paths(f"{task_prefix(prefix, r, tasks)}_{split}"):
                if path.exists():
                    out[path.name] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, data_tokenizer, corpora):
    """preprocess_data.py's outputs and the local executor's (4 tasks) for each source."""
    tmp = tmp_path_factory.mktemp("local")
    runs = {}
    for source, template in SOURCES.items():
        ref = preprocess(_opts(corpora[source], tmp / "ref" / source, data_tokenizer, template))
        opts = _opts(corpora[source], tmp / "tasks" / source, data_tokenizer, template)
        manifest = prepare(opts, ExecutorSettings("local", tasks=4))
        runs[source] = (ref, manifest, tmp / "ref" / source, tmp / "tasks" / source, opts)
    return runs


def test_local_tasks_hold_exactly_preprocess_datas_documents_and_manifests_sum(local_runs):
    from ellama_megatron.data.blend_plan import plan_blend

    for source, (ref, manifest, ref_prefix, prefix, _) in local_runs.items():
        assert manifest == read_manifest(f"{prefix}.manifest.json") and manifest["tasks"] == 4
        for split in ("train", "valid"):
            expected = _docs(f"{ref_prefix}_{split}")
            parts = manifest["splits"][split]["parts"]
            assert len(parts) == 4, source  # every task got documents of both splits
            got = [d for p in parts for d in _docs(prefix.parent / p["prefix"])]
            # Same documents, same split (by hash), and in rank order even the same order.
            assert got == expected, (source, split)
            task = [read_manifest(f"{task_prefix(prefix, r, 4)}.manifest.json")["splits"][split] for r in range(4)]
            assert [p["documents"] for p in parts] == [t["documents"] for t in task]
            for key in ("documents", "tokens", "text_bytes", "languages"):
                assert manifest["splits"][split][key] == ref["splits"][split][key], (source, split, key)
            assert sum(t["tokens"] for t in task) == ref["splits"][split]["tokens"]
        assert manifest["records"] == ref["records"]
        assert [(i["path"], i["sha256"], i["records"]) for i in manifest["inputs"]] == [
            (i["path"], i["sha256"], i["records"]) for i in ref["inputs"]
        ]
        for key in ("tokenizer", "documents", "template", "split_by", "valid_fraction"):
            assert manifest[key] == ref[key]

    # plan_blend reads the source manifest: one weight per task part, by its tokens, no merge step.
    ref, manifest, _, prefix, _ = local_runs["listings"]
    cfg = {
        "groups": {
            "all": {"share": 1.0, "sources": {"listings": {"share": 1.0, "manifests": [f"{prefix}.manifest.json"]}}}
        }
    }
    plan = plan_blend(cfg, train_tokens=1000, seq_length=100)
    train = plan.to_blend_dict()["train"]
    parts = manifest["splits"]["train"]["parts"]
    assert [Path(e["prefix"]).name for e in train] == [p["prefix"] for p in parts]
    assert [e["weight"] for e in train] == pytest.approx(
        [p["tokens"] / ref["splits"]["train"]["tokens"] for p in parts]
    )
    assert len(plan.to_blend_dict()["valid"]["all"]) == 4


def test_rerun_skips_completed_tasks_and_redoes_a_failed_one(tmp_path, local_runs, monkeypatch):
    ref, manifest, _, done_prefix, opts = local_runs["listings"]
    # Completed: nothing reruns, nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in done_prefix.parent.glob(f"{done_prefix.name}-*")}
    assert prepare(opts, ExecutorSettings("local", tasks=4)) == manifest
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Other options on the same prefix: refused before any work, naming what differs.
    with pytest.raises(InputError, match=r"other options \(differing: tasks\).*--overwrite"):
        prepare(opts, ExecutorSettings("local", tasks=3))
    with pytest.raises(InputError, match="--partition: needed with --executor slurm"):
        prepare(opts, ExecutorSettings("slurm", tasks=4))

    # Task 2 fails after its first batch: the local executor stops there (tasks 0 and 1 are done),
    # the source manifest waits.
    fresh = PreprocessOptions(**{**opts.__dict__, "output_prefix": str(tmp_path / "listings")})
    monkeypatch.setenv(FAIL_TASK_ENV, "2")
    with pytest.raises(RuntimeError, match="fails after its first batch"):
        prepare(fresh, ExecutorSettings("local", tasks=4))
    partial = tmp_path / f".{Path(task_prefix(tmp_path / 'listings', 2, 4)).name}.tmp"
    assert (partial / "part_train.tokens").stat().st_size > 0  # what a killed task leaves
    assert not (tmp_path / "listings.manifest.json").exists()
    completed = sorted(p.name for p in (tmp_path / "listings.prepare" / "completions").iterdir())
    assert completed == ["00000", "00001"]
    stamps = {r: Path(f"{task_prefix(tmp_path / 'listings', r, 4)}.manifest.json").stat().st_mtime_ns for r in (0, 1)}
    monkeypatch.delenv(FAIL_TASK_ENV)
    again = prepare(fresh, ExecutorSettings("local", tasks=4))
    assert not partial.exists()
    assert {
        r: Path(f"{task_prefix(tmp_path / 'listings', r, 4)}.manifest.json").stat().st_mtime_ns for r in (0, 1)
    } == stamps
    assert _task_files(tmp_path / "listings", 4) == _task_files(done_prefix, 4)  # replaced, not appended to
    assert again["splits"] == manifest["splits"]


def test_domain_filter_step_keeps_exactly_the_documents_over_the_threshold(tmp_path, data_tokenizer, corpora):
    from tokenizers import Tokenizer

    from ellama_megatron.classify.features import FeatureConfig
    from ellama_megatron.classify.filter import DomainFilter
    from ellama_megatron.classify.model import save_classifier, train_classifier
    from ellama_megatron.data.readers import read_records
    from ellama_megatron.data.serializers import serialize

    listing = load_template("listing")
    pos = [serialize(r.record, listing) for r in read_records([str(corpora["listings"])])][:300]
    neg = [r.record["text"] for r in read_records([str(corpora["general_en"])])][:300]
    clf, _, _ = train_classifier(pos, neg, FeatureConfig(n_features=1 << 14), heldout_fraction=0.0)
    save_classifier(clf, tmp_path / "clf")
    # A mixed corpus as plain text: listings and general prose interleaved.
    rng = random.Random(0)
    texts = (
        pos[300:]
        + [serialize(r.record, listing) for r in read_records([str(corpora["listings"])])][300:600]
        + neg[:300]
    )
    rng.shuffle(texts)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    scores = DomainFilter(tmp_path / "clf").scores(texts)
    threshold = float(numpy.quantile(scores, 0.5))
    opts = PreprocessOptions(
        [str(mixed)],
        str(tmp_path / "out" / "web"),
        str(data_tokenizer),
        RecordSerializer(load_template("plain")),
        progress=False,
        shard_bytes=32 << 10,
        domain_filter=str(tmp_path / "clf"),
        domain_threshold=threshold,
    )
    manifest = prepare(opts, ExecutorSettings("local", tasks=3))
    tok, eod = (
        Tokenizer.from_file(str(data_tokenizer / "tokenizer.json")),
        manifest["documents"]["eod"]["token_id"],
    )
    expected = [tok.encode(t).ids + [eod] for t, s in zip(texts, scores) if s > threshold]
    got = [d for p in manifest["splits"]["train"]["parts"] for d in _docs(tmp_path / "out" / p["prefix"])]
    assert 0 < len(got) < len(texts)
    assert got == expected
    df = manifest["domain_filter"]
    assert (df["docs"], df["kept"], df["threshold"]) == (len(texts), len(expected), threshold)
    assert sum(b["docs"] for b in df["histogram"]) == len(texts)


@pytest.mark.slurm
def test_slurm_array_rerun_completes_only_the_failed_task(slurm_cluster, tmp_path, local_runs, monkeypatch):
    ref, manifest, _, local_prefix, opts = local_runs["general_en"]
    prefix = tmp_path / "general_en"
    slurm_opts = PreprocessOptions(**{**opts.__dict__, "output_prefix": str(prefix)})
    settings = ExecutorSettings(
        "slurm", tasks=4, partition="local", time="00:10:00", wait=True, job_name="h17-prepare-test"
    )
    monkeypatch.setenv(FAIL_TASK_ENV, "1")
    with pytest.raises(InputError, match=r"tasks \[1\] did not complete.*rerun the same command"):
        prepare(slurm_opts, settings)
    monkeypatch.delenv(FAIL_TASK_ENV)
    rdir = Path(f"{prefix}.prepare")
    assert json.loads((rdir / "ranks_to_run.json").read_text()) == [0, 1, 2, 3]
    stamps = {r: Path(f"{task_prefix(prefix, r, 4)}.manifest.json").stat().st_mtime_ns for r in (0, 2, 3)}
    again = prepare(slurm_opts, settings)
    assert json.loads((rdir / "ranks_to_run.json").read_text()) == [1]  # only the failed task was submitted
    assert {r: Path(f"{task_prefix(prefix, r, 4)}.manifest.json").stat().st_mtime_ns for r in (0, 2, 3)} == stamps
    assert _task_files(prefix, 4) == _task_files(local_prefix, 4)
    assert again["splits"] == manifest["splits"]
    script = (rdir / "launch_script.slurm").read_text()
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --requeue" in script and "--array=0-0" in script
