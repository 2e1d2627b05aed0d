"""The GPU checks of issue 19 in one run of under 8 minutes, with its results written to one folder.

    bash benchmarks/gpu_check.sh                        # on the GPU machine: carried wheels, then this
    python benchmarks/gpu_check.py --out DIR            # where megatron-core is installed
    python benchmarks/gpu_check.py --out DIR --dry-run  # on a CPU: tiny shapes, every step but CUDA's

Steps. Each runs in its own processes with a time limit; a failure is recorded and the next step runs:
  presets   the GPU presets' Megatron arguments (cluster=slurm_h100, the 8B node, the 70B 480 GPUs)
            through llama.megatron.megatron_overrides: parsed and validated by Megatron itself,
            on this GPU's generation, with TE's spec when TE imports
  engine    recipes/cpt.py on one GPU (NCCL, bf16, the TE spec if TE imports, else the local spec
            with SDPA): Llama-3.1-8B widths and vocabulary with --engine-layers layers, random tokens,
            seq 8192; 4 iterations saving at 2 and 4, then a relaunch from the iteration-2 checkpoint
            alone; iteration 3 must repeat exactly, iteration 4 is compared; the checkpoint's weights
            must be bf16 and its main params and Adam moments fp32
  gpu_step  benchmarks/gpu_step.py at the 8B layer shape, seq 8192, as many layers as fit, without
            and with full recompute: step time, tokens/s, TFLOP/s, MFU, planner estimate against
            torch.cuda.max_memory_allocated (target within 10%), and a 2-layer profile's kernel table
  convert   a random model of Llama 3.2 1B's shape through tools/convert_hf.py import --verify
            --verify-device cuda --verify-dtype bfloat16: max logit difference, top-1 agreement

Writes OUT/gpu_check.json (every figure, rewritten after each step), OUT/gpu_check.md (the tables
for docs/benchmarks.md), OUT/gpu_check.log (every process's output) and OUT/kernels.txt. Exit 0
when every step passed, 1 otherwise. The layer count of the engine step is bounded by its two
checkpoints (14 bytes per parameter each: bf16 weights, fp32 main params and Adam moments; 2
layers with the 128k vocabulary are 1.49 B parameters, 21 GB), not by GPU memory: gpu_step
covers the layers that fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ellama_megatron.formats.atomic import write_json_atomic, write_text_atomic  # noqa: E402

STEPS = ("presets", "engine", "gpu_step", "convert")
# Presets whose Megatron arguments are checked: the ones a user launches on H100 nodes.
PRESETS = {
    "slurm_h100": ["cluster=slurm_h100"],
    "8b_node": ["model=llama31_8b", "parallel=llama31_8b_node", "train=paper", "cluster=slurm_h100", "cluster.nodes=8"],
    "70b_480": ["model=llama31_70b", "parallel=llama31_70b_480", "optim=cpt_70b", "train=paper", "cluster=slurm_h100"],
}
ENGINE_ITERATIONS, ENGINE_SAVE_AT = 4, 2
MEMORY_TARGET = 0.10  # planner estimate within 10% of the measured peak
MFU_TARGET = 0.45


class Check:
    """The run's state: options, the log every process writes to, results rewritten after each step."""

    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.work = args.work
        self.deadline = time.monotonic() + args.budget
        self.log_path = self.out / "gpu_check.log"
        self.result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": args.dry_run, "steps": {}}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def say(self, text: str) -> None:
        print(f"gpu_check: {text}", flush=True)
        self.log(f"=== {text}")

    def run(self, cmd: list[str], limit: float, env: dict | None = None) -> str:
        """``cmd`` with its output appended to the log; returns the output, raises on failure or timeout."""
        limit = min(limit, self.remaining())
        if limit < 10:
            raise TimeoutError("no time left in --budget")
        self.log("$ " + " ".join(map(str, cmd)))
        start = time.monotonic()
        try:
            proc = subprocess.run(
                [str(c) for c in cmd],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=limit,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        except subprocess.TimeoutExpired as e:
            self.log(_text(e.stdout) + _text(e.stderr))
            raise TimeoutError(f"{Path(str(cmd[1])).name} ran past {limit:.0f} s") from None
        self.log(proc.stdout + proc.stderr + f"(exit {proc.returncode}, {time.monotonic() - start:.1f} s)")
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{Path(str(cmd[1])).name} exited {proc.returncode}: " + " | ".join(tail))
        return proc.stdout + proc.stderr

    def save(self) -> None:
        write_json_atomic(self.out / "gpu_check.json", self.result)
        write_text_atomic(self.out / "gpu_check.md", markdown(self.result))


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


# ---------------------------------------------------------------------------------------------
# Environment


def environment(dry_run: bool) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for dist in ("megatron-core", "transformers", "transformer-engine", "hydra-core"):
        try:
            from importlib.metadata import version

            env[dist] = version(dist)
        except Exception:
            env[dist] = None
    from ellama_megatron.llama.megatron import transformer_engine_available

    env["transformer_engine_imports"] = transformer_engine_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    else:
        env["gpu"] = None
    return env


# ---------------------------------------------------------------------------------------------
# Steps: each returns its figures and "ok"; an exception marks the step failed


def step_presets(check: Check) -> dict:
    """Megatron's parsing and validation of each GPU preset's arguments, as one rank of it."""
    from hydra import compose, initialize_config_dir

    from ellama_megatron import CONF_DIR
    from ellama_megatron.engine.megatron_args import megatron_argv
    from ellama_megatron.llama.megatron import megatron_overrides, resolve_impl
    from ellama_megatron.run.plan import RunPlan

    if check.args.dry_run:
        from ellama_megatron.runtime.cpu import apply_cpu_runtime

        apply_cpu_runtime()  # no GPU to ask for its architecture: the CPU runtime answers as an H100
    from ellama_megatron.engine.train import RANK_ENVIRONMENT

    os.environ.update(RANK_ENVIRONMENT)  # as every rank sets it
    os.environ["RANK"] = "0"
    transformer_impl, _ = resolve_impl("auto", "auto")
    results = {}
    for name, overrides in PRESETS.items():
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=[f"run_dir={check.work / 'presets'}", *overrides])
        plan = RunPlan.from_cfg(cfg)
        os.environ["WORLD_SIZE"] = str(plan.world_size)
        results[name] = megatron_overrides(megatron_argv(cfg, plan.model, transformer_impl))
    return {"ok": not any(results.values()), "transformer_impl": transformer_impl, "overrides": results}


