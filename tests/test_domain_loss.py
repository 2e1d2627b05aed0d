"""The training loss per domain (engine/domain_loss.py): two sources of very different difficulty,
random tokens and a repeated sequence, trained together on CPU ranks; what is logged per domain must
add up to Megatron's own lm loss and not depend on the parallel layout."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cpt
from omegaconf import OmegaConf

from ellama_megatron.engine.domain_loss import DomainLoss
from ellama_megatron.eval.training_curves import plot_training_curves, read_curves, read_tensorboard

ITERATIONS = 6
# Logged at Megatron's first iteration (not reset), then every 2: intervals of 2 iterations.
RUN = [
    f"train.train_tokens={ITERATIONS * 8 * 128}",
    "train.log_interval=2",
    "train.eval_interval=100",
    "logging.train_loss_by=source",
    # And the LR Megatron logs is the curve the planner prints: WSD, warmup from 1e-4 over 1
    # iteration, the peak until 3, (1 - sqrt) decay to the floor over the last 3.
    "optim=cpt_wsd",
    "optim.lr_warmup_init=1e-4",
    "optim.lr_warmup_fraction=0.17",
    "optim.lr_wsd_decay_fraction=0.5",
]
VOCAB = 512  # the tiny model's


def write_two_difficulties(out) -> dict[str, dict[str, str]]:
    """random: uniform tokens (loss stays near ln 512 = 6.24); repetitive: one 8-token phrase over
    and over (learnt within a few steps)."""
    from ellama_megatron.formats import indexed_dataset

    rng = np.random.default_rng(0)
    phrase = [5, 9, 17, 33, 65, 129, 257, 300]
    prefixes = {}
    for name in ("random", "repetitive"):
        for split, docs in (("train", 100), ("valid", 4)):
            prefix = out / f"{name}_{split}"
            documents = []
            for _ in range(docs):
                doc = rng.integers(3, VOCAB, 200) if name == "random" else np.array(phrase * 25)
                documents.append(np.append(doc, 2).astype(np.int32))  # EOD
            indexed_dataset.write_documents(prefix, documents, np.int32)
            prefixes.setdefault(name, {})[split] = str(prefix)
    return prefixes


@pytest.fixture(scope="module")
def two_difficulties(tmp_path_factory):
    return write_two_difficulties(tmp_path_factory.mktemp("difficulties"))


@pytest.fixture(scope="module")
def dp2(two_difficulties, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp2") / "run"
    proc, log = run_cpt(run_dir, two_difficulties, *RUN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, log


def test_domain_names_of_a_blend():
    train = [
        {"prefix": "/d/en_train", "weight": 1, "group": "general", "source": "english"},
        {"prefix": "/d/de_train", "weight": 1, "group": "general", "source": "german"},
        {"prefix": "/d/shop_train", "weight": 2},
    ]  # an inline entry without a group: its file name
    by_source = DomainLoss.from_blend(train, "source")
    assert by_source.names == {
        "group": ["general", "shop_train"],
        "source": ["general-english", "general-german", "shop_train"],
    }
    assert by_source.columns == {"group": [0, 0, 1], "source": [0, 1, 2]}
    assert DomainLoss.from_blend(train, "group").names == {"group": ["general", "shop_train"]}
    assert DomainLoss.from_blend(train, None) is None


@pytest.mark.slow
def test_domain_losses_add_up_to_the_lm_loss(dp2):
    run_dir, log = dp2
    assert sorted(log.train_loss) == [1, 2, 4, 6]
    assert (
        sorted(log.iteration_ms) == [1, 2, 4, 6] and min(log.iteration_ms.values()) > 0
    )  # benchmarks/domain_loss_cost.py reads these
    groups, tokens = log.domain_train_loss["group"], log.domain_train_tokens["group"]
    assert set(groups) == {"random", "repetitive"}
    for it, lm_loss in log.train_loss.items():
        # Each interval's tokens: every sample of the global batch, 128 tokens each, in one domain.
        iterations = 2 if it > 1 else 1
        assert sum(tokens[d][it] for d in groups) == iterations * 8 * 128, f"iteration {it}"
        mean = sum(groups[d][it] * tokens[d][it] for d in groups) / sum(tokens[d][it] for d in groups)
        assert mean == pytest.approx(lm_loss, abs=1e-5), f"iteration {it}"
    # Each domain is its own: random tokens stay near ln(512); the phrase is learnt.
    assert groups["random"][ITERATIONS] > 6.0
    assert groups["repetitive"][ITERATIONS] < groups["repetitive"][1] - 0.8  # 6.28 -> 5.12 when written
    # One source per group here: the source level repeats the group level under its own names.
    assert log.domain_train_loss["source"]["random_train"] == groups["random"]
    # TensorBoard holds the same figures (float32), and the curves tool draws them from either.
    board = read_tensorboard(run_dir / "tensorboard")
    for d, losses in groups.items():
        assert board.domain_train_loss["group"][d] == pytest.approx(losses, rel=1e-6)
        assert board.domain_train_tokens["group"][d] == tokens[d]
    text = read_curves(run_dir.parent / "run.log")  # what run_cpt saved of the run's output
    assert text.domain_train_loss == log.domain_train_loss
    assert plot_training_curves(text, run_dir.parent / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_tp2_logs_the_domain_losses_of_dp2(dp2, two_difficulties, tmp_path):
    _, ref = dp2
    proc, log = run_cpt(tmp_path / "run", two_difficulties, *RUN, "parallel=tp2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert log.domain_train_tokens == ref.domain_train_tokens
    for level, domains in ref.domain_train_loss.items():
        for d, losses in domains.items():
            assert log.domain_train_loss[level][d] == pytest.approx(losses, abs=1e-5), f"{level} {d}"


@pytest.mark.slow
def test_the_planned_lr_curve_is_the_logged_one(dp2):
    from ellama_megatron.engine.lr_schedule import lr_curve

    run_dir, log = dp2
    planned = lr_curve(OmegaConf.load(run_dir / "config.yaml"))
    assert planned[0] == pytest.approx(1e-4) and planned[1] == planned[3] == pytest.approx(2e-3)
    assert planned[ITERATIONS] == pytest.approx(2e-4)
    for it, lr in log.learning_rate.items():
        assert lr == pytest.approx(planned[it], rel=1e-6), f"iteration {it}"  # logged with 7 digits
