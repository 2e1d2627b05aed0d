"""The e-Llama method end to end in miniature, on CPU: the stages behind recipes/demo.py.

Every stage calls the command-line tool a user would run (tools/*.py, recipes/cpt.py,
slurm/8b.sbatch) as a subprocess, so the demo exercises the same code paths as a real run. Each
stage leaves a marker file (``stages/<key>.json``: seconds, one-line summary, results); a second
run reuses the stages whose marker exists and says so. Changed options start clean.

Why the base model is pre-trained on general text first: a random model knows neither domain, and
the demo's general text is far more regular than its listings, so continued pretraining from a
random model lowers the general loss most (measured: general 6.24 -> 1.76, e-commerce 6.24 -> 3.22
after 120 iterations at LR 2e-3 on the 1:1 mix). Meta's base model already knows general text; a short general-only run
stands in for that pretraining, so continued pretraining then shows what the paper shows: the
e-commerce loss falls much more than the general one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ellama_megatron.testing.slurm import FINAL_STATES, SBATCH_CPU, LocalSlurm, SlurmClient, SlurmError, find_cluster

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = {"listings": "listing", "reviews": "review", "general_en": "plain", "general_multilingual": "plain"}
DOMAINS = {"general": ("general_en", "general_multilingual"), "ecommerce": ("listings", "reviews")}
# The tiny run's shape (conf/train/tiny.yaml): tokens per iteration = global batch x sequence.
TOKENS_PER_ITERATION = 8 * 128
TINY = ["model=tiny", "parallel=single", "train=tiny", "optim=cpt", "cluster=local_cpu"]


class DemoError(RuntimeError):
    pass


@dataclass
class DemoOptions:
    docs: int = 400  # documents per demo corpus
    base_iters: int = 100  # general-only "pretraining" of the random model (0: the random model is the base)
    base_lr: float = 4e-3  # its peak LR (measured: 2e-3 learns slower, 6e-3 is unstable)
    cpt_iters: int = 80  # continued-pretraining iterations on the 1:1 mix
    cpt_lr: float = 1e-3  # its peak LR (about half the base's, as CPT uses a fraction of the original)
    eval_interval: int = 10  # validation every N CPT iterations
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)  # merge weights of the adapted model besides 0 and 1
    launcher: str = "auto"  # auto | slurm | direct
    overrides: tuple[str, ...] = ()  # extra Hydra overrides for both training runs

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["alphas"], d["overrides"] = list(d["alphas"]), list(d["overrides"])
        d.pop("launcher")  # how training is launched does not change its result
        return d


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

    def run(self, key: str, fn) -> dict:
        title = self.titles[key]
        n = f"[{len(self.records) + 1}/{len(self.titles)}]"
        marker = self.out / "stages" / f"{key}.json"
        if marker.exists():
            done = json.loads(marker.read_text())
            print(f"{n} {title}: reused from an earlier run ({done['seconds']:.1f} s then): {done['summary']}", flush=True)
            self.records.append(StageRecord(key, title, done["seconds"], True, done["summary"]))
            return done["result"]
        print(f"{n} {title} ...", flush=True)
        start = time.time()
        result = fn()
        seconds = time.time() - start
        summary = result.pop("summary")
        write_json(marker, {"seconds": seconds, "summary": summary, "result": result})
        print(f"    {summary} ({seconds:.1f} s)", flush=True)
        self.records.append(StageRecord(key, title, seconds, False, summary))
        return result


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
    return path


def tool_env() -> dict:
    # One thread per tool: the models are tiny, and on a busy 2-core machine evaluation ran 1.6x
    # faster with one thread than with two (measured). Training ranks get theirs from torchrun/srun.
    return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}


def run_tool(args: list[str], log: Path, echo=None) -> str:
    """Run ``python args...`` from the repository root, output to ``log``; returns the output.

    ``echo(line)`` may return a short form of a line to print as progress."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *map(str, args)]
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=tool_env())
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


# ---- Slurm -----------------------------------------------------------------------------------

