"""One-GPU training-step benchmark of Llama-3.1-shaped layers built with Megatron-Core.

Builds a Megatron-Core GPTModel with the real Llama 3.1 widths (hidden, FFN, heads, query groups,
vocab, RoPE) but only as many layers as fit on one GPU, runs forward + backward + optimizer steps
on random tokens, and reports step time, tokens/s, model TFLOP/s (with and without attention),
MFU against the GPU's dense bf16 peak and peak memory.

    python benchmarks/gpu_step.py                               # 8B shape, layers that fit
    python benchmarks/gpu_step.py --model llama31_70b           # 70B hidden size
    python benchmarks/gpu_step.py --attention unfused --layers 4  # Megatron's unfused attention
    python benchmarks/gpu_step.py --profile prof/ --steps 4     # PyTorch profiler trace
    python benchmarks/gpu_step.py --tiny                        # seconds on a CPU (smoke test)

Model FLOPs per token are the planner's (ellama_megatron.llama.config: 6 x the matmul parameters,
plus the attention products; recomputation is not counted, as MFU requires). "model TFLOP/s"
charges the causal attention (the lower triangle of the s x s square) and MFU = that / peak; the
PaLM-convention MFU (the full square) is printed too, to compare with torchtitan's 33-39%.

Which parts are the engine's and which are stand-ins: the model comes from the engine's provider
(ellama_megatron.llama.megatron: TransformerConfig, layer spec with SDPAttention or TE's, GPTModel);
the optimizer is, by default, the engine's too (Megatron DDP with an fp32 gradient buffer and the
distributed optimizer: 18 bytes/param in bf16; bf16 weights in Megatron's Float16Module as
megatron.training wraps them), or plain torch AdamW on the bf16 parameters
(--optimizer torch). "--layers auto" takes the most layers the project's planner
(ellama_megatron.run.memory) fits in the GPU's memory; its estimate is printed next to the
measured peak.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ellama_megatron.formats.atomic import write_text_atomic
from ellama_megatron.llama.config import (
    LlamaConfig,
    attention_flops_per_token,
    flops_per_token,
    load_model_config,
    matmul_params,
)
from ellama_megatron.run.memory import estimate_memory
from ellama_megatron.run.plan import RunPlan

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by substring of the device name.
DENSE_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}


def step_plan(model_cfg: LlamaConfig, layers: int, args: argparse.Namespace) -> RunPlan:
    """What one benchmark step computes, as the planner and the engine describe a run: the preset
    cut to ``layers`` on one GPU (TP = PP = DP = 1), one optimizer step's worth of tokens."""
    return RunPlan(
        model=dataclasses.replace(model_cfg, num_layers=layers),
        nodes=1,
        procs_per_node=1,
        tp=1,
        pp=1,
        cp=1,
        vp=None,
        sequence_parallel=False,
        distributed_optimizer=True,
        recompute=None if args.recompute == "none" else args.recompute,
        recompute_num_layers=1 if args.recompute == "full" else None,
        seq_length=args.seq,
        micro_batch_size=args.micro_batch,
        global_batch_size=args.micro_batch * args.accum,
        train_tokens=float(args.seq * args.micro_batch * args.accum),
        precision=args.dtype,
        flash_attention=args.attention != "unfused",
    )


def layers_that_fit(model_cfg: LlamaConfig, args, memory_bytes: int) -> int:
    """Most layers (at most the model's own count) the planner fits in ``headroom`` of the memory."""
    layers = 1
    while (
        layers < model_cfg.num_layers
        and estimate_memory(step_plan(model_cfg, layers + 1, args)).total <= args.headroom * memory_bytes
    ):
        layers += 1
    return layers


def training_flops_per_token(plan: RunPlan) -> dict[str, float]:
    """Model FLOPs of one training token (ellama_megatron.llama.config): the matmuls alone, and with
    the attention products counted causally and over the full square (PaLM)."""
    dense = 6 * matmul_params(plan.model)
    return {
        "dense": dense,
        "attn_causal": attention_flops_per_token(plan.model, plan.seq_length, causal=True),
        "palm": flops_per_token(plan.model, plan.seq_length),
    }


def peak_tflops_for(device_name: str) -> float | None:
    for key, tflops in DENSE_BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return tflops
    return None


