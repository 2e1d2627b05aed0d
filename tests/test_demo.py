"""The README's first command, reduced in size: every stage's artefact is checked by re-reading it.

One demo run (module fixture): training goes through slurm/8b.sbatch on the local Slurm where the
`slurm_cluster` fixture has one (always in CI), else through recipes/cpt.py; then reruns that must
reuse the finished stages. Without running it: its iteration budgets and its output folder.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, composed

from ellama_megatron.eval.heldout_data import parse_domain_spec
from ellama_megatron.eval.perplexity import evaluate_model_dir
from ellama_megatron.formats import indexed_dataset
from ellama_megatron.formats.train_log import parse_train_log
from ellama_megatron.run.progress import FINAL_HF_FOLDER

CPT_ITERS = 30
ARGS = ["--docs", "150", "--base-iters", "50", "--cpt-iters", str(CPT_ITERS), "--eval-interval", "10", "--alpha", "0.5"]
STAGES = 10
sys.path.insert(0, str(REPO / "recipes"))  # the demo is no part of the library: recipes/demo/
# The demo's jobs go to the local Slurm when it runs: with the Slurm tests, on one worker (conftest.py).
pytestmark = pytest.mark.xdist_group("slurm")


def run_demo(out: Path, launcher: str = "direct") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "recipes/demo.py", "--out", str(out), *ARGS, "--launcher", launcher],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def launcher(request) -> str:
    """slurm when the local Slurm runs or can be started (SLURM_CONF then points at it), else direct."""
    try:
        request.getfixturevalue("slurm_cluster")
    except pytest.skip.Exception:
        return "direct"
    return "slurm"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, launcher):
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    proc = run_demo(out, launcher)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return out, proc.stdout


def stage(out: Path, key: str) -> dict:
    return json.loads((out / "stages" / f"{key}.json").read_text())["result"]


@pytest.mark.slow
def test_progress_names_every_stage_with_its_time(demo):
    out, stdout = demo
    for i in range(1, STAGES + 1):
        assert f"[{i}/{STAGES}]" in stdout
    assert re.search(rf"demo done in \d+ s \({STAGES} stages run, 0 reused\)", stdout)


@pytest.mark.slow
def test_corpora_and_dataset_manifests(demo):
    out, _ = demo
    languages = {json.loads(line)["language"] for line in (out / "raw" / "listings.jsonl").read_text().splitlines()}
    assert languages >= {"en", "de", "fr"}
    for name in ("listings", "reviews", "general_en", "general_multilingual"):
        m = json.loads((out / "data" / f"{name}.manifest.json").read_text())
        assert m["tokenizer"]["vocab_size"] == 512 and m["tokenizer"]["eos_token_id"] == 2
        for split in ("train", "valid"):
            s = m["splits"][split]
            assert s["documents"] > 0 and s["tokens"] > 0
            assert indexed_dataset.bin_path(out / "data" / s["prefix"]).stat().st_size > 0
    reviews = json.loads((out / "data" / "reviews.manifest.json").read_text())
    assert set(reviews["splits"]["train"]["languages"]) == {"en", "de", "fr"}


@pytest.mark.slow
def test_converted_base_verifies_against_its_logits(demo):
    out, _ = demo
    verify = stage(out, "import")["verify"]
    assert verify["max_abs_logit_diff"] <= 1e-4 and verify["top1_agreement"] == 1.0
    assert (out / "base_megatron").is_dir()
    log = (out / "logs" / "import_base.log").read_text()
    assert "--verify" in log and "verify: max abs logit diff" in log


@pytest.mark.slow
def test_blend_is_the_papers_one_to_one_mix(demo):
    out, _ = demo
    table = (out / "blend_table.txt").read_text()
    assert "groups: general 50.0%, ecommerce 50.0%" in table
    blend = json.loads((out / "blend.json").read_text())
    assert sum(t["weight"] for t in blend["train"]) == pytest.approx(1.0)
    assert set(blend["valid"]) == {"general", "ecommerce"}
    report = (out / "REPORT.md").read_text()
    assert "groups: general 50.0%, ecommerce 50.0%" in report


@pytest.mark.slow
def test_cpt_lowers_ecommerce_loss_more_than_general(demo, launcher):
    out, _ = demo
    expected = "slurm/8b.sbatch" if launcher == "slurm" else "recipes/cpt.py"
    assert stage(out, "cpt")["launcher"].startswith(expected)
    assert stage(out, "base_pretrain")["launcher"].startswith(expected)
    base = parse_train_log((out / "base_run" / "train.log").read_text())
    cpt = parse_train_log((out / "cpt_run" / "train.log").read_text())
    assert cpt.last_iteration == cpt.train_iters == CPT_ITERS
    assert set(cpt.valid_loss) == set(base.valid_loss) == {"general", "ecommerce"}
    assert sorted(cpt.valid_loss["ecommerce"]) == [0, 10, 20, 30]  # train.eval_at_start: iteration 0 too
    # Iteration 0 is the imported base, validated before the first step: the base run's last validation
    # (the same model, sets, sequence length and seed).
    for d, losses in base.valid_loss.items():
        assert cpt.valid_loss[d][0] == pytest.approx(losses[max(losses)], abs=1e-4)
    start = {d: losses[0] for d, losses in cpt.valid_loss.items()}
    end = {d: losses[CPT_ITERS] for d, losses in cpt.valid_loss.items()}
    fell = {d: start[d] - end[d] for d in start}
    assert start["ecommerce"] > start["general"] + 1.0, start  # the base knows general text, not e-commerce
    assert fell["ecommerce"] > fell["general"] > 0, fell
    # Within the CPT log alone both fall.
    assert all(losses[CPT_ITERS] < losses[10] for losses in cpt.valid_loss.values())
    # The base and adapted models themselves (the merge curve's end points, same held-out documents).
    ev = stage(out, "merge_curve")["loss"]
    assert ev["base"]["ecommerce"] - ev["adapted"]["ecommerce"] > ev["base"]["general"] - ev["adapted"]["general"]


@pytest.mark.slow
def test_exported_model_loads_in_transformers(demo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = demo
    tok = AutoTokenizer.from_pretrained(out / "cpt_run" / "hf")  # checkpoint.export_hf
    model = AutoModelForCausalLM.from_pretrained(out / "cpt_run" / "hf")
    ids = tok("Title: Smartphone, new with box", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert 0 < loss < 8
    base = AutoModelForCausalLM.from_pretrained(out / "base_hf")
    assert not torch.equal(base.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.slow
def test_merge_table_alpha_zero_is_the_base_model(demo):
    out, _ = demo
    points = {p["alpha"]: p for p in json.loads((out / "merge_curve" / "curve.json").read_text())["points"]}
    assert sorted(points) == [0.0, 0.5, 1.0]
    sources = [parse_domain_spec(f"{d}={out / 'heldout' / d}") for d in ("general", "ecommerce")]
    # The base model's folder, and the adapted one the run exported when it finished (checkpoint.export_hf).
    for folder, alpha in ((out / "base_hf", 0.0), (out / "cpt_run" / FINAL_HF_FOLDER, 1.0)):
        evaluated = evaluate_model_dir(folder, sources, 128, 8, "cpu", "float32", progress=False)["domains"]
        for domain in ("general", "ecommerce"):
            assert points[alpha]["domains"][domain]["mean_loss"] == pytest.approx(
                evaluated[domain]["mean_loss"], rel=1e-6
            )
            assert points[alpha]["domains"][domain]["tokens"] == evaluated[domain]["tokens"] > 1000
    table = (out / "merge_curve" / "curve.md").read_text()
    assert "0.5" in table and table in (out / "REPORT.md").read_text()


@pytest.mark.slow
def test_report_with_images_and_stage_times(demo):
    from PIL import Image

    out, _ = demo
    report = (out / "REPORT.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(images) == ["cpt_run/report/run_timeline.png", "loss_curves.png", "merge_curve/curve.png"]
    for rel in images:
        with Image.open(out / rel) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100
    rows = re.findall(r"^\| (\d+) \| .+ \| ([0-9.]+) \| this run \|", report, re.M)
    assert [int(r[0]) for r in rows] == list(range(1, STAGES + 1))
    # The training run's goodput report: one launch that finished, its numbers those of the tool's JSON.
    run_report = json.loads((out / "cpt_run" / "report" / "run_report.json").read_text())
    assert run_report["restarts"] == 0 and run_report["final_iteration"] == CPT_ITERS
    assert f"Goodput **{100 * run_report['goodput']:.1f}%**" in report


@pytest.mark.slow
def test_second_run_reuses_every_stage(demo):
    out, _ = demo
    before = (out / "cpt_run" / "train.log").read_text()
    proc = run_demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing the finished stages" in proc.stdout
    assert proc.stdout.count("reused from an earlier run") == STAGES
    assert f"(0 stages run, {STAGES} reused)" in proc.stdout
    assert (out / "cpt_run" / "train.log").read_text() == before
    # A demo stopped after training but before the stage's marker: the finished run is not repeated.
    (out / "stages" / "cpt.json").unlink()
    (out / "stages" / "report.json").unlink()
    proc = run_demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpt_run finished in an earlier run: reusing it" in proc.stdout
    assert f"(2 stages run, {STAGES - 2} reused)" in proc.stdout
    assert (out / "cpt_run" / "train.log").read_text() == before
    assert stage(out, "cpt")["iterations"] == CPT_ITERS


def test_iteration_budgets_come_from_the_run_plan_with_the_overrides():
    """The demo asks for iterations; the token budget it passes is iterations x the tiny run's
    tokens per step, as RunPlan computes them, also when an override changes the batch."""
    from demo.runner import DemoError
    from demo.training import TINY, tokens_per_iteration

    from ellama_megatron.run.plan import RunPlan

    cfg = composed(*TINY, "data=demo")
    assert (
        tokens_per_iteration([])
        == RunPlan.from_cfg(cfg).tokens_per_step
        == cfg.train.global_batch_size * cfg.train.seq_length
    )
    assert tokens_per_iteration(["train.global_batch_size=16"]) == 16 * cfg.train.seq_length
    with pytest.raises(DemoError, match="train.no_such_key"):
        tokens_per_iteration(["train.no_such_key=1"])


def test_output_folder_is_reused_restarted_or_refused(tmp_path, capsys):
    from demo.runner import DemoError, DemoOptions, Stages, prepare_output

    out = tmp_path / "demo_output"
    opts = DemoOptions(docs=10)
    prepare_output(out, opts, clean=False)
    calls = []
    stages = Stages(out, {"a": "stage a"})
    assert stages.run("a", lambda x: calls.append(x) or {"summary": "did a", "value": x}, 7) == {"value": 7}
    # Same options: the finished stage is reused, not run again.
    prepare_output(out, opts, clean=False)
    again = Stages(out, {"a": "stage a"})
    assert again.run("a", lambda x: calls.append(x) or {"summary": "did a", "value": x}, 8) == {"value": 7}
    assert calls == [7] and again.records[0].reused
    assert "reused from an earlier run" in capsys.readouterr().out
    # Changed options start clean; a launcher change does not count.
    prepare_output(out, DemoOptions(docs=10, launcher="direct"), clean=False)
    assert (out / "stages" / "a.json").exists()
    prepare_output(out, DemoOptions(docs=11), clean=False)
    assert not (out / "stages").exists()
    assert "options changed since the demo" in capsys.readouterr().out
    other = tmp_path / "not_a_demo"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(DemoError, match="not a demo output folder"):
        prepare_output(other, opts, clean=False)
    assert (other / "precious.txt").exists()


def test_real_text_corpora_and_blends(tmp_path):
    """--general prose: the tiny demo's general text is every licence paragraph and every Python
    reference record in one corpus with a held-out tenth (conf/data/demo_prose_blend.yaml); with
    --domain code (the mix sweep's proxy, docs/sweeps.md) the domain is the first --docs records of
    Python's own source (conf/data/demo_code_blend.yaml). Refused where they do not apply."""
    from demo.runner import DemoError, DemoOptions
    from demo.stages import Demo, corpora
    from demo.training import TINY

    from ellama_megatron.testing.real_prose import licence_paragraphs, python_reference_records, python_source_records
    from ellama_megatron.testing.slurm import LocalSlurm

    def records(path):
        return [json.loads(line) for line in open(path, encoding="utf-8")]

    prose = licence_paragraphs() + [r["text"] for r in python_reference_records()]
    for domain, names, config in (
        ("ecommerce", ["general_prose", "listings", "reviews"], "demo_prose_blend"),
        ("code", ["code_python", "general_prose"], "demo_code_blend"),
    ):
        opts = DemoOptions(docs=10, general="prose", domain=domain)
        opts.check()
        demo = Demo(tmp_path / domain, opts, LocalSlurm(), 1024)
        files = corpora(demo)["files"]
        assert sorted(files) == names == sorted(demo.corpora) and demo.domains == ("general", domain)
        assert demo.data_config == config
        general = records(files["general_prose"])
        assert [r["text"] for r in general] == prose and len({r["id"] for r in general}) == len(general)
        assert all(c.valid_fraction > 0 for c in demo.corpora.values())  # each validated on its own held-out part
        cfg = composed(*TINY, f"data={demo.data_config}", f"data.root={demo.data_dir}")
        assert sorted(cfg.data.groups) == sorted(demo.domains)
        manifests = [m for g in cfg.data.groups.values() for s in g.sources.values() for m in s.manifests]
        assert sorted(manifests) == sorted(f"{demo.data_dir}/{n}.manifest.json" for n in names)
    code = records(files["code_python"])
    assert code == python_source_records(10) and code[0]["id"].split("/")[0].endswith(".py")
    for bad, message in (
        (dict(real=True, base_iters=0, general="prose"), "--general prose is for the tiny demo"),
        (dict(general="web"), "use synthetic or prose"),
        (dict(domain="code"), "use it with --general prose"),
        (dict(domain="law", general="prose"), "use ecommerce or code"),
    ):
        with pytest.raises(DemoError, match=message):
            DemoOptions(**bad).check()