def sbatch_train(overrides: list[str], log: Path, slurm: SlurmClient, job_name: str, echo) -> int:
    """Submit slurm/8b.sbatch with the tiny CPU overrides, follow its output, return its exit code."""
    if log.exists():
        log.unlink()  # --open-mode=append: a resubmission would add to the old log
    try:
        job = slurm.sbatch(*SBATCH_CPU, f"--job-name={job_name}", f"--output={log}", "slurm/8b.sbatch", *overrides,
                           env={"ELLAMA_LOG_ROOT": str(log.parent / "slurm_logs")}, cwd=REPO)
    except SlurmError as e:
        raise DemoError(str(e)) from None
    print(f"    submitted slurm/8b.sbatch as job {job} (1 node x 2 CPU tasks); following {log.name}", flush=True)
    seen, waiting_said = 0, False
    try:
        while True:
            state = slurm.job(job)
            if log.exists():
                text = log.read_text(errors="replace")
                # Whole lines only: the job is still writing the last one.
                complete = text[:text.rfind("\n") + 1]
                for line in complete[seen:].splitlines():
                    short = echo(line)
                    if short:
                        print("    " + short, flush=True)
                seen = len(complete)
            if state.get("JobState") == "PENDING" and not seen and not waiting_said:
                print(f"    job {job} is waiting for the node ({state.get('Reason', '?')})", flush=True)
                waiting_said = True
            if state.get("JobState") in FINAL_STATES:
                code = state.get("ExitCode", "1:0").split(":")[0]
                return 0 if state["JobState"] == "COMPLETED" else int(code or 1) or 1
            time.sleep(1)
    except BaseException:
        slurm.cancel(job)
        print(f"    cancelled job {job}", flush=True)
        raise


# ---- data --------------------------------------------------------------------------------------

def merge_indexed(prefixes: list[Path], out_prefix: Path) -> Path:
    """Concatenate Megatron indexed datasets into one (one held-out set per domain for evaluation)."""
    import logging

    # Megatron warns about the missing Transformer Engine and process group; not the reader's concern here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

        dtype = IndexedDataset(str(prefixes[0])).index.dtype
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(f"{out_prefix}.bin", dtype=dtype)
        for p in prefixes:
            builder.add_index(str(p))
        builder.finalize(f"{out_prefix}.idx")
    return out_prefix


# ---- the pipeline -------------------------------------------------------------------------------

TITLES = {
    "corpora": "demo corpora (listings, reviews in en/de/fr; general text)",
    "tokenizer": "tiny tokenizer trained on the corpora",
    "random_model": "random Llama 3.1-shaped model (Hugging Face format)",
    "preprocess": "tools/preprocess_data.py on each corpus",
    "base_pretrain": "base model: general-only pretraining stand-in",
    "import": "tools/convert_hf.py import --verify (the base)",
    "plan_blend": "tools/plan_blend.py: the paper's 1:1 mix",
    "cpt": "continued pretraining",
    "export": "tools/convert_hf.py export (the adapted model)",
    "merge_curve": "tools/merge_curve.py: merge with the base at several alphas, evaluate both domains",
    "report": "report",
}


def prepare_output(out: Path, opts: DemoOptions, clean: bool) -> None:
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
    write_json(options_file, opts.fingerprint())


def run_demo(out: str | Path, opts: DemoOptions, clean: bool = False) -> Path:
    out = Path(out).resolve()
    if opts.launcher not in ("auto", "slurm", "direct"):
        raise DemoError(f"--launcher {opts.launcher!r}: use auto, slurm or direct")
    for name in ("docs", "cpt_iters", "eval_interval"):
        if getattr(opts, name) < 1:
            raise DemoError(f"--{name.replace('_', '-')} must be at least 1")
    prepare_output(out, opts, clean)
    titles = dict(TITLES)
    if opts.base_iters == 0:
        titles.pop("base_pretrain")
    stages = Stages(out, titles)
    slurm = LocalSlurm()
    start = time.time()
    try:
        _pipeline(out, opts, stages, slurm, list(opts.overrides))
    finally:
        if slurm.stop():
            print("stopped the local Slurm this demo started", flush=True)
    total = time.time() - start
    print(f"demo done in {total:.0f} s ({sum(not r.reused for r in stages.records)} stages run, "
          f"{sum(r.reused for r in stages.records)} reused); report: {out / 'REPORT.md'}", flush=True)
    return out / "REPORT.md"


