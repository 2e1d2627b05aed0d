"""Token ids outside the model's vocabulary in datasets written by another tool (Megatron's own
IndexedDatasetBuilder, no manifest): refused before the launch when a sampled document holds one,
and by the ranks, naming the prefix, the document and the id, when only a document the sample
passed over does (engine/token_ids.py, run/faults.py: bad_data). The check leaves the losses as they
are."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import types
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_RUN, data_overrides, run_cpt, write_domain_datasets

from ellama_megatron.data.vocabulary_check import SAMPLED_DOCUMENTS, sampled_out_of_vocabulary
from ellama_megatron.engine.token_ids import SampleOrigins, TokenIdCheck
from ellama_megatron.formats import indexed_dataset
from ellama_megatron.formats.indexed_dataset import read_documents
from ellama_megatron.run.checks import check_data_matches_model
from ellama_megatron.run.faults import EXIT_BAD_DATA, BadData, LaunchEnd, RankFailure, classify, decide

VOCAB = 512  # conf/model/tiny.yaml
DOCS = 300
SAMPLED = {int(i) for i in np.linspace(0, DOCS - 1, SAMPLED_DOCUMENTS)}


def write_dataset(prefix: Path, bad: set[int] = frozenset(), dtype=np.int32, docs: int = DOCS) -> list[np.ndarray]:
    """``docs`` documents with Megatron's IndexedDatasetBuilder (no manifest); document d of ``bad``
    holds id VOCAB + d, so a refusal's id names its document."""

    rng = np.random.default_rng(len(bad))
    builder = indexed_dataset.builder(prefix, dtype)
    written = []
    for d in range(docs):
        doc = np.array([int(rng.integers(4, 190)) for _ in range(int(rng.integers(20, 200)))] + [2], dtype=dtype)
        if d in bad:
            doc[5] = VOCAB + d
        builder.add_document(doc, [len(doc)])
        written.append(doc)
    indexed_dataset.finalize(builder, prefix)
    return written


