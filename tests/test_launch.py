"""RunPlan is the one source of a run's numbers and its one layout check; the launcher's Slurm
decisions (allocation, time left, config, requeue) are Python, testable without a cluster."""

from __future__ import annotations

import json

import pytest
from conftest import PAPER_70B, REPO, composed, data_overrides
from omegaconf import OmegaConf

from ellama_megatron.engine.megatron_args import megatron_argv
from ellama_megatron.launch import slurm
from ellama_megatron.launch.prepare import prepare
from ellama_megatron.run.memory import check_fits
from ellama_megatron.run.plan import LayoutError, RunPlan, padded_vocab_size
from ellama_megatron.run.progress import DONE_FILE, LATEST_ITERATION_FILE
from ellama_megatron.run.schema import ConfigError


def test_run_plan_numbers_are_the_megatron_argvs():
    cfg = composed(*PAPER_70B)
    plan = RunPlan.from_cfg(cfg)
    assert (plan.world_size, plan.dp, plan.grad_accumulation) == (480, 15, 96)
    assert plan.padded_vocab_size == padded_vocab_size(128256, 8) == 129024  # a multiple of 128 x TP 8
    argv = megatron_argv(cfg, plan.model, "transformer_engine")
    value = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert int(value("--train-iters")) == int(value("--lr-decay-iters")) == plan.train_iterations == 84772
    assert int(value("--eval-global-batch-size")) == plan.dp
    assert int(value("--num-layers-per-virtual-pipeline-stage")) == plan.layers_per_virtual_stage == 80 // (4 * 5)


def test_the_planner_and_the_recipe_apply_the_same_layout_rules(domain_data, tmp_path):
    """Rules each check used to lack: sequence vs positions (the planner had not), interleaved
    pipelines' micro-batches (the recipe had not); both now refuse both, listing every problem."""
    too_long = ["model.max_position_embeddings=4096"]  # train=paper is 8192 tokens long
    with pytest.raises(LayoutError, match="train.seq_length=8192 exceeds model.max_position_embeddings=4096"):
        check_fits(composed(*PAPER_70B, *too_long))
    few_micro_batches = ["train.global_batch_size=30"]  # DP 15, micro batch 1: 2 per step, PP is 4
    with pytest.raises(LayoutError, match="interleaved pipeline needs at least PP=4 micro-batches per step, got 2"):
        check_fits(composed(*PAPER_70B, *few_micro_batches))
    base = [f"run_dir={tmp_path / 'run'}", *data_overrides(domain_data)]
    with pytest.raises(ConfigError) as refused:
        prepare(
            composed(
                *base,
                "parallel=pp2",
                "parallel.virtual_pipeline_model_parallel_size=2",
                "cluster.procs_per_node=2",
                "train.global_batch_size=1",
                "train.micro_batch_size=1",
                "train.seq_length=4096",
                "model.max_position_embeddings=2048",
            )
        )
    msg = str(refused.value)
    assert "interleaved pipeline needs at least PP=2 micro-batches per step, got 1" in msg
    assert "train.seq_length=4096 exceeds model.max_position_embeddings=2048" in msg


def test_an_invalid_layout_is_reported_without_the_memory_check(domain_data, tmp_path):
    """The planner's memory refusal is added only for a layout Megatron could run; a layout error is
    reported once, by the one layout check, not swallowed."""
    base = [f"run_dir={tmp_path / 'run'}", *data_overrides(domain_data), "cluster.gpu_memory_gb=1"]
    with pytest.raises(ConfigError) as refused:
        prepare(composed(*base, "train.global_batch_size=6"))
    msg = str(refused.value)
    assert msg.count("train.global_batch_size=6 is not divisible") == 1 and "does not fit the GPU" not in msg
    with pytest.raises(ConfigError, match="does not fit the GPU: layout TP1 PP1 CP1 DP2 of tiny"):
        prepare(composed(*base))


def test_the_schema_names_a_key_of_the_wrong_type_or_unknown(domain_data, tmp_path):
    from hydra.errors import ConfigCompositionException

    base = [f"run_dir={tmp_path / 'run'}", *data_overrides(domain_data)]
    with pytest.raises(ConfigCompositionException, match="train.global_batch_size=eight") as refused:
        composed(*base, "train.global_batch_size=eight")  # the schema is in ConfigStore: composition checks types
    assert "could not be converted to Integer" in str(refused.value.__cause__)
    assert "full_key: train.global_batch_size" in str(refused.value.__cause__)
    untyped = OmegaConf.create(OmegaConf.to_container(composed(*base)))  # as a config.yaml read back
    untyped.train.global_batch_size = "eight"
    with pytest.raises(ConfigError, match=r"train\.global_batch_size.*'eight'"):
        RunPlan.from_cfg(untyped)
    with pytest.raises(ConfigError, match=r"parallel\.tensor_parallel_size.*run/schema.py ParallelConfig"):
        prepare(composed(*base, "+parallel.tensor_parallel_size=2"))  # a typo of tensor_model_parallel_size