def _train(run_dir: Path, overrides: list[str], opts: DemoOptions, slurm: LocalSlurm, job_name: str) -> dict:
    """One training run through slurm/8b.sbatch when a Slurm cluster answers, else recipes/cpt.py."""
    from ellama_megatron.engine.train_log import parse_train_log

    log = run_dir / "train.log"
    finished = (run_dir / "done.json").exists() and log.exists()
    if finished:
        # Trained in an earlier demo that stopped in a later step of this stage.
        print(f"    {run_dir.name} finished in an earlier run: reusing it", flush=True)
        parsed = parse_train_log(log.read_text(errors="replace"))
        launcher = (run_dir / "launcher.txt").read_text().strip() if (run_dir / "launcher.txt").exists() else "an earlier run"
    else:
        # An unfinished run starts over: the demo saves no intermediate checkpoints to resume from.
        shutil.rmtree(run_dir, ignore_errors=True)
        launcher = _launch(run_dir, log, overrides, opts, slurm, job_name)
        (run_dir / "launcher.txt").write_text(launcher + "\n")
        parsed = parse_train_log(log.read_text(errors="replace"))
    if parsed.last_iteration != parsed.train_iters or not parsed.valid_loss:
        raise DemoError(f"training stopped at iteration {parsed.last_iteration} of {parsed.train_iters}; see {log}")
    valid = {d: [[i, v] for i, v in sorted(losses.items())] for d, losses in parsed.valid_loss.items()}
    return {"launcher": launcher, "log": str(log), "iterations": parsed.last_iteration, "valid": valid,
            "train_first": parsed.train_loss[min(parsed.train_loss)], "train_last": parsed.train_loss[parsed.last_iteration]}


def _launch(run_dir: Path, log: Path, overrides: list[str], opts: DemoOptions, slurm: LocalSlurm, job_name: str) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = None if opts.launcher == "direct" else find_cluster(REPO)
    if cluster is None and opts.launcher == "slurm":
        print("    starting a local Slurm (python -m ellama_megatron.testing.slurm start)", flush=True)
        try:
            cluster = slurm.start(REPO)
        except SlurmError as e:
            raise DemoError(f"{e}\nrun with --launcher direct to train without Slurm") from None
    if cluster is not None:
        code = sbatch_train([*TINY, f"run_dir={run_dir}", *overrides], log, cluster, job_name, progress_line)
        if code:
            raise DemoError(f"the Slurm job failed (exit {code}); see {log}")
        return "slurm/8b.sbatch on the local Slurm (1 node x 2 CPU tasks)"
    run_tool(["recipes/cpt.py", *TINY, f"run_dir={run_dir}", *overrides], log, echo=progress_line)
    return "recipes/cpt.py (torchrun, 2 CPU ranks)"


def _valid_change(valid: dict) -> str:
    if all(len(pts) == 1 for pts in valid.values()):
        return ", ".join(f"{d} {pts[0][1]:.3f}" for d, pts in valid.items()) + f" at iteration {next(iter(valid.values()))[0][0]}"
    return ", ".join(f"{d} {pts[0][1]:.3f} -> {pts[-1][1]:.3f}" for d, pts in valid.items())


def progress_line(line: str) -> str | None:
    """Training progress worth printing: every 10th iteration and every validation loss."""
    from ellama_megatron.engine.train_log import compact_line

    short = compact_line(line)
    if short and short.startswith("iteration") and "validation" not in short:
        m = re.match(r"iteration\s+(\d+)/(\d+)", short)
        if m and int(m.group(1)) % 10 and m.group(1) not in ("1", m.group(2)):
            return None
    return short


