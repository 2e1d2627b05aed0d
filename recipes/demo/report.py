"""REPORT.md: stage times, the blend table, the base and continued-pretraining losses, the training run's
goodput report, the merge curve."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from ellama_megatron.formats.atomic import write_text_atomic

from .runner import Stages
from .training import valid_change


def fell(valid: dict, domain: str) -> float:
    pts = valid[domain]
    return pts[0][1] - pts[-1][1]


def change(before: float, after: float) -> str:
    """A perplexity's change in words: ``rose 14.2 -> 15.0 (+5.6%)``."""
    return f"{'rose' if after > before else 'fell'} {before:.2f} -> {after:.2f} ({(after / before - 1) * 100:+.1f}%)"


def what_it_shows(evaluation: dict, points: list[dict]) -> list[str]:
    """The paper's three findings, stated with this run's held-out perplexities (whatever they are);
    ``points``: the merge curve's."""
    ppl = {label: {d: math.exp(v) for d, v in losses.items()} for label, losses in evaluation["loss"].items()}
    base, adapted = ppl["base"], ppl["adapted"]
    learnt = adapted["ecommerce"] < base["ecommerce"]
    forgot = adapted["general"] > base["general"]
    return [
        "## What it shows",
        "",
        f"- E-commerce perplexity {change(base['ecommerce'], adapted['ecommerce'])}: "
        + ("the model learnt the domain." if learnt else "the run did not learn the domain (too few iterations?)."),
        f"- General perplexity (the Python reference, never trained on) {change(base['general'], adapted['general'])}: "
        + (
            "what continued pretraining costs outside the domain (the paper's loss of general ability)."
            if forgot
            else "no loss of general ability in this run, unlike the paper's (a short run, or replay "
            "text close to the validation text)."
        ),
        "- Merging with the base trades one against the other (the table below goes from the base, alpha 0, to "
        "the adapted model, alpha 1): "
        + "; ".join(
            f"alpha {p['alpha']:g} e-commerce {p['domains']['ecommerce']['perplexity']:.2f}, general "
            f"{p['domains']['general']['perplexity']:.2f}"
            for p in points
            if p["label"] == "merged"
        )
        + ".",
        "",
    ]


def run_report_lines(run_dir: Path, out: Path) -> list[str]:
    """The CPT run's goodput report as tools/run_report.py wrote it (table and picture), its headings
    two levels down, its picture's link relative to REPORT.md; none for a run reused from a demo that
    had no run report yet."""
    from ellama_megatron.run.report import REPORT_DIR, REPORT_MD, REPORT_PNG

    table, png = run_dir / REPORT_DIR / REPORT_MD, run_dir / REPORT_DIR / REPORT_PNG
    if not table.exists():
        return []
    text = re.sub(r"^#", "###", table.read_text(), flags=re.M)
    text = text.replace(f"]({REPORT_PNG})", f"]({os.path.relpath(png, out)})")
    return [
        "## Where the training run's time went (tools/run_report.py)",
        "",
        "Every second of the continued-pretraining run's launches, from its events and rank 0's timeline: "
        'goodput is the share in iterations that are in the final model (docs/slurm.md, "The run report").',
        "",
        text.rstrip(),
        "",
    ]


def write_report(out: Path, model: str | None, stages: Stages, base: dict | None, cpt: dict, evaluation: dict) -> Path:
    """``model``: what --real trained (None: the tiny demo)."""

    def rel(p: Path) -> str:
        return os.path.relpath(p, out)  # paths in the report stay relative to it

    if model:
        intro = [
            "# e-Llama on a real model: report",
            "",
            f"Continued pretraining of {model} with its own tokenizer on a 1:1 mix of real general prose "
            "(licence texts that ship with Debian and Python) "
            "and e-commerce listings and reviews, on CPU, through the same tools as a full-size run. General "
            "perplexity is measured on the Python language reference, which the run never trains on. Written by "
            "`python recipes/demo.py --real`.",
            "",
            *what_it_shows(evaluation, json.loads((out / "merge_curve" / "curve.json").read_text())["points"]),
        ]
    else:
        intro = [
            "# e-Llama in miniature: report",
            "",
            "Continued pretraining of a tiny Llama 3.1-shaped model on a 1:1 mix of general and e-commerce "
            "text, on CPU, through the same tools as a full-size run. Written by `python recipes/demo.py`.",
            "",
        ]
    lines = [*intro, "## Stages", "", "| # | stage | time (s) | run | result |", "|---|---|---:|---|---|"]
    for i, r in enumerate(stages.records, 1):
        lines.append(f"| {i} | {r.title} | {r.seconds:.1f} | {'reused' if r.reused else 'this run'} | {r.summary} |")
    lines.append(f"\nTotal: {sum(r.seconds for r in stages.records):.0f} s of stage time.")
    lines += [
        "",
        "## Blend (tools/plan_blend.py, the paper's 1:1 mix)",
        "",
        "```",
        (out / "blend_table.txt").read_text().rstrip(),
        "```",
        "",
    ]
    if base:
        lines += [
            "## Base model",
            "",
            f"A random model trained {base['iterations']} iterations on general text only (standing in for "
            f"Meta's pretraining): validation {valid_change(base['valid'])}. It knows general text and not "
            "the domain's, as the real base model knows little e-commerce.",
            "",
        ]
    v = cpt["valid"]
    first, last = next(iter(v.values()))[0][0], next(iter(v.values()))[-1][0]
    lines += [
        "## Continued pretraining",
        "",
        f"{cpt['iterations']} iterations via {cpt['launcher']}, from the imported base checkpoint. "
        f"Training loss {cpt['train_first']:.3f} -> {cpt['train_last']:.3f}. Validation loss (perplexity) per domain"
        + (" (iteration 0: before the first step, the base model):" if first == 0 else ":"),
        "",
        f"| domain | iteration {first} | iteration {last} | loss fell by |",
        "|---|---:|---:|---:|",
    ]
    for d, pts in v.items():
        lines.append(
            f"| {d} | {pts[0][1]:.3f} ({math.exp(pts[0][1]):.2f}) | {pts[-1][1]:.3f} ({math.exp(pts[-1][1]):.2f}) "
            f"| {fell(v, d):.3f} |"
        )
    ev = evaluation["loss"]
    lines += [
        "",
        "Held-out loss (perplexity) (tools/merge_curve.py at alpha 0 and 1; the validation documents, "
        "128-token windows):",
        "",
        "| domain | base | adapted | loss fell by |",
        "|---|---:|---:|---:|",
    ]
    for d in ev["base"]:
        lines.append(
            f"| {d} | {ev['base'][d]:.3f} ({math.exp(ev['base'][d]):.2f}) | {ev['adapted'][d]:.3f} "
            f"({math.exp(ev['adapted'][d]):.2f}) | {ev['base'][d] - ev['adapted'][d]:.3f} |"
        )
    lines += [
        "",
        f"![per-domain loss curves]({rel(out / 'loss_curves.png')})",
        "",
        *run_report_lines(Path(cpt["log"]).parent, out),
        "## Merging with the base (tools/merge_curve.py)",
        "",
        (out / "merge_curve" / "curve.md").read_text().rstrip(),
        "",
        f"![merge trade-off]({rel(out / 'merge_curve' / 'curve.png')})",
        "",
        "Logs of every tool: `logs/`; training logs: "
        + ("`cpt_run/train.log`." if base is None else "`base_run/train.log`, `cpt_run/train.log`."),
    ]
    return write_text_atomic(out / "REPORT.md", "\n".join(lines) + "\n")
