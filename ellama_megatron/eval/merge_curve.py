"""The merge curve: merge base and adapted at several alphas, evaluate every point on every
held-out domain, and write a table (markdown + JSON) and a plot of general vs domain perplexity.

alpha 0 is the base model and alpha 1 the adapted model: they are evaluated from the input
folders directly (a linear merge at 0 or 1 is bit-identical to them). Either input may be a
Megatron checkpoint: it is exported once to a temporary Hugging Face folder (bit-exact) and the
curve is measured on that. An average of checkpoints (ellama_megatron.merge.average) may be added
as one more point: it is off the alpha axis, so it is a row of the table and a marker of the
trade-off plot.
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path

from ellama_megatron.eval.heldout_data import DomainSource
from ellama_megatron.formats.atomic import write_figure_atomic, write_json_atomic, write_text_atomic


def markdown_table(points: list[dict], domains: list[str]) -> str:
    head = "| alpha | model | " + " | ".join(f"{d} ppl" for d in domains) + " |"
    sep = "|---:|---|" + "---:|" * len(domains)
    rows = [
        f"| {'-' if p['alpha'] is None else format(p['alpha'], 'g')} | {p['label']} | "
        + " | ".join(f"{p['domains'][d]['perplexity']:.4f}" for d in domains)
        + " |"
        for p in points
    ]
    return "\n".join([head, sep, *rows]) + "\n"


def plot_tradeoff(points: list[dict], general: str, domain: str, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    extra = [p for p in points if p["alpha"] is None]  # off the alpha axis: the checkpoint average
    points = [p for p in points if p["alpha"] is not None]
    alphas = [p["alpha"] for p in points]
    g = [p["domains"][general]["perplexity"] for p in points]
    d = [p["domains"][domain]["perplexity"] for p in points]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(alphas, g, "o-", label=general)
    ax1.plot(alphas, d, "s-", label=domain)
    ax1.set_xlabel("alpha (0 = base, 1 = adapted)")
    # Log scale: a general perplexity of 15 and a domain one of 3 differ 5x, and the general one's
    # small rise would be a flat line on a linear axis shared with the domain's large fall.
    ax1.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 30, not 3 x 10^1
    ax1.yaxis.set_major_formatter(plain)
    ax1.yaxis.set_minor_formatter(plain)
    ax1.set_ylabel("perplexity (log scale)")
    ax1.set_title("Perplexity along the merge")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(g, d, "o-", color="tab:purple")
    for p, x, y in zip(points, g, d):
        ax2.annotate(
            p["label"] if p["label"] in ("base", "adapted") else f"{p['alpha']:g}",
            (x, y),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    for p in extra:
        x, y = p["domains"][general]["perplexity"], p["domains"][domain]["perplexity"]
        ax2.plot([x], [y], "D", color="tab:orange", label=p["label"])
        ax2.annotate(p["label"], (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax2.set_xlabel(f"{general} perplexity")
    ax2.set_ylabel(f"{domain} perplexity")
    ax2.set_title("Trade-off (lower-left is better)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return write_figure_atomic(out_png, fig)


def run_merge_curve(
    base: str | Path,
    adapted: str | Path,
    alphas: list[float],
    sources: list[DomainSource],
    out_dir: str | Path,
    general: str = "general",
    domain: str = "ecommerce",
    method: str = "linear",
    seq_length: int = 2048,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    max_docs: int | None = None,
    keep_merged: bool = False,
    progress: bool = True,
    average=None,
) -> dict:
    """``average``: an AverageRequest (ellama_megatron.merge.average.select_checkpoints) whose
    average is evaluated as one more point, labelled ``average of N``."""
    from ellama_megatron.eval.model_folder import hf_folder_of
    from ellama_megatron.eval.perplexity import evaluate_model_dir
    from ellama_megatron.formats.megatron_checkpoint import folder_kind
    from ellama_megatron.merge.merge_hf import merge_hf_folders

    names = [s.name for s in sources]
    for role, name in (("--general-domain", general), ("--domain", domain)):
        if name not in names:
            raise ValueError(f"{role} {name!r} is not one of the --data domains {names}")
    for role, path in (("--base", base), ("--adapted", adapted)):
        folder_kind(path, role)  # unknown kinds are refused before any work
    alphas = sorted(set([0.0, 1.0] + [float(a) for a in alphas]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inner = [a for a in alphas if a not in (0.0, 1.0)]
    merged_root = out / "merged"
    points = []
    try:
        with ExitStack() as stack:
            # Megatron checkpoints are exported once each (bit-exact) and the curve is measured on the
            # Hugging Face folders: two exports instead of one per alpha.
            hf_base = stack.enter_context(hf_folder_of(base, "--base", merged_root / "exports", progress=progress))
            hf_adapted = stack.enter_context(
                hf_folder_of(adapted, "--adapted", merged_root / "exports", progress=progress)
            )
            models = {0.0: hf_base, 1.0: hf_adapted}
            if inner:
                # One pass over the inputs writes every intermediate alpha.
                dirs = merge_hf_folders(
                    hf_base,
                    [hf_adapted],
                    inner,
                    merged_root / "alphas",
                    method=method,
                    overwrite=True,
                    progress=progress,
                ).outputs
                models.update(zip(inner, dirs))
            for a in alphas:
                r = evaluate_model_dir(
                    models[a], sources, seq_length, batch_size, device, dtype, max_docs=max_docs, progress=progress
                )
                label = "base" if a == 0.0 else "adapted" if a == 1.0 else "merged"
                model = str(base) if a == 0.0 else str(adapted) if a == 1.0 else str(models[a])
                points.append({"alpha": a, "label": label, "model": model, "domains": r["domains"]})
            if average is not None:
                from ellama_megatron.merge.average import average_checkpoints

                avg_dir = average_checkpoints(average, merged_root / "average", "hf", True, progress).outputs[0]
                r = evaluate_model_dir(
                    avg_dir, sources, seq_length, batch_size, device, dtype, max_docs=max_docs, progress=progress
                )
                label = f"average of {len(average.checkpoints)}"
                model = ", ".join(str(c) for c in average.checkpoints)
                points.append({"alpha": None, "label": label, "model": model, "domains": r["domains"]})
    finally:
        if not keep_merged and merged_root.exists():
            shutil.rmtree(merged_root)
        elif (merged_root / "exports").exists():
            shutil.rmtree(merged_root / "exports")
    report = {
        "method": method,
        "base": str(base),
        "adapted": str(adapted),
        "seq_length": seq_length,
        "general_domain": general,
        "domain": domain,
        "points": points,
    }
    write_json_atomic(out / "curve.json", report)
    write_text_atomic(out / "curve.md", markdown_table(points, names))
    plot_tradeoff(points, general, domain, out / "curve.png")
    return report