def _pipeline(out: Path, opts: DemoOptions, stages: Stages, slurm: LocalSlurm, extra: list[str]) -> None:
    from ellama_megatron.data.demo_corpora import write_demo_corpora
    from ellama_megatron.llama.config import load_model_config
    from ellama_megatron.testing.tiny_llama import train_tiny_tokenizer, write_random_hf_llama

    raw_dir, tok_dir, data_dir = out / "raw", out / "tokenizer", out / "data"
    logs = out / "logs"

    def corpora():
        paths = write_demo_corpora(raw_dir, docs=opts.docs, seed=0)
        counts = {k: sum(1 for _ in open(p, encoding="utf-8")) for k, p in paths.items()}
        return {"files": {k: str(p) for k, p in paths.items()}, "records": counts,
                "summary": ", ".join(f"{k} {n}" for k, n in counts.items()) + " records"}

    raw = stages.run("corpora", corpora)["files"]

    def tokenizer():
        texts = [line for p in raw.values() for line in open(p, encoding="utf-8")]
        train_tiny_tokenizer(texts, tok_dir, vocab_size=load_model_config("tiny").vocab_size)
        return {"summary": f"byte-level BPE, {load_model_config('tiny').vocab_size} ids, Llama 3 special tokens -> {tok_dir.name}/"}

    stages.run("tokenizer", tokenizer)

    def random_model():
        cfg = load_model_config("tiny")
        write_random_hf_llama(out / "random_hf", cfg, seed=0, tokenizer_dir=tok_dir)
        return {"summary": f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, GQA {cfg.num_attention_heads}/"
                           f"{cfg.num_query_groups}, llama3 RoPE -> random_hf/"}

    stages.run("random_model", random_model)

    def preprocess():
        def one(name):
            text = run_tool(["tools/preprocess_data.py", "--input", raw[name], "--template", TEMPLATES[name],
                             "--tokenizer", tok_dir, "--output-prefix", data_dir / name, "--id-key", "id",
                             "--valid-fraction", "0.1", "--overwrite", "--quiet"], logs / f"preprocess_{name}.log")
            print("    " + last_line(text), flush=True)

        # Two at a time: most of each run is Python start-up, and there are two cores.
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(one, raw))
        manifests = {name: json.loads((data_dir / f"{name}.manifest.json").read_text()) for name in raw}
        tokens = {n: m["splits"]["train"]["tokens"] for n, m in manifests.items()}
        for domain, names in DOMAINS.items():
            merge_indexed([data_dir / f"{n}_valid" for n in names], out / "heldout" / domain)
        return {"train_tokens": tokens, "summary": "training tokens " + ", ".join(f"{n} {t:,}" for n, t in tokens.items())}

    stages.run("preprocess", preprocess)
    valid = {d: [str(data_dir / f"{n}_valid") for n in names] for d, names in DOMAINS.items()}

    base_hf = out / "random_hf"
    if opts.base_iters > 0:
        def base_pretrain():
            # Stand-in for Meta's pretraining: the random model trained on general text only, both
            # domains validated. It starts from the random HF model through the importer.
            run_tool(["tools/convert_hf.py", "import", "--hf-dir", out / "random_hf", "--out", out / "random_megatron",
                      "--overwrite", "--quiet"], logs / "import_random.log")
            blend = write_json(out / "base_blend.json", {
                "train": [{"prefix": str(data_dir / f"{n}_train"), "weight": 1.0} for n in DOMAINS["general"]],
                "valid": valid})
            result = _train(out / "base_run", [
                "data=demo", f"data.blend_file={blend}", f"checkpoint.init_from={out / 'random_megatron'}",
                f"train.train_tokens={opts.base_iters * TOKENS_PER_ITERATION}", f"train.eval_interval={opts.base_iters}",
                f"optim.lr={opts.base_lr}", f"optim.min_lr={opts.base_lr / 10}", "checkpoint.save_optim=false", *extra,
            ], opts, slurm, "ellama-demo-base")
            run_tool(["tools/convert_hf.py", "export", "--ckpt", out / "base_run" / "checkpoints", "--out", out / "base_hf",
                      "--overwrite", "--quiet"], logs / "export_base.log")
            result["summary"] = (f"{result['iterations']} iterations on general text via {result['launcher']}; "
                                 f"validation {_valid_change(result['valid'])} -> base_hf/")
            return result

        base = stages.run("base_pretrain", base_pretrain)
        base_hf = out / "base_hf"
    else:
        base = None

    def import_base():
        text = run_tool(["tools/convert_hf.py", "import", "--hf-dir", base_hf, "--out", out / "base_megatron",
                         "--verify", "--overwrite", "--quiet"], logs / "import_base.log")
        stats = json.loads(last_line_json(text))
        return {"verify": stats["verify"], "summary": last_line(text, "verify:") + " -> base_megatron/"}

    stages.run("import", import_base)

    cpt_tokens = opts.cpt_iters * TOKENS_PER_ITERATION
    blend_file = out / "blend.json"

    def plan():
        text = run_tool(["tools/plan_blend.py", *TINY, "data=demo_blend", f"data.root={data_dir}",
                         f"data.blend_file={blend_file}", f"train.train_tokens={cpt_tokens}"], logs / "plan_blend.log")
        table = "\n".join(line for line in text.splitlines() if not line.startswith(("$ ", "wrote ")))
        (out / "blend_table.txt").write_text(table.strip() + "\n")
        return {"summary": last_line(text, "wrote").replace(str(out) + "/", "")}

    stages.run("plan_blend", plan)
    print("\n".join("    " + line for line in (out / "blend_table.txt").read_text().splitlines()), flush=True)

    def cpt():
        result = _train(out / "cpt_run", [
            "data=demo", f"data.blend_file={blend_file}", f"checkpoint.init_from={out / 'base_megatron'}",
            f"train.train_tokens={cpt_tokens}", f"train.eval_interval={opts.eval_interval}",
            f"optim.lr={opts.cpt_lr}", f"optim.min_lr={opts.cpt_lr / 10}", *extra,
        ], opts, slurm, "ellama-demo-cpt")
        same_sets = json.loads(blend_file.read_text())["valid"] == valid
        if base and same_sets:
            # The base run's last validation used the same held-out sets, sequence length and seed:
            # it is this run's validation loss at iteration 0 (Megatron does not validate before step 1).
            result["valid"] = {d: [[0, base["valid"][d][-1][1]], *pts] for d, pts in result["valid"].items()}
        result["summary"] = f"{result['iterations']} iterations via {result['launcher']}; validation {_valid_change(result['valid'])}"
        return result

    cpt_result = stages.run("cpt", cpt)

    def export():
        text = run_tool(["tools/convert_hf.py", "export", "--ckpt", out / "cpt_run" / "checkpoints",
                         "--out", out / "adapted_hf", "--overwrite", "--quiet"], logs / "export_adapted.log")
        return {"summary": last_line(text, "export").replace(str(out) + "/", "")}

    stages.run("export", export)
    heldout = [f"{d}={out / 'heldout' / d}" for d in DOMAINS]

    def merge_curve():
        run_tool(["tools/merge_curve.py", "--base", base_hf, "--adapted", out / "adapted_hf",
                  *sum((["--data", h] for h in heldout), []), *sum((["--alpha", str(a)] for a in opts.alphas), []),
                  "--seq-length", "128", "--device", "cpu", "--out", out / "merge_curve"], logs / "merge_curve.log")
        points = json.loads((out / "merge_curve" / "curve.json").read_text())["points"]
        loss = {p["label"]: {d: v["mean_loss"] for d, v in p["domains"].items()} for p in points if p["label"] != "merged"}
        change = ", ".join(f"{d} {loss['base'][d]:.3f} -> {loss['adapted'][d]:.3f}" for d in DOMAINS)
        return {"loss": loss, "summary": f"{len(points)} alphas on both domains; held-out loss base -> adapted: {change}"}

    evaluation = stages.run("merge_curve", merge_curve)

    def report():
        run_tool(["tools/plot_training_curves.py", cpt_result["log"], "--out", out / "loss_curves.png",
                  "--json", out / "loss_curves.json", "--title", "Continued pretraining: per-domain losses"],
                 logs / "plot_training_curves.log")
        write_report(out, stages, base, cpt_result, evaluation)
        return {"summary": "REPORT.md, loss_curves.png, merge_curve/curve.png"}

    stages.run("report", report)
    # The report's stage table is written before its own line: add it now that it is timed.
    write_report(out, stages, base, cpt_result, evaluation)


