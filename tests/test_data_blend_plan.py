"""Blend plan: shares -> weights and epochs on hand-computed cases; caps and missing manifests
fail; tools/plan_blend.py writes the blend; a Megatron BlendedDataset built from the plan draws
each source's target share of tokens (within 2 points over 10,000 samples), same seed same order."""

import json
import math

import numpy
import pytest

from ellama_megatron.data.blend_plan import PlanError, plan_blend, resolve_shares
from ellama_megatron.data.manifest import MANIFEST_FORMAT, ManifestError
from ellama_megatron.formats import indexed_dataset

SHA = "0" * 64


def write_manifest(folder, name, train_tokens, valid_tokens=0, languages=None, sha=SHA):
    splits = {
        "train": {
            "prefix": f"{name}_train",
            "documents": max(1, train_tokens // 100),
            "tokens": train_tokens,
            "text_bytes": 0,
            "languages": {
                lang: {"documents": 1, "tokens": t} for lang, t in (languages or {"en": train_tokens}).items()
            },
        }
    }
    if valid_tokens:
        splits["valid"] = {
            "prefix": f"{name}_valid",
            "documents": 3,
            "tokens": valid_tokens,
            "text_bytes": 0,
            "languages": {},
        }
    path = folder / f"{name}.manifest.json"
    for split in splits:  # the plan checks that each manifest's dataset files exist
        for file in indexed_dataset.pair_paths(folder / splits[split]["prefix"]):
            file.touch()
    path.write_text(
        json.dumps(
            {"format": MANIFEST_FORMAT, "source": name, "splits": splits, "tokenizer": {"tokenizer_json_sha256": sha}}
        )
    )
    return str(path)


def mix(d):
    """The paper's structure: general 0.5 (non-English 0.1 of it), e-commerce the rest."""
    return {
        "valid_by": "group",
        "groups": {
            "general": {
                "share": 0.5,
                "sources": {
                    "english": {"share": None, "manifests": [write_manifest(d, "en", 90_000, 500)]},
                    "non_english": {
                        "share": 0.1,
                        "max_epochs": 3,
                        "manifests": [write_manifest(d, "de", 2_000, 50, {"de": 1_500, "fr": 500})],
                    },
                },
            },
            "ecommerce": {
                "share": None,
                "sources": {
                    "listings": {
                        "share": 0.4,
                        "manifests": [write_manifest(d, "lst_a", 10_000, 100), write_manifest(d, "lst_b", 30_000)],
                    },
                    "reviews": {"share": 0.2, "max_epochs": 2.0, "manifests": write_manifest(d, "rev", 5_000, 70)},
                    "web": {"share": None, "manifests": [write_manifest(d, "web", 100_000)]},
                },
            },
        },
    }


def test_hand_computed_plan(tmp_path):
    # 100,000 tokens of 100-token samples = 1,000 samples.
    plan = plan_blend(mix(tmp_path), train_tokens=100_000, seq_length=100)
    assert plan.num_samples == 1000
    rows = {s.source: s for s in plan.sources}
    expected = {  # share, tokens drawn, epochs
        "english": (0.45, 45_000, 0.5),
        "non_english": (0.05, 5_000, 2.5),
        "listings": (0.20, 20_000, 0.5),
        "reviews": (0.10, 10_000, 2.0),  # exactly at its cap: allowed
        "web": (0.20, 20_000, 0.2),
    }
    for name, (share, drawn, epochs) in expected.items():
        assert rows[name].share == pytest.approx(share)
        assert rows[name].tokens_drawn == pytest.approx(drawn)
        assert rows[name].epochs == pytest.approx(epochs)
    blend = plan.to_blend_dict()
    weights = {e["prefix"].rsplit("/", 1)[-1]: e["weight"] for e in blend["train"]}
    # listings' 0.2 split by tokens over its two manifests: 10k/40k and 30k/40k.
    assert weights == pytest.approx(
        {
            "en_train": 0.45,
            "de_train": 0.05,
            "lst_a_train": 0.05,
            "lst_b_train": 0.15,
            "rev_train": 0.10,
            "web_train": 0.20,
        }
    )
    assert sum(weights.values()) == pytest.approx(1.0)
    assert {k: [p.rsplit("/", 1)[-1] for p in v] for k, v in blend["valid"].items()} == {
        "general": ["en_valid", "de_valid"],
        "ecommerce": ["lst_a_valid", "rev_valid"],
    }
    assert all(p.startswith(str(tmp_path)) for p in [e["prefix"] for e in blend["train"]])
    # non-English: 5% of the mix, split 3:1 by the manifest's language counts.
    langs = plan.language_shares()
    assert langs["de"] == pytest.approx(0.0375) and langs["fr"] == pytest.approx(0.0125)
    assert langs["en"] == pytest.approx(0.95)
    table = plan.format_table()
    assert "non_english" in table and "2.50" in table


def test_one_override_changes_the_group_mix(tmp_path):
    cfg = mix(tmp_path)
    cfg["groups"]["general"]["share"] = 0.3  # e-commerce (null) becomes 0.7
    cfg["groups"]["ecommerce"]["sources"]["reviews"]["max_epochs"] = 10
    cfg["groups"]["general"]["sources"]["non_english"]["max_epochs"] = 10
    plan = plan_blend(cfg, 100_000, 100)
    rows = {s.source: s.share for s in plan.sources}
    assert rows["english"] == pytest.approx(0.27) and rows["listings"] == pytest.approx(0.28)
    cfg["groups"]["ecommerce"]["share"] = 0.0  # general only: e-commerce leaves the training blend
    cfg["groups"]["general"]["share"] = 1.0
    blend = plan_blend(cfg, 100_000, 100).to_blend_dict()
    assert [e["prefix"].rsplit("/", 1)[-1] for e in blend["train"]] == ["en_train", "de_train"]
    assert "ecommerce" in blend["valid"]  # still measured


def test_share_rules():
    assert resolve_shares({"a": 0.25, "b": None}, "x") == {"a": 0.25, "b": 0.75}
    with pytest.raises(PlanError, match="sum to 0.9, not 1"):
        resolve_shares({"a": 0.5, "b": 0.4}, "data.groups")
    with pytest.raises(PlanError, match="at most one share may be null"):
        resolve_shares({"a": None, "b": None}, "data.groups")
    with pytest.raises(PlanError, match="nothing left"):
        resolve_shares({"a": 0.7, "b": 0.6, "c": None}, "data.groups")
    with pytest.raises(PlanError, match="must be a number >= 0"):
        resolve_shares({"a": -0.1, "b": None}, "data.groups")


def test_epoch_cap_and_missing_manifest_fail(tmp_path):
    cfg = mix(tmp_path)
    cfg["groups"]["general"]["sources"]["non_english"]["max_epochs"] = 2.0
    with pytest.raises(PlanError, match=r"general/non_english needs 2.50 epochs.*cap 2"):
        plan_blend(cfg, 100_000, 100)
    cfg = mix(tmp_path)
    cfg["groups"]["ecommerce"]["sources"]["web"]["manifests"] = [str(tmp_path / "nope.manifest.json")]
    with pytest.raises(ManifestError, match="nope.manifest.json not found.*preprocess_data.py"):
        plan_blend(cfg, 100_000, 100)


def test_different_tokenizers_fail(tmp_path):
    cfg = mix(tmp_path)
    cfg["groups"]["ecommerce"]["sources"]["web"]["manifests"] = [
        write_manifest(tmp_path, "web2", 100_000, sha="1" * 64)
    ]
    with pytest.raises(PlanError, match="different tokenizers"):
        plan_blend(cfg, 100_000, 100)


def test_plan_blend_tool(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import plan_blend as tool

    for name, tokens in [
        ("general_en", 90_000),
        ("general_multilingual", 10_000),
        ("listings", 50_000),
        ("reviews", 50_000),
    ]:
        write_manifest(tmp_path, name, tokens, 100)
    base = ["data=demo_blend", f"data.root={tmp_path}", "train=tiny", f"run_dir={tmp_path}/run"]
    assert tool.main(base) == 0
    blend = json.loads((tmp_path / "run" / "blend.json").read_text())
    assert [round(e["weight"], 6) for e in blend["train"]] == [0.45, 0.05, 0.3, 0.2]
    assert set(blend["valid"]) == {"general", "ecommerce"}
    # The tiny run draws 20,480 tokens: non_english (0.05 -> 1,024 of 10,000 tokens) is 0.1024 epochs.
    out = tmp_path / "b.json"
    assert tool.main(base + [f"data.blend_file={out}", "data.groups.general.sources.non_english.max_epochs=0.1"]) == 2
    assert not out.exists()
    assert tool.main(base + [f"data.blend_file={out}", "data.groups.general.share=0.2"]) == 0
    assert [round(e["weight"], 6) for e in json.loads(out.read_text())["train"]] == [0.18, 0.02, 0.48, 0.32]


class _Tok:
    """What Megatron's GPT dataset config reads of a tokenizer."""

    def __init__(self, eod, vocab_size):
        self.eod, self.vocab_size, self.pad = eod, vocab_size, -1
        self.unique_identifiers = {"class": "test", "eod": eod}


def _build_source(folder, name, lo, n_tokens, seed):
    """A dataset whose ids all lie in [lo, lo+500): each sample's tokens tell its source."""
    rng = numpy.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        docs.append(numpy.append(rng.integers(lo, lo + 500, rng.integers(20, 80)), 2).astype(numpy.uint16))
        total += docs[-1].size
    indexed_dataset.write_documents(folder / f"{name}_train", docs, numpy.uint16)
    return write_manifest(folder, name, total)


def _blended(prefix_weights, seed, cache):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    cfg = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=64,
        blend=([p for p, _ in prefix_weights], [w for _, w in prefix_weights]),
        split="100,0,0",
        tokenizer=_Tok(2, 3000),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache),
        mmap_bin_files=True,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [10_000, 0, 0], lambda: True, cfg).build()
    return train