def write_token_datasets(folder: Path, vocab: int, docs: int, doc_tokens: int) -> dict[str, dict[str, str]]:
    """Two domains of random tokens as Megatron indexed datasets (train and valid each)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    prefixes: dict[str, dict[str, str]] = {}
    for domain in ("general", "ecommerce"):
        for split, count in (("train", docs), ("valid", 2)):
            prefix = folder / f"{domain}_{split}"
            builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
            for _ in range(count):
                doc = rng.integers(3, vocab, doc_tokens, dtype=np.int32)
                builder.add_document(doc, [len(doc)])
            builder.finalize(f"{prefix}.idx")
            prefixes.setdefault(domain, {})[split] = str(prefix)
    return prefixes


def engine_overrides(check: Check, data: dict) -> list[str]:
    train = ",".join(f"{{prefix:{d['train']},weight:1}}" for d in data.values())
    valid = ",".join(f"{name}:[{d['valid']}]" for name, d in data.items())
    seq = 128 if check.args.dry_run else 8192
    common = [
        f"data.train=[{train}]",
        f"data.valid={{{valid}}}",
        "train=tiny",
        f"train.seq_length={seq}",
        "train.micro_batch_size=1",
        "train.global_batch_size=2",
        f"train.train_tokens={ENGINE_ITERATIONS * 2 * seq}",
        "train.eval_interval=1000",
        "train.log_interval=1",
        f"checkpoint.save_interval={ENGINE_SAVE_AT}",
        "logging.wandb_project=null",
    ]
    if check.args.dry_run:
        # bf16 on the CPU: the GPU's numerics (Float16Module, fp32 main params) through the same engine.
        return ["model=tiny", "cluster=local_cpu", "cluster.procs_per_node=1", "optim.precision=bf16", *common]
    return [
        "model=llama31_8b",
        f"model.num_layers={check.args.engine_layers}",
        "cluster=slurm_h100",
        "cluster.nodes=1",
        "cluster.procs_per_node=1",
        *common,
    ]


def checkpoint_dtypes(folder: Path) -> dict[str, dict[str, int]]:
    """{model|optimizer: {dtype: tensors}} of a torch_dist checkpoint, from its metadata alone."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ellama_megatron.formats.torch_dist import CheckpointReader

    counts: dict[str, dict[str, int]] = {"model": {}, "optimizer": {}}
    for key, md in CheckpointReader(folder).metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata) and not key.endswith("_extra_state"):
            part = counts["optimizer" if key.startswith("optimizer.") else "model"]
            dtype = str(md.properties.dtype).removeprefix("torch.")
            part[dtype] = part.get(dtype, 0) + 1
    return counts


