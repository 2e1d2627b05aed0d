"""The report of a mix sweep's fit (tools/fit_mix.py): ``fit_mix`` reads the sweep table, fits every
domain's law (sweep/mix_law.py), recommends the mix (sweep/mix_recommend.py) and writes
fit_mix.json (what the blend config takes), fit_mix.md (``report_markdown``) and fit_mix.png
(``plot_fit``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ellama_megatron.formats.atomic import write_figure_atomic, write_text_atomic
from ellama_megatron.sweep.mix_law import MIN_MODEL_SIZES, LawFit, MixLawError, MixPoint, fit_sweep
from ellama_megatron.sweep.mix_recommend import Recommendation, curve, pick_groups, recommend
from ellama_megatron.sweep.table import read_points


def plot_fit(
    fits: dict[str, LawFit],
    points: list[MixPoint],
    rec: Recommendation,
    tokens: float,
    parameters: float,
    out_png: Path,
) -> Path:
    """Both domains' fitted loss along the domain share: at the target budget (solid) and at each
    sweep budget (dashed) with that budget's points; the recommended share and the general limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    other = sum(s for g, s in rec.shares.items() if g not in (rec.domain, rec.general))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    budgets = sorted({p.tokens for p in points})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes, (rec.domain, rec.general)):
        for k, budget in enumerate(budgets):
            c = colors[k % len(colors)]
            r, ld, lg = curve(fits, rec.domain, rec.general, other, budget, parameters)
            ax.plot(r, ld if name == rec.domain else lg, "--", color=c, lw=1, label=f"fit, D={budget:.3g}")
            own = [p for p in points if p.tokens == budget and name in p.loss]
            ax.plot(
                [p.shares[rec.domain] for p in own],
                [p.loss[name] for p in own],
                "o",
                color=c,
                label=f"sweep, D={budget:.3g}",
            )
        r, ld, lg = curve(fits, rec.domain, rec.general, other, tokens, parameters)
        target = ld if name == rec.domain else lg
        ax.plot(r, target, "-", color="black", lw=2, label=f"target D={tokens:.3g}")
        # The y range of the points and of the target curve over the swept shares and the recommendation:
        # the law's limits at share 0 or 1 would flatten everything else.
        swept = [p.shares[rec.domain] for p in points] + [rec.shares[rec.domain]]
        inside = (r >= min(swept) - 0.05) & (r <= max(swept) + 0.05)
        seen = np.concatenate([target[inside], [p.loss[name] for p in points if name in p.loss]])
        pad = 0.15 * (seen.max() - seen.min()) + 1e-3
        ax.set_ylim(seen.min() - pad, seen.max() + pad)
        ax.axvline(rec.shares[rec.domain], color="tab:red", lw=1, label=f"recommended {rec.domain} share")
        if name == rec.general:
            ax.axhline(
                rec.general_reference * (1 + rec.max_general_rise),
                color="tab:red",
                ls=":",
                lw=1,
                label=f"+{rec.max_general_rise:.1%} over {rec.general_reference:.3f}",
            )
        ax.set_xlabel(f"{rec.domain} share of training tokens")
        ax.set_ylabel(f"{name} validation loss")
        ax.set_title(f"{name} loss (D-CPT law)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return write_figure_atomic(out_png, fig)


def fit_mix(
    table: Path,
    out_dir: Path,
    domain: str | None = None,
    general: str = "general",
    tokens: float | None = None,
    parameters: float | None = None,
    max_general_rise: float = 0.02,
    base_general_loss: float | None = None,
    shares: list[float] | None = None,
    where: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fit every domain's law to a sweep table, recommend the mix at the target scale and write
    OUT/fit_mix.json (what the blend config takes), fit_mix.md (the report) and fit_mix.png."""
    table = Path(table)
    points = read_points(table, where)
    if not points:
        raise MixLawError(f"{table}: no finished point with validation losses yet")
    domain, general, fixed = pick_groups(points, table, domain, general)
    if not 0 <= max_general_rise:
        raise MixLawError(
            f"--max-general-rise {max_general_rise:g}: a fraction of the reference loss, >= 0 (0.02 = 2%)"
        )
    sizes = sorted({p.parameters for p in points})
    if parameters is None:
        parameters = sizes[-1]
    elif len(sizes) < MIN_MODEL_SIZES and float(parameters) not in sizes:
        raise MixLawError(
            f"--parameters {parameters:g}: the sweep trained {', '.join(f'{n:g}' for n in sizes)} parameters "
            f"only, too few sizes ({MIN_MODEL_SIZES} needed) to fit the law's N term; drop --parameters"
        )
    tokens = float(tokens) if tokens is not None else max(p.tokens for p in points)
    if base_general_loss is None and all(general in p.start_loss for p in points):
        # Every point validated the same base on the same set before its first step (train.eval_at_start).
        base_general_loss = float(np.median([p.start_loss[general] for p in points]))
    fits = fit_sweep(points, str(table))
    rec = recommend(
        fits,
        domain,
        general,
        fixed,
        tokens,
        float(parameters),
        max_general_rise,
        base_general_loss,
        order=list(points[0].shares),
    )
    other = sum(fixed.values())
    queries = shares if shares is not None else [round(x, 2) for x in np.linspace(0, 1 - other, 11)]
    for q in queries:
        if not 0 <= q <= 1 - other:
            raise MixLawError(f"--share {q:g}: a {domain} share is between 0 and {1 - other:g}")
    predicted = [
        {
            "share": q,
            domain: float(fits[domain].law.loss(q, tokens, parameters)),
            general: float(fits[general].law.loss(1 - other - q, tokens, parameters)),
        }
        for q in queries
    ]
    result = {
        "table": str(table),
        "where": where or {},
        "points": len(points),
        "target": {"tokens": tokens, "parameters": float(parameters)},
        "laws": {
            d: {
                "law": asdict(f.law),
                "max_error": f.max_error,
                "max_held_out_error": f.max_held_out_error,
                "points": f.points,
                "leave_one_out": f.leave_one_out,
            }
            for d, f in fits.items()
        },
        "predicted": predicted,
        "recommendation": rec.to_dict(),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "fit_mix.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out_dir / "fit_mix.md", report_markdown(result))
    plot_fit(fits, points, rec, tokens, float(parameters), out_dir / "fit_mix.png")
    return result


def report_markdown(result: dict[str, Any]) -> str:
    """The fit report: each law, each point's fit and held-out error, predicted losses, the mix."""
    rec, laws, target = result["recommendation"], result["laws"], result["target"]
    domains = list(laws)
    pct = lambda x: "-" if x is None else f"{x:+.2%}"  # noqa: E731
    lines = [
        f"# D-CPT law fit: {result['table']}",
        "",
        f"{result['points']} points{''.join(f', {k}={v}' for k, v in result['where'].items())}; "
        f"target D = {target['tokens']:.4g} tokens, N = {target['parameters']:.4g} parameters.",
        "",
        "L(N, D, r) = E + A/N^alpha + B r^eta / D^beta + C / (r + eps)^gamma, r = the domain's own group share",
        "",
        "| domain | E | A | alpha | B | beta | eta | C | gamma | max fit error | max held-out error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d, f in laws.items():
        law = f["law"]
        held = "-" if f["max_held_out_error"] is None else f"{f['max_held_out_error']:.2%}"
        lines.append(
            f"| {d} | "
            + " | ".join(f"{law[k]:.4g}" for k in ("E", "A", "alpha", "B", "beta", "eta", "C", "gamma"))
            + f" | {f['max_error']:.2%} | {held} |"
        )
    lines += [
        "",
        "Per point: observed loss, the fit's relative error, and the error of a fit on all the other points "
        "(leave-one-out; - where too few points remain).",
        "",
        "| # | tokens | " + " | ".join(f"{d} share | {d} loss | fit | held out" for d in domains) + " |",
        "|---|---|" + "---|---|---|---|" * len(domains),
    ]
    by_num = {d: {p["num"]: p for p in f["points"]} for d, f in laws.items()}
    held_out = {d: {p["num"]: p["error"] for p in f["leave_one_out"]} for d, f in laws.items()}
    for num in sorted(set().union(*by_num.values())):
        cells = [str(num), f"{next(by_num[d][num] for d in domains if num in by_num[d])['tokens']:.4g}"]
        for d in domains:
            p = by_num[d].get(num)
            cells += (
                ["-"] * 4
                if p is None
                else [f"{p['share']:.3g}", f"{p['observed']:.4f}", pct(p["error"]), pct(held_out[d].get(num))]
            )
        lines.append("| " + " | ".join(cells) + " |")
    dom, gen = rec["domain"], rec["general"]
    lines += [
        "",
        f"Predicted at the target scale, along the {dom} share:",
        "",
        f"| {dom} share | {dom} loss | {gen} loss |",
        "|---|---|---|",
    ]
    lines += [f"| {q['share']:.3g} | {q[dom]:.4f} | {q[gen]:.4f} |" for q in result["predicted"]]
    rise = rec["general_loss"] / rec["general_reference"] - 1
    lines += [
        "",
        "## Recommendation",
        "",
        f"{dom} share {rec['shares'][dom]:g}, {gen} {rec['shares'][gen]:g}: predicted {dom} loss "
        f"{rec['domain_loss']:.4f}, {gen} loss {rec['general_loss']:.4f} "
        f"({rise:+.2%} over {rec['general_reference']:.4f}, "
        f"{rec['reference_kind']}; limit +{rec['max_general_rise']:.2%}, "
        + ("which sets the share" if rec["binding"] else f"not reached: the {dom} loss is lowest here")
        + ").",
        "",
        f"    {rec['overrides']}",
        "",
        "conf/data/*.yaml:",
        "",
        "```yaml",
        rec["yaml"].rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