# ---------------------------------------------------------------------------------------------
# Building and running the model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process(device: torch.device, seed: int, attention: str) -> None:
    """Megatron's parallel state for one process (TP = PP = DP = 1)."""
    from megatron.core import parallel_state, tensor_parallel

    if device.type == "cpu":
        # Megatron calls torch.cuda in places (RoPE's inverse frequencies, the unfused attention's
        # score buffer); the engine's CPU runtime maps those to the CPU.
        from ellama_megatron.runtime.cpu import apply_cpu_runtime

        apply_cpu_runtime()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    # On CPU the model-parallel RNG cannot use CUDA generators; attention dropout is 0 anyway.
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=device.type == "cpu", force_reset_rng=True
    )


def build_model(plan: RunPlan, args: argparse.Namespace, device: torch.device, transformer_impl: str, attention: str):
    """The GPTModel training builds (llama/megatron.py: the same TransformerConfig translation),
    with this benchmark's layer count and settings."""
    from ellama_megatron.llama import megatron as llama_megatron

    fusions = args.fusions == "on"
    runtime = ["--use-cpu-initialization"] if device.type == "cpu" else []
    runtime += ["--no-gradient-accumulation-fusion", "--no-bias-dropout-fusion", "--no-persist-layer-norm"]
    # Fusions Megatron offers without TE/apex: SwiGLU and cross entropy through torch.compile,
    # the masked-softmax CUDA kernel for the unfused attention; RoPE fusion needs TE.
    runtime += ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "native"] if fusions else []
    runtime += [] if fusions else ["--no-bias-swiglu-fusion"]
    runtime += [] if fusions and attention == "unfused" else ["--no-masked-softmax-fusion"]
    runtime += [] if fusions and transformer_impl == "transformer_engine" else ["--no-rope-fusion"]
    runtime += ["--bf16"] if args.dtype == "bf16" else []
    if args.recompute == "full":
        runtime += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    elif args.recompute == "selective":
        runtime += ["--recompute-granularity", "selective"]
    config = llama_megatron.transformer_config(plan.model, transformer_impl, runtime, seq_length=plan.seq_length)
    spec = llama_megatron.layer_spec(transformer_impl, attention)
    model = llama_megatron.build_gpt_model(plan.model, config, spec, plan.model.vocab_size).to(device)
    if config.bf16:
        # As megatron.training's get_model: bf16 weights, fp32 logits/loss out of the wrapper.
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    return model, config


class TorchAdamW:
    """torch AdamW on the model's own (bf16) parameters: 8 bytes/param with gradients, no fp32
    master copy. A lighter stand-in for the engine's optimizer when that one is not wanted."""

    def __init__(self, model, device):
        fused = device.type == "cuda"
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused, foreach=not fused)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def step(self):
        self.optimizer.step()


class MegatronAdam:
    """The engine's optimizer path: Megatron DDP (fp32 gradient buffer) and its distributed
    optimizer (fp32 main params, Adam moments), 18 bytes/param at DP=1 in bf16."""

    def __init__(self, model, config, args):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
        )
        self.model = DistributedDataParallel(config, ddp_config, model)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=1e-5,
                weight_decay=0.1,
                bf16=args.dtype == "bf16",
                use_distributed_optimizer=True,
                clip_grad=1.0,
            ),
            [self.model],
        )

    def zero_grad(self):
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self):
        self.model.finish_grad_sync()
        ok, _, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError("gpu_step: the Megatron optimizer skipped its step")