def _run_dir_place(check: Check, needed_bytes: float) -> Path:
    """/dev/shm when it holds the checkpoints (memory-speed saves), else the work folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * needed_bytes:
        return shm / "gpu_check"
    if shutil.disk_usage(check.work).free < 1.2 * needed_bytes:
        raise RuntimeError(
            f"{check.work}: {shutil.disk_usage(check.work).free / 1e9:.0f} GB free, the engine's "
            f"two checkpoints need {needed_bytes / 1e9:.0f} GB; lower --engine-layers"
        )
    return check.work


def step_engine(check: Check) -> dict:
    """Four iterations from scratch, saving at 2 and 4; a relaunch from the iteration-2 checkpoint
    alone repeats iterations 3 and 4."""
    from omegaconf import OmegaConf

    from ellama_megatron.formats.megatron_checkpoint import TRACKER_FILE, iteration_folder
    from ellama_megatron.formats.train_log import parse_train_log
    from ellama_megatron.llama.config import load_model_config
    from ellama_megatron.run.plan import RunPlan

    model = load_model_config("tiny" if check.args.dry_run else "llama31_8b")
    layers = model.num_layers if check.args.dry_run else check.args.engine_layers
    params = dataclasses.replace(model, num_layers=layers).num_parameters()
    place = _run_dir_place(check, 2 * 14 * params)
    data = write_token_datasets(
        check.work / "tokens",
        model.vocab_size,
        docs=64 if check.args.dry_run else 24,
        doc_tokens=300 if check.args.dry_run else 12000,
    )
    overrides = engine_overrides(check, data)
    first, resumed = place / "engine_run", place / "engine_resumed"
    for d in (first, resumed):
        shutil.rmtree(d, ignore_errors=True)
    result = {"layers": layers, "parameters": params, "run_dir": str(place)}
    try:
        start = time.monotonic()
        ref = parse_train_log(check.run([sys.executable, "recipes/cpt.py", f"run_dir={first}", *overrides], limit=240))
        result["first_launch_s"] = round(time.monotonic() - start, 1)
        result["losses"] = ref.train_loss
        result["precision"] = RunPlan.from_cfg(OmegaConf.load(first / "config.yaml")).precision
        saved = iteration_folder(checkpoint_dir_of(first), ENGINE_SAVE_AT)
        result["checkpoint_dtypes"] = checkpoint_dtypes(saved)
        result["checkpoint_gb"] = round(sum(p.stat().st_size for p in saved.rglob("*") if p.is_file()) / 1e9, 2)
        # The relaunch gets the iteration-2 checkpoint alone (hard links: no copy) and must resume from it.
        shutil.rmtree(iteration_folder(checkpoint_dir_of(first), ENGINE_ITERATIONS))
        target = checkpoint_dir_of(resumed)
        target.mkdir(parents=True)
        shutil.copytree(saved, target / saved.name, copy_function=os.link)
        (target / TRACKER_FILE).write_text(str(ENGINE_SAVE_AT))
        start = time.monotonic()
        log = parse_train_log(
            check.run([sys.executable, "recipes/cpt.py", f"run_dir={resumed}", *overrides], limit=240)
        )
        result["resumed_launch_s"] = round(time.monotonic() - start, 1)
        result["resumed_losses"] = log.train_loss
    finally:
        for d in (first, resumed):
            shutil.rmtree(d, ignore_errors=True)
    it3, it4 = ENGINE_SAVE_AT + 1, ENGINE_SAVE_AT + 2
    finite = len(ref.train_loss) == ENGINE_ITERATIONS and all(math.isfinite(v) for v in ref.train_loss.values())
    # Megatron prints a relaunch's first iteration without resetting its loss accumulator: the next
    # printed loss is the mean of both (tests/test_engine_runs.py, assert_same_losses_after_resume).
    expected4 = (ref.train_loss.get(it3, math.nan) + ref.train_loss.get(it4, math.nan)) / 2
    result["resume_diff"] = {
        it3: abs(log.train_loss.get(it3, math.nan) - ref.train_loss.get(it3, math.nan)),
        it4: abs(log.train_loss.get(it4, math.nan) - expected4),
    }
    dtypes = result["checkpoint_dtypes"]
    result["ok"] = bool(
        finite
        and min(log.train_loss, default=0) == it3
        and result["resume_diff"][it3] == 0.0  # restored state: the same forward, bit for bit
        and result["resume_diff"][it4] <= 2e-6 * abs(expected4)  # printed to 7 digits, averaged
        and result["precision"] == "bf16"
        and set(dtypes["model"]) == {"bfloat16"}
        and set(dtypes["optimizer"]) == {"float32"}
    )
    return result


def checkpoint_dir_of(run_dir: Path) -> Path:
    from ellama_megatron.engine.megatron_args import checkpoint_dir

    return checkpoint_dir(argparse.Namespace(run_dir=str(run_dir)))


def step_gpu_step(check: Check) -> dict:
    """MFU at the 8B layer shape without and with full recompute, then a short profile."""
    base = [sys.executable, "benchmarks/gpu_step.py"]
    if check.args.dry_run:
        # --tiny's shape, without --tiny's fixed step counts (the profile needs 2 warm-up steps).
        base += [
            "--model",
            "tiny",
            "--layers",
            "2",
            "--seq",
            "64",
            "--device",
            "cpu",
            "--dtype",
            "bf16",
            "--steps",
            "1",
            "--warmup",
            "1",
        ]
    runs = {}
    for recompute in ("none", "full"):
        path = check.work / f"gpu_step_{recompute}.json"
        check.run([*base, "--recompute", recompute, "--json", path], limit=200)
        r = json.loads(path.read_text())
        runs[recompute] = {
            k: r[k]
            for k in (
                "device",
                "transformer_impl",
                "attention",
                "dtype",
                "recompute",
                "fusions",
                "step_s_median",
                "tokens_per_s",
                "model_tflops",
                "model_tflops_no_attention",
                "model_tflops_palm_convention",
                "mfu",
                "mfu_palm_convention",
                "peak_memory_gib",
                "peak_memory_kind",
                "planner_estimate_gib",
                "final_loss",
            )
        }
        runs[recompute]["layers"] = r["shape"]["layers"]
        runs[recompute]["seq"] = r["shape"]["seq"]
        runs[recompute]["planner_error"] = r["planner_estimate_gib"] / r["peak_memory_gib"] - 1
    profile = check.work / "profile"
    check.run([*base, "--layers", "2", "--steps", "2", "--warmup", "2", "--profile", profile], limit=120)
    shutil.copyfile(profile / "kernels.txt", check.out / "kernels.txt")
    on_gpu = not check.args.dry_run
    ok = all(math.isfinite(r["final_loss"]) for r in runs.values())
    if on_gpu:
        ok = ok and all(abs(r["planner_error"]) <= MEMORY_TARGET for r in runs.values())
    return {
        "ok": ok,
        "runs": runs,
        "mfu_target": MFU_TARGET if on_gpu else None,
        "mfu_target_met": runs["none"]["mfu"] >= MFU_TARGET if on_gpu else None,
    }


_VERIFY = re.compile(
    r"verify: max abs logit diff (\S+) \(tolerance (\S+)\), top-1 agreement (\S+) over (\d+) "
    r"tokens, (\w+) on (\S+)"
)


def step_convert(check: Check) -> dict:
    """A random model of Llama 3.2 1B's widths, imported with --verify on the GPU in bf16."""
    from ellama_megatron.llama.config import load_model_config
    from ellama_megatron.testing.tiny_llama import write_random_hf_llama

    if check.args.dry_run:
        cfg, device, dtype = load_model_config("tiny"), "cpu", "float32"
    else:
        # Llama 3.2 1B: 16 layers of 2048 wide, 8192 FFN, 32 heads over 8 KV groups, tied embeddings.
        cfg = dataclasses.replace(
            load_model_config("llama31_8b"),
            name="llama32_1b_shape",
            num_layers=16,
            hidden_size=2048,
            ffn_hidden_size=8192,
            num_attention_heads=32,
            num_query_groups=8,
            kv_channels=64,
            tie_word_embeddings=True,
        )
        device, dtype = "cuda", "bfloat16"
    hf_dir, out = check.work / "hf_random", check.work / "megatron_random"
    for d in (hf_dir, out):
        shutil.rmtree(d, ignore_errors=True)
    start = time.monotonic()
    write_random_hf_llama(hf_dir, cfg)
    written_s = time.monotonic() - start
    text = check.run(
        [
            sys.executable,
            "tools/convert_hf.py",
            "import",
            "--hf-dir",
            hf_dir,
            "--out",
            out,
            "--verify",
            "--verify-device",
            device,
            "--verify-dtype",
            dtype,
            "--quiet",
        ],
        limit=200,
    )
    shutil.rmtree(hf_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    m = _VERIFY.search(text)
    if m is None:
        raise RuntimeError("convert_hf.py printed no 'verify:' line")
    diff, tolerance = float(m.group(1)), float(m.group(2))
    return {
        "ok": diff <= tolerance,
        "model": cfg.name,
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "random_model_written_s": round(written_s, 1),
        "max_abs_logit_diff": diff,
        "tolerance": tolerance,
        "top1_agreement": float(m.group(3)),
        "tokens": int(m.group(4)),
        "dtype": m.group(5),
        "device": m.group(6),
    }


STEP_FUNCTIONS = {"presets": step_presets, "engine": step_engine, "gpu_step": step_gpu_step, "convert": step_convert}


# ---------------------------------------------------------------------------------------------
# Report


def markdown(result: dict) -> str:
    env = result.get("environment", {})
    lines = [
        f"# GPU check, {result['date']}{' (dry run on CPU)' if result['dry_run'] else ''}",
        "",
        f"GPU {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, driver {env.get('driver')}), torch "
        f"{env.get('torch')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, NCCL {env.get('nccl')}), "
        f"megatron-core {env.get('megatron-core')}, transformers {env.get('transformers')}, Transformer Engine "
        f"{env.get('transformer-engine') if env.get('transformer_engine_imports') else 'not importable'}.",
        "",
        "| step | passed | seconds | figures |",
        "|---|---|---|---|",
    ]
    for name, s in result["steps"].items():
        lines.append(f"| {name} | {'yes' if s.get('ok') else 'NO'} | {s.get('seconds', '')} | {_figures(name, s)} |")
    gpu_step = result["steps"].get("gpu_step", {}).get("runs")
    if gpu_step:
        lines += [
            "",
            "| recompute | layers | seq | step (ms) | tokens/s | model TFLOP/s | MFU | MFU (PaLM count) "
            "| peak GiB | planner GiB | planner error |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in gpu_step.items():
            mfu = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            lines.append(
                f"| {name} | {r['layers']} | {r['seq']} | {1e3 * r['step_s_median']:.1f} | "
                f"{r['tokens_per_s']:,.0f} | {r['model_tflops']:.1f} | {mfu(r['mfu'])} | "
                f"{mfu(r['mfu_palm_convention'])} | {r['peak_memory_gib']:.2f} | "
                f"{r['planner_estimate_gib']:.2f} | {100 * r['planner_error']:+.1f}% |"
            )
    return "\n".join(lines) + "\n"


def _figures(name: str, s: dict) -> str:
    if "error" in s:
        return "error: " + s["error"].replace("|", "/")[:300]
    if name == "presets":
        flagged = {k: v for k, v in s["overrides"].items() if v}
        return f"{s['transformer_impl']} spec; " + ("no flag overridden" if not flagged else f"overridden: {flagged}")
    if name == "engine":
        losses = ", ".join(f"{k}: {v:.4f}" for k, v in s["losses"].items())
        return (
            f"{s['layers']} layers ({s['parameters'] / 1e9:.2f} B params), losses {losses}; resumed "
            f"diffs {s['resume_diff']}; checkpoint {s['checkpoint_gb']} GB, dtypes {s['checkpoint_dtypes']}"
        )
    if name == "convert":
        return (
            f"{s['model']}: max abs logit diff {s['max_abs_logit_diff']:.3g} (tolerance {s['tolerance']:g}), "
            f"top-1 agreement {s['top1_agreement']:.4f} over {s['tokens']} tokens, {s['dtype']} on {s['device']}"
        )
    if name == "gpu_step":
        return "see the table below" + (
            f"; MFU target {s['mfu_target']:.0%} met: {s['mfu_target_met']}" if s.get("mfu_target") else ""
        )
    return ""


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " See docs/gpu_speed.md.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="results folder (created; files there are replaced)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder for data and models [OUT/../gpu_check_work]")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)} [all]")
    p.add_argument("--budget", type=float, default=470, help="seconds for everything; a step past it fails [470]")
    p.add_argument("--engine-layers", type=int, default=2, help="layers of the engine step's 8B-wide model [2]")
    p.add_argument(
        "--dry-run", action="store_true", help="on a CPU: tiny model, gloo, CPU shapes; checks the script, not the GPU"
    )
    args = p.parse_args(argv)
    unknown = sorted(set(args.steps.split(",")) - set(STEPS))
    if unknown:
        p.error(f"--steps: unknown {unknown}; choose from {','.join(STEPS)}")
    if args.engine_layers < 1:
        p.error(f"--engine-layers must be >= 1, got {args.engine_layers}")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        p.error("no GPU visible to torch; use --dry-run on a CPU")
    args.work = args.work or args.out.parent / f"{args.out.name}_work"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    check = Check(args)
    check.log_path.write_text("")
    check.result["environment"] = environment(args.dry_run)
    check.say(f"{check.result['environment'].get('gpu') or 'CPU (dry run)'}; results in {args.out}")
    check.save()
    for name in args.steps.split(","):
        check.say(f"{name} ({check.remaining():.0f} s left)")
        start = time.monotonic()
        try:
            step = STEP_FUNCTIONS[name](check)
        except Exception as e:  # recorded; the next step still runs
            step = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        step["seconds"] = round(time.monotonic() - start, 1)
        check.result["steps"][name] = step
        check.save()
        check.say(f"{name}: {'passed' if step['ok'] else 'FAILED'} in {step['seconds']} s; {_figures(name, step)}")
    passed = [n for n, s in check.result["steps"].items() if s["ok"]]
    print(
        f"gpu_check: {len(passed)}/{len(check.result['steps'])} steps passed "
        f"({', '.join(passed) or 'none'}); results in {args.out}/gpu_check.json and .md",
        flush=True,
    )
    return 0 if len(passed) == len(check.result["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