def test_blended_dataset_draws_the_planned_token_shares(tmp_path):
    d = tmp_path
    sources = {  # name: (id range start, tokens)
        "en": (10, 120_000),
        "de": (510, 8_000),
        "lst_a": (1010, 20_000),
        "lst_b": (1010, 60_000),
        "rev": (1510, 40_000),
        "web": (2010, 150_000),
    }
    m = {name: _build_source(d, name, lo, n, i) for i, (name, (lo, n)) in enumerate(sources.items())}
    cfg = {
        "max_epochs": 10,
        "groups": {
            "general": {
                "share": 0.5,
                "sources": {
                    "english": {"share": None, "manifests": [m["en"]]},
                    "non_english": {"share": 0.1, "manifests": [m["de"]]},
                },
            },
            "ecommerce": {
                "share": None,
                "sources": {
                    "listings": {"share": 0.4, "manifests": [m["lst_a"], m["lst_b"]]},
                    "reviews": {"share": 0.2, "manifests": [m["rev"]]},
                    "web": {"share": None, "manifests": [m["web"]]},
                },
            },
        },
    }
    plan = plan_blend(cfg, train_tokens=10_000 * 64, seq_length=64)
    weights = [(e["prefix"], e["weight"]) for e in plan.to_blend_dict()["train"]]
    ds = _blended(weights, seed=1234, cache=d / "cache1")
    assert len(ds) >= 10_000
    counts = numpy.zeros(5)
    first = []
    for i in range(10_000):
        tokens = numpy.asarray(ds[i]["tokens"])
        if i < 50:
            first.append(tokens.tolist())
        body = tokens[tokens != 2]
        counts += numpy.bincount((body - 10) // 500, minlength=5)[:5]
    shares = counts / counts.sum()
    targets = [0.45, 0.05, 0.20, 0.10, 0.20]  # english, non_english, listings, reviews, web
    assert numpy.abs(shares - targets).max() < 0.02, shares
    same = _blended(weights, seed=1234, cache=d / "cache2")
    assert [numpy.asarray(same[i]["tokens"]).tolist() for i in range(50)] == first
    other = _blended(weights, seed=99, cache=d / "cache3")
    assert [numpy.asarray(other[i]["tokens"]).tolist() for i in range(50)] != first
    assert math.isclose(sum(w for _, w in weights), 1.0)


def test_paper_mix_config_at_1t_tokens(tmp_path, capsys):
    """conf/data/ellama.yaml with train=paper: the paper's shares, and the epochs they imply."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import plan_blend as tool

    sizes = {
        "general_en": 500e9,
        "general_multilingual": 30e9,
        "listings": 60e9,
        "reviews": 30e9,
        "ecommerce_web": 150e9,
    }
    for name, tokens in sizes.items():
        write_manifest(tmp_path, name, int(tokens), 1000)
    out = tmp_path / "blend.json"
    assert tool.main(["data=ellama", "train=paper", f"data.root={tmp_path}", f"data.blend_file={out}"]) == 0
    weights = [round(e["weight"], 6) for e in json.loads(out.read_text())["train"]]
    assert weights == [0.45, 0.05, 0.2, 0.1, 0.2]
    table = capsys.readouterr().out
    # 1T tokens of 8192: listings draw 200B of 60B = 3.33 epochs (cap 4); non-English 50B of 30B = 1.67 (cap 2).
    assert "122,070,313 samples of 8192" in table
    assert " 3.33 " in table and " 1.67 " in table
    assert (
        tool.main(
            [
                "data=ellama",
                "train=paper",
                f"data.root={tmp_path}",
                f"data.blend_file={out}",
                "data.groups.ecommerce.sources.listings.share=0.6",
                "data.groups.ecommerce.sources.reviews.share=0.1",
            ]
        )
        == 2
    )


def test_validation_per_source(tmp_path):
    cfg = mix(tmp_path)
    cfg["valid_by"] = "source"
    valid = plan_blend(cfg, 100_000, 100).to_blend_dict()["valid"]
    assert list(valid) == ["general-english", "general-non_english", "ecommerce-listings", "ecommerce-reviews"]
