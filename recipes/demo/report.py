"""REPORT.md: stage times, the blend table, the base and continued-pretraining losses, the merge curve."""

from __future__ import annotations

import os
from pathlib import Path

from ellama_megatron.formats.atomic import write_text_atomic

from .runner import Stages
from .training import valid_change


def fell(valid: dict, domain: str) -> float:
    pts = valid[domain]
    return pts[0][1] - pts[-1][1]


def write_report(out: Path, stages: Stages, base: dict | None, cpt: dict, evaluation: dict) -> Path:
    def rel(p: Path) -> str:
        return os.path.relpath(p, out)  # paths in the report stay relative to it

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
                  f"Meta's pretraining): validation {valid_change(base['valid'])}. It knows general text and not "
                  "e-commerce, as the real base model does.", ""]
    v = cpt["valid"]
    first, last = next(iter(v.values()))[0][0], next(iter(v.values()))[-1][0]
    lines += ["## Continued pretraining", "",
              f"{cpt['iterations']} iterations via {cpt['launcher']}, from the imported base checkpoint. "
              f"Training loss {cpt['train_first']:.3f} -> {cpt['train_last']:.3f}. Validation loss per domain"
              + (" (iteration 0: the base run's last validation, on the same sets):" if first == 0 else ":"), "",
              f"| domain | iteration {first} | iteration {last} | fell by |", "|---|---:|---:|---:|"]
    for d, pts in v.items():
        lines.append(f"| {d} | {pts[0][1]:.3f} | {pts[-1][1]:.3f} | {fell(v, d):.3f} |")
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
    return write_text_atomic(out / "REPORT.md", "\n".join(lines) + "\n")