def test_minutes_left_reads_squeue():
    assert slurm.minutes_left("1-02:03:04") == 1440 + 120 + 3
    assert slurm.minutes_left("3:59:30") == 239
    assert slurm.minutes_left("45:10") == 45
    assert slurm.minutes_left("UNLIMITED") is None


def test_allocation_from_the_job_or_the_sbatch_header():
    job = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "60", "SLURM_NTASKS_PER_NODE": "8(x60)"}
    assert slurm.allocation(REPO / "slurm" / "70b.sbatch", job) == (60, 8)
    assert slurm.allocation(REPO / "slurm" / "70b.sbatch", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == (1, 4)
    assert slurm.allocation(REPO / "slurm" / "70b.sbatch", {}) == (60, 8)
    assert slurm.allocation(REPO / "slurm" / "8b.sbatch", {}) == (8, 8)


@pytest.mark.parametrize(
    "case, expected",
    [
        (dict(finished=True, signal="USR1", exit_code=0, end_iteration=30), (False, 0, "run finished (iteration 30)")),
        (dict(exit_code=1), (True, 0, "crash (ranks exited with 1): requeue from iteration 12")),  # no signal: a fault
        (dict(exit_code=0, end_iteration=10), (False, 3, "suspected bug: the ranks exited cleanly without")),
        (
            dict(exit_code=0, end_iteration=15),
            (True, 0, "time_limit: requeue to resume from iteration 15"),
        ),  # Megatron's own timed exit
        (
            dict(signal="TERM", exit_code=143, end_iteration=10),
            (True, 0, "preempted: requeue to resume from iteration 10"),
        ),
        (dict(signal="USR1", exit_code=0, restart=500), (False, 4, "ELLAMA_MAX_REQUEUES=500")),
    ],
)
def test_requeue_decision(case, expected):
    from types import SimpleNamespace

    from ellama_megatron.run.faults import LaunchEnd, classify, decide

    restart = case.pop("restart", 2)
    end = LaunchEnd(
        **({"launch": "7.2", "signal": None, "start_iteration": 10, "end_iteration": 12, "finished": False} | case)
    )
    resilience = SimpleNamespace(max_same_failure=3, max_failures_without_progress=6)
    decision = slurm.cap_requeues(
        decide(classify(end), end, [], resilience), {"SLURM_RESTART_COUNT": str(restart), "ELLAMA_MAX_REQUEUES": "500"}
    )
    assert (decision.go_on, decision.exit_code) == expected[:2]
    assert expected[2] in decision.reason


def test_prepare_job_records_the_config_and_says_what_to_start(domain_data, tmp_path, capsys):
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "t",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_RESTART_COUNT": "1",
        "ELLAMA_LOG_ROOT": str(tmp_path / "logs"),
        "PATH": "",
    }  # no squeue: no time limit
    run_dir = tmp_path / "run"
    user = [*data_overrides(domain_data), f"run_dir={run_dir}"]
    status, variables = slurm.prepare_job(REPO / "slurm" / "8b.sbatch", ["model=tiny", "parallel=single"], user, env)
    assert status == 0, capsys.readouterr().err
    assert variables["ELLAMA_CONFIG"] == run_dir / "config.yaml" and variables["START_ITER"] == 0
    assert (variables["NODES"], variables["PROCS_PER_NODE"]) == (1, 2)
    assert "FINISHED" not in variables
    log_dir = tmp_path / "logs" / "t-4242"
    assert variables["JOB_LOG_DIR"] == log_dir
    assert (log_dir / "config.restart1.yaml").read_text() == (run_dir / "config.yaml").read_text()
    assert "job 4242 restart 1: 1 nodes x 2 ranks" in capsys.readouterr().err
    assert "ELLAMA_CONFIG=" in slurm.shell_assignments(variables)
    # A run whose budget is spent: nothing to start, and the job ends without a requeue.
    (run_dir / DONE_FILE).write_text(json.dumps({"iteration": 20}))
    status, variables = slurm.prepare_job(REPO / "slurm" / "8b.sbatch", ["model=tiny", "parallel=single"], user, env)
    assert status == 0 and variables["FINISHED"] == 1
    (run_dir / LATEST_ITERATION_FILE).write_text("20")
    assert slurm.end_job(run_dir / "config.yaml", "USR1", 0, 15, log_dir, env) == 0
    assert "run finished (iteration 20)" in capsys.readouterr().err
    # An invalid config: status 2, nothing to start.
    status, variables = slurm.prepare_job(
        REPO / "slurm" / "8b.sbatch", ["model=tiny"], [*user, "parallel.tensor_model_parallel_size=3"], env
    )
    assert status == 2 and not variables
    err = capsys.readouterr().err
    assert "not divisible by TP x PP x CP" in err and "not starting, not requeueing" in err