def run_steps(trainer, plan: RunPlan, args, device, attention, on_step):
    """Warm-up then timed steps; returns the timed steps' seconds and the last loss."""
    model = trainer.model
    seq, accum = plan.seq_length, plan.grad_accumulation
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    tokens = torch.randint(0, plan.model.vocab_size, (plan.micro_batch_size, seq + 1), generator=gen).to(device)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(seq, device=device).unsqueeze(0).expand_as(inputs)
    # Megatron's unfused attention builds its causal mask on "cuda" when given none.
    mask = None
    if attention == "unfused" and device.type == "cpu":
        mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, loss = [], None
    for step in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        trainer.zero_grad()
        for _ in range(accum):
            per_token = model(inputs, positions, mask, labels=labels)
            loss = per_token.float().mean() / accum
            loss.backward()
        trainer.step()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        on_step(step)
    return times, float(loss) * accum


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    # ru_maxrss is KiB on Linux: the whole process, Python and libraries included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (process)"


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " See docs/gpu_speed.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="FLOP formula and memory accounting: see the top of this file and docs/gpu_speed.md.",
    )
    p.add_argument(
        "--model", default="llama31_8b", help="model preset in conf/model (widths, vocab, RoPE) [llama31_8b]"
    )
    p.add_argument(
        "--layers", default="auto", help="transformer layers, or 'auto': as many as the memory estimate fits [auto]"
    )
    p.add_argument("--seq", type=int, default=8192, help="sequence length [8192]")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward/backward [1]")
    p.add_argument("--accum", type=int, default=1, help="micro-batches accumulated per optimizer step [1]")
    p.add_argument("--steps", type=int, default=10, help="timed steps [10]")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, compile) [3]")
    p.add_argument(
        "--transformer",
        default="auto",
        choices=["auto", "te", "local"],
        help="layer implementation, as the config's impl.transformer: TE when it imports (auto) [auto]",
    )
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "sdpa", "unfused"],
        help="local spec's core attention, as impl.attention: auto = sdpa [auto]",
    )
    p.add_argument(
        "--optimizer",
        default="megatron",
        choices=["megatron", "torch"],
        help="megatron: the engine's DDP + distributed optimizer (fp32 main params); "
        "torch: AdamW on the bf16 params (less memory, no fp32 copy) [megatron]",
    )
    p.add_argument(
        "--recompute", default="none", choices=["none", "selective", "full"], help="activation recomputation [none]"
    )
    p.add_argument(
        "--fusions",
        default=None,
        choices=["on", "off"],
        help="Megatron's torch.compile SwiGLU / cross-entropy fusions [on for CUDA, off on CPU]",
    )
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="[bf16 on CUDA, fp32 on CPU]")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="[cuda if available]")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU [from the GPU name: H100/H200 989]"
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=1.0,
        help="fraction of GPU memory 'auto' lets the planner's estimate (allowances included) use [1.0]",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write a PyTorch profiler trace (Chrome JSON) and a kernel table to this folder",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON to this file")
    p.add_argument("--seed", type=int, default=0, help="random tokens and weights [0]")
    p.add_argument(
        "--tiny", action="store_true", help="smoke shape: tiny model, 2 layers, seq 64, 2+1 steps (CPU, seconds)"
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.seq, args.steps, args.warmup = "tiny", 64, 2, 1
        if args.layers == "auto":
            args.layers = "2"
    return args


def validate(args) -> None:
    """Refuse bad input before building anything."""
    for name in ("seq", "micro_batch", "accum", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"gpu_step: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"gpu_step: --warmup must be >= 0, got {args.warmup}")
    if args.layers != "auto" and not (args.layers.isdigit() and int(args.layers) >= 1):
        raise SystemExit(f"gpu_step: --layers must be 'auto' or a positive integer, got {args.layers!r}")
    if not 0 < args.headroom <= 1:
        raise SystemExit(f"gpu_step: --headroom must be in (0, 1], got {args.headroom}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_step: --device cuda but torch sees no GPU; use --device cpu (with --tiny)")


def model_from_args(args) -> LlamaConfig:
    """The --model preset from conf/model, as training loads it; --seq checked against it."""
    try:
        cfg = load_model_config(args.model)
    except ValueError as err:
        raise SystemExit(f"gpu_step: --model: {err}") from err
    if args.seq > cfg.max_position_embeddings:
        raise SystemExit(f"gpu_step: --seq {args.seq} exceeds {cfg.name}'s max_position_embeddings")
    return cfg


def software_versions() -> dict[str, str]:
    import megatron.core

    versions = {
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "cuda": str(torch.version.cuda),
        "python": sys.version.split()[0],
    }
    with contextlib.suppress(Exception):
        versions["cudnn"] = str(torch.backends.cudnn.version())
    with contextlib.suppress(Exception):
        import transformer_engine

        versions["transformer_engine"] = transformer_engine.__version__
    return versions


def profiled(args):
    if args.profile is None:
        return contextlib.nullcontext(None)
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    # Skip the warm-up steps, record the next two.
    return profile(
        activities=activities,
        schedule=schedule(wait=max(args.warmup - 1, 0), warmup=1, active=2),
        record_shapes=True,
        with_stack=False,
    )


def measure(plan: RunPlan, args, device, transformer_impl, attention):
    """Build the model and optimizer, run warm-up and timed steps (profiled if asked)."""
    from tqdm import tqdm

    model, config = build_model(plan, args, device, transformer_impl, attention)
    trainer = MegatronAdam(model, config, args) if args.optimizer == "megatron" else TorchAdamW(model, device)
    bar = tqdm(total=args.warmup + args.steps, desc="steps", unit="step")
    try:
        with profiled(args) as prof:

            def on_step(_step):
                bar.update()
                if prof is not None:
                    prof.step()

            times, loss = run_steps(trainer, plan, args, device, attention, on_step)
    finally:
        bar.close()
    if prof is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.profile / "trace.json"))
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        write_text_atomic(args.profile / "kernels.txt", prof.key_averages().table(sort_by=sort, row_limit=40))
    return times, loss