def last_line_json(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return line
    raise DemoError("no JSON summary line in the tool's output")


def _fell(valid: dict, domain: str) -> float:
    pts = valid[domain]
    return pts[0][1] - pts[-1][1]


def write_report(out: Path, stages: Stages, base: dict | None, cpt: dict, evaluation: dict) -> Path:
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731 (paths in the report stay relative to it)
    lines = ["# e-Llama in miniature: report", "",
             "Continued pretraining of a tiny Llama 3.1-shaped model on a 1:1 mix of general and e-commerce "
             "text, on CPU, through the same tools as a full-size run. Written by `python recipes/demo.py`.", "",
             "## Stages", "", "| # | stage | time (s) | run | result |", "|---|---|---:|---|---|"]
    for i, r in enumerate(stages.records, 1):
        lines.append(f"| {i} | {r.title} | {r.seconds:.1f} | {'reused' if r.reused else 'this run'} | {r.summary} |")
    lines.append(f"\nTotal: {sum(r.seconds for r in stages.records):.0f} s of stage time.")
    lines += ["", "## Blend (tools/plan_blend.py, the paper's 1:1 mix)", "", "```",
              (out / "blend_table.txt").read_text().rstrip(), "```", ""]
    if base:
        lines += ["## Base model", "",
                  f"A random model trained {base['iterations']} iterations on general text only (standing in for "
                  f"Meta's pretraining): validation {_valid_change(base['valid'])}. It knows general text and not "
                  "e-commerce, as the real base model does.", ""]
    v = cpt["valid"]
    first, last = next(iter(v.values()))[0][0], next(iter(v.values()))[-1][0]
    lines += ["## Continued pretraining", "",
              f"{cpt['iterations']} iterations via {cpt['launcher']}, from the imported base checkpoint. "
              f"Training loss {cpt['train_first']:.3f} -> {cpt['train_last']:.3f}. Validation loss per domain"
              + (" (iteration 0: the base run's last validation, on the same sets):" if first == 0 else ":"), "",
              f"| domain | iteration {first} | iteration {last} | fell by |", "|---|---:|---:|---:|"]
    for d, pts in v.items():
        lines.append(f"| {d} | {pts[0][1]:.3f} | {pts[-1][1]:.3f} | {_fell(v, d):.3f} |")
    ev = evaluation["loss"]
    lines += ["", "Held-out loss (tools/merge_curve.py at alpha 0 and 1; the validation documents, 128-token windows):", "",
              "| domain | base | adapted | fell by |", "|---|---:|---:|---:|"]
    for d in ev["base"]:
        lines.append(f"| {d} | {ev['base'][d]:.3f} | {ev['adapted'][d]:.3f} | {ev['base'][d] - ev['adapted'][d]:.3f} |")
    lines += ["", f"![per-domain loss curves]({rel(out / 'loss_curves.png')})", "",
              "## Merging with the base (tools/merge_curve.py)", "",
              (out / "merge_curve" / "curve.md").read_text().rstrip(), "",
              f"![merge trade-off]({rel(out / 'merge_curve' / 'curve.png')})", "",
              "Logs of every tool: `logs/`; training logs: `base_run/train.log`, `cpt_run/train.log`."]
    tmp = out / "REPORT.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "REPORT.md")
    return out / "REPORT.md"