def middle_bad() -> set[int]:
    """Documents the pre-launch sample passes over: every other one of the middle third."""
    return {d for d in range(DOCS // 3, 2 * DOCS // 3) if d not in SAMPLED}


def blend_of(*prefixes) -> dict:
    return {"train": [{"prefix": str(p), "weight": 1} for p in prefixes], "valid": {"general": [str(prefixes[0])]}}


TINY = types.SimpleNamespace(name="tiny", vocab_size=VOCAB, eos_token_id=2)


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
def test_the_documents_read_are_megatrons(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    written = write_dataset(tmp_path / "d", dtype=dtype, docs=40)
    megatron = IndexedDataset(str(tmp_path / "d"))
    sampled = read_documents(str(tmp_path / "d"))
    assert [d for d, _ in sampled] == sorted({int(i) for i in np.linspace(0, 39, SAMPLED_DOCUMENTS)})
    assert sampled[0][0] == 0 and sampled[-1][0] == 39
    for d, ids in sampled + read_documents(str(tmp_path / "d"), [7, 3]):
        assert ids.dtype == dtype and np.array_equal(ids, megatron[d]) and np.array_equal(ids, written[d])


@pytest.mark.parametrize("bad", [0, DOCS - 1])
def test_a_bad_first_or_last_document_is_refused_before_the_launch(tmp_path, bad):
    write_dataset(tmp_path / "other_train", {bad})
    write_dataset(tmp_path / "good")
    errors = check_data_matches_model(blend_of(tmp_path / "good", tmp_path / "other_train"), TINY)
    assert errors == [
        f"{tmp_path / 'other_train'}: document {bad} holds token id {VOCAB + bad}, outside the model's vocabulary "
        f"(model.vocab_size={VOCAB}); preprocess it with the model's tokenizer "
        "(or extend the model's vocabulary: tools/extend_vocab.py)"
    ]


def test_the_sample_passes_over_the_middle_and_names_an_unreadable_pair(tmp_path):
    write_dataset(tmp_path / "mid", middle_bad())
    assert sampled_out_of_vocabulary(str(tmp_path / "mid"), VOCAB) is None
    idx = indexed_dataset.idx_path(tmp_path / "mid")
    idx.write_bytes(idx.read_bytes()[: idx.stat().st_size // 2])
    refusal = sampled_out_of_vocabulary(str(tmp_path / "mid"), VOCAB)
    assert refusal.startswith(f"{tmp_path / 'mid'}: unreadable indexed dataset (") and "cut short" in refusal


def test_a_batch_is_traced_to_its_prefix_document_and_id(tmp_path):
    """Megatron's blended dataset over a good and a bad prefix, read as its data loader reads it:
    every batch with an id past the vocabulary is refused naming the document that holds it; the
    others pass, their samples unchanged by the tracing."""
    import torch
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from ellama_megatron.engine.datasets import gpt_dataset_config

    bad = middle_bad()
    write_dataset(tmp_path / "good")
    write_dataset(tmp_path / "mid", bad)
    args = types.SimpleNamespace(seed=1234, seq_length=128)
    blend = [([str(tmp_path / "good"), str(tmp_path / "mid")], [1.0, 1.0]), None, None]
    config = gpt_dataset_config(args, 2, VOCAB, blend, tmp_path / "cache")
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [400, None, None], lambda: True, config).build()
    traced, check = SampleOrigins(train), TokenIdCheck(VOCAB)
    refused, passed = 0, 0
    for plain, batch in zip(
        torch.utils.data.DataLoader(train, batch_size=2), torch.utils.data.DataLoader(traced, batch_size=2)
    ):
        assert all(torch.equal(plain[k], batch[k]) for k in plain)
        has_bad = bool((batch["tokens"] >= VOCAB).any() or (batch["labels"] >= VOCAB).any())
        if not has_bad:
            check(batch)
            passed += 1
            continue
        with pytest.raises(BadData) as e:
            check(batch)
        message = str(e.value)
        assert message.startswith(f"{tmp_path / 'mid'}: document ")
        document = int(message.split("document ")[1].split()[0])
        assert document in bad and f"holds token id {VOCAB + document}, outside" in message
        refused += 1
    assert refused > 10 and passed > 10


@pytest.mark.parametrize("bad", [-5, VOCAB, 2**40])
def test_an_id_below_0_or_past_the_vocabulary_is_refused_in_tokens_or_labels(bad):
    import torch

    check = TokenIdCheck(VOCAB)
    good = {k: torch.randint(0, VOCAB, (2, 16)) for k in ("tokens", "labels")}
    good["tokens"][0, 0], good["labels"][1, -1] = 0, VOCAB - 1
    check(good)
    for key in ("tokens", "labels"):
        batch = {k: v.clone() for k, v in good.items()}
        batch[key][1, 7] = bad
        with pytest.raises(BadData, match=f"token id {bad}, outside the model's vocabulary"):
            check(batch)


def test_bad_data_stops_the_run_at_once_with_its_line(tmp_path, capsys):
    """A rank's BadData record is the launch's cause whatever its peers died of after it: the run
    stops with exit 2 and one line, without a relaunch and without a traceback."""
    from ellama_megatron.launch.torchrun import _copy_stderr, record_and_decide

    message = "data/x_train: document 7 holds token id 600, outside the model's vocabulary (...)"
    peer = RankFailure(0, "vm", 2.0, "RuntimeError", "Connection closed by peer", "gloo.py:1", "Traceback ...")
    first = RankFailure(1, "vm", 1.0, BadData.__name__, message, "token_ids.py:1", "Traceback ...")
    end = LaunchEnd("l1", None, 1, 0, 0, False, rank_failures=[first, peer])
    fault = classify(end)
    assert (fault.kind, fault.ranks, fault.detail) == ("bad_data", (1,), message)
    resilience = types.SimpleNamespace(max_same_failure=3, max_failures_without_progress=6)
    decision = decide(fault, end, [], resilience, verb="relaunch")
    assert (decision.go_on, decision.exit_code) == (False, EXIT_BAD_DATA)

    # The ranks' output is shown until the rank's line; the launcher ends with the same line, once.
    ranks = io.StringIO(f"loading\n[rank1]: error: bad data: {message}\n[rank0]: Traceback (most recent call last):\n")
    _copy_stderr(types.SimpleNamespace(stderr=ranks), deque())
    assert record_and_decide(tmp_path, resilience, end) == (EXIT_BAD_DATA, False)
    assert capsys.readouterr().err == f"loading\nerror: bad data: {message}\n"


def test_a_dataset_from_elsewhere_is_refused_in_seconds_before_anything_starts(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_domain_datasets(tmp_path / "data")
    write_dataset(Path(data["general"]["train"]), {0})
    start = time.monotonic()
    cmd = [sys.executable, str(REPO / "recipes" / "cpt.py"), f"run_dir={tmp_path / 'run'}", *data_overrides(data)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    print(f"refused in {time.monotonic() - start:.1f} s")
    assert proc.returncode == 2, proc.stderr
    assert f"{data['general']['train']}: document 0 holds token id {VOCAB}, outside" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "events.jsonl").exists()


@pytest.mark.slow
def test_a_bad_document_the_sample_missed_stops_the_ranks_with_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_domain_datasets(tmp_path / "data")
    bad = middle_bad()
    write_dataset(Path(data["general"]["train"]), bad)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "recipes" / "cpt.py"), f"run_dir={run_dir}", *data_overrides(data), *TINY_RUN]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_BAD_DATA, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() and "warn" not in line.lower()]
    assert len(errors) == 1, errors
    prefix = data["general"]["train"]
    assert errors[0].startswith(f"error: bad data: {prefix}: document ")
    document = int(errors[0].split("document ")[1].split()[0])
    assert document in bad and f"holds token id {VOCAB + document}, outside" in errors[0]
    assert not list((run_dir / "checkpoints").glob("iter_*"))
    from ellama_megatron.run.events import read_events

    assert [e["kind"] for e in read_events(run_dir)] == ["launch", "bad_data"]  # not relaunched


@pytest.mark.slow
def test_the_check_leaves_the_losses_as_they_are(domain_data, tmp_path):
    proc_on, on = run_cpt(tmp_path / "on", domain_data)
    proc_off, off = run_cpt(tmp_path / "off", domain_data, "resilience.check_token_ids=false")
    assert proc_on.returncode == 0 and proc_off.returncode == 0, (proc_on.stderr + proc_off.stderr)[-3000:]
    assert len(on.train_loss) == 20 and on.train_loss == off.train_loss  # every iteration, as printed
    assert on.valid_loss == off.valid_loss and on.final_valid_loss == off.final_valid_loss