def main(argv=None) -> dict:
    args = parse_args(argv)
    validate(args)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.fusions = args.fusions or ("on" if device.type == "cuda" else "off")
    from ellama_megatron.llama.megatron import resolve_impl

    try:
        transformer_impl, attention = resolve_impl(args.transformer, args.attention)
    except ValueError as err:
        raise SystemExit(f"gpu_step: --transformer/--attention: {err}") from err
    model_cfg = model_from_args(args)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    total_memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    if args.layers == "auto":
        if total_memory is None:
            raise SystemExit("gpu_step: --layers auto needs a GPU's memory size; give --layers N on CPU")
        plan = step_plan(model_cfg, layers_that_fit(model_cfg, args, total_memory), args)
    else:
        plan = step_plan(model_cfg, int(args.layers), args)
    peak_tflops = args.peak_tflops or (peak_tflops_for(device_name) if device.type == "cuda" else None)

    init_single_process(device, args.seed, attention)
    torch.manual_seed(args.seed)
    print(
        f"gpu_step: {model_cfg.name} shape, {plan.model.num_layers} layers, seq {plan.seq_length}, micro-batch "
        f"{plan.micro_batch_size} x {plan.grad_accumulation}, {args.dtype}, attention {attention}, recompute "
        f"{args.recompute}, fusions {args.fusions}, on {device_name}",
        flush=True,
    )
    while True:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the peak of the attempt that runs
        try:
            times, loss = measure(plan, args, device, transformer_impl, attention)
            break
        except torch.OutOfMemoryError:
            # The planner's estimate is a model; with "auto", step down until the step runs.
            if args.layers != "auto" or plan.model.num_layers == 1:
                raise
        plan = step_plan(model_cfg, plan.model.num_layers - 1, args)
        print(f"gpu_step: out of memory, retrying with {plan.model.num_layers} layers", flush=True)
        gc.collect()  # outside the except block: the traceback no longer holds the old model
        torch.cuda.empty_cache()
    if not math.isfinite(loss):
        raise SystemExit(f"gpu_step: loss is {loss}: the step is broken, figures withheld")

    step_s = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    flops = training_flops_per_token(plan)
    tokens_s = plan.tokens_per_step / step_s
    tflops = {k: v * tokens_s / 1e12 for k, v in flops.items()}
    model_tflops = tflops["dense"] + tflops["attn_causal"]
    peak_mem, peak_kind = peak_memory_bytes(device)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name,
        "software": software_versions(),
        "shape": {
            "preset": model_cfg.name,
            "layers": plan.model.num_layers,
            "seq": plan.seq_length,
            "micro_batch": plan.micro_batch_size,
            "accum": plan.grad_accumulation,
        },
        "model": plan.model.to_dict(),
        "transformer_impl": transformer_impl,
        "attention": attention,
        "recompute": args.recompute,
        "optimizer": args.optimizer,
        "fusions": args.fusions,
        "dtype": args.dtype,
        "parameters": plan.model.num_parameters(),
        "step_s_median": step_s,
        "step_s_all": times,
        "tokens_per_s": tokens_s,
        "model_tflops": model_tflops,
        "model_tflops_no_attention": tflops["dense"],
        "model_tflops_palm_convention": tflops["palm"],
        "peak_tflops": peak_tflops,
        "mfu": model_tflops / peak_tflops if peak_tflops else None,
        "mfu_no_attention": tflops["dense"] / peak_tflops if peak_tflops else None,
        "mfu_palm_convention": tflops["palm"] / peak_tflops if peak_tflops else None,
        "peak_memory_gib": peak_mem / 2**30,
        "peak_memory_kind": peak_kind,
        "planner_estimate_gib": estimate_memory(plan).total / 2**30,
        "final_loss": loss,
    }
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    mfu = (
        f"{100 * result['mfu']:.1f}% MFU ({100 * result['mfu_palm_convention']:.1f}% by the PaLM count)"
        if result["mfu"] is not None
        else "MFU n/a (no GPU peak)"
    )
    print(
        f"gpu_step: {plan.model.num_layers} x {model_cfg.name} layers, step {step_s * 1e3:.1f} ms, "
        f"{tokens_s:,.0f} tokens/s, {model_tflops:.4g} model TFLOP/s ({tflops['dense']:.4g} without "
        f"attention), {mfu}, peak memory {result['peak_memory_gib']:.2f} GiB ({peak_kind}; planner "
        f"{result['planner_estimate_gib']:.2f} GiB), loss {loss:.3f}",
        flush=True,
    )
    return result


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
