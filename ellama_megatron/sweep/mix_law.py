"""The D-CPT law (Que et al. 2024, arXiv 2406.01375) fitted to a mix sweep, and the mix it recommends.

For each validation domain d, with r the share of d's own data group in the training tokens, D the
tokens trained and N the model's parameters:

    L_d(N, D, r) = E + A / N^alpha + B r^eta / D^beta + C / (r + eps)^gamma

Each domain's law is in its own group's share: the e-commerce loss falls as the e-commerce share
grows, the general loss rises as the general share shrinks (forgetting). With one model size in the
sweep the N term is a constant and E absorbs it (A = 0): the law then predicts that size only.

The fit: every parameter positive (bounds), amplitudes in log space (they span orders of magnitude),
D and N scaled by their geometric means inside the fit (no 1e9^beta in the Jacobian). For fixed
exponents the law is linear in its amplitudes, so the starts are the best non-negative linear fits
over a grid of exponents; scipy's least_squares refines the best of them. Residuals are relative
((predicted - observed) / observed), the error the report gives per point.

The trade-off e-Llama made by hand: the domain share that minimises the domain loss at the target
scale while the general loss rises by at most a given fraction over a reference (the base model's
general loss when given, else the fitted general loss with no domain data at the same budget).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

EPS = 0.01  # r + eps: a finite loss at share 0 (a domain absent from the mix), as in the paper's r' = r + eps
EXPONENT_BOUNDS = (0.0, 3.0)  # alpha, beta, eta, gamma; loss exponents in the literature lie well inside
LOG_AMPLITUDE_BOUNDS = (-30.0, 30.0)  # log A, log B, log C (in the fit's scaled units)
EXPONENT_GRID = (0.05, 0.2, 0.5, 1.0, 2.0)  # starts of each exponent
REFINED_STARTS = 4  # best grid starts refined by least_squares
MIN_TOKEN_BUDGETS = 2  # distinct D: beta needs two
MIN_SHARES = 3  # distinct r per domain: eta and gamma need three
MIN_MODEL_SIZES = 3  # distinct N: A and alpha beside E need three
SHARE_DECIMALS = 3  # of the recommended shares (the blend planner's tolerance is far finer)
# Override keys that may vary between the points of one fit: they set r, D or N.
SCALE_KEYS = (
    "data.groups.",
    "train.train_tokens",
    "train.global_batch_size",
    "train.seq_length",
    "model",
    "checkpoint.init_from",
    "parallel",
)


class MixLawError(ValueError):
    """A sweep table the law cannot be fitted to, named by file and field."""


@dataclass(frozen=True)
class MixPoint:
    """One finished sweep point: the scale it trained at and its final validation loss per domain."""

    num: int
    shares: dict[str, float]  # of each data group in the training tokens
    tokens: float  # D: tokens trained
    parameters: float  # N
    loss: dict[str, float]  # final validation loss per domain (= data group)
    start_loss: dict[str, float] = field(default_factory=dict)  # at iteration 0 (the base model), when validated


@dataclass(frozen=True)
class DcptLaw:
    """One domain's fitted law, in natural units (D in tokens, N in parameters)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    eta: float
    C: float
    gamma: float
    eps: float = EPS

    def loss(self, share, tokens, parameters=1.0) -> np.ndarray:
        r, d, n = (np.asarray(x, dtype=float) for x in (share, tokens, parameters))
        n_term = self.A / n**self.alpha if self.A else 0.0
        return self.E + n_term + self.B * r**self.eta / d**self.beta + self.C / (r + self.eps) ** self.gamma


@dataclass
class LawFit:
    """A domain's law and how well it reproduces the points it was fitted to."""

    domain: str
    law: DcptLaw
    points: list[dict[str, float]]  # num, share, tokens, parameters, observed, predicted, error (relative)
    leave_one_out: list[dict[str, float]] = field(
        default_factory=list
    )  # the same, each point predicted by a fit without it

    @property
    def max_error(self) -> float:
        return max(abs(p["error"]) for p in self.points)

    @property
    def max_held_out_error(self) -> float | None:
        return max((abs(p["error"]) for p in self.leave_one_out), default=None)


# -- reading a sweep table ---------------------------------------------------------------------


def read_points(table: Path, where: dict[str, str] | None = None) -> list[MixPoint]:
    """The finished points of a sweep table (tools/sweep_table.py's JSON, or its sweep folder).

    ``where`` keeps the points whose overrides have these values (one slice of a sweep that also
    varies, e.g., the LR). Raises MixLawError naming the file and the field."""
    table = Path(table)
    if table.is_dir():
        table = table / "sweep_table.json"
    if not table.exists():
        raise MixLawError(f"{table}: no such sweep table; run tools/sweep_table.py <sweep dir> first")
    try:
        rows = json.loads(table.read_text())["points"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MixLawError(f'{table}: not a sweep table (expected {{"points": [...]}}: {e})') from None
    chosen = []
    for i, row in enumerate(rows):
        given = dict(o.partition("=")[::2] for o in row.get("overrides", []))
        if where and any(given.get(k) != v for k, v in where.items()):
            continue
        if not row.get("finished") or not row.get("valid_loss"):
            continue  # a point that failed or has not ended measures nothing yet
        for key in ("shares", "tokens", "parameters"):
            if row.get(key) is None:
                hint = (
                    "the point's data has no groups (a blend file gives weights, not shares): sweep data.groups.*.share"
                    if key == "shares" and "tokens" in row
                    else "the table predates these fields: rebuild it with tools/sweep_table.py <sweep dir>"
                )
                raise MixLawError(f"{table}: points[{i}].{key} is missing; {hint}")
        for domain in row["valid_loss"]:
            if domain not in row["shares"]:
                raise MixLawError(
                    f"{table}: points[{i}].valid_loss.{domain} is not a data group ({sorted(row['shares'])}); "
                    "the law needs one validation loss per group: data.valid_by=group"
                )
        chosen.append((row, given))
    if where and not chosen:
        seen = {
            k: sorted({o.partition("=")[2] for r in rows for o in r.get("overrides", []) if o.partition("=")[0] == k})
            for k in where
        }
        raise MixLawError(
            f"{table}: no finished point has {' '.join(f'{k}={v}' for k, v in where.items())}; the "
            "overrides as written in the table: "
            + "; ".join(f"{k}: {', '.join(v) or 'never set'}" for k, v in seen.items())
        )
    check_one_slice(table, [given for _, given in chosen])
    return [
        MixPoint(
            int(row["num"]),
            {k: float(v) for k, v in row["shares"].items()},
            float(row["tokens"]),
            float(row["parameters"]),
            {k: float(v) for k, v in row["valid_loss"].items()},
            {k: float(v) for k, v in (row.get("valid_loss_start") or {}).items()},
        )
        for row, _ in chosen
    ]


def check_one_slice(table: Path, overrides: list[dict[str, str]]) -> None:
    """Points of one fit may differ only in r, D and N: another varying key (the LR) mixes laws."""
    values: dict[str, set[str]] = {}
    for given in overrides:
        for key in set().union(*overrides):
            values.setdefault(key, set()).add(given.get(key, "<default>"))
    other = {k: v for k, v in values.items() if len(v) > 1 and not k.lstrip("+").startswith(SCALE_KEYS)}
    if other:
        key, vals = sorted(other.items())[0]
        raise MixLawError(
            f"{table}: the points differ in {key} ({', '.join(sorted(vals))}), which is not a share, "
            f"token budget or model size; fit one value at a time: --where {key}={sorted(vals)[0]}"
        )


# -- fitting -----------------------------------------------------------------------------------


def _geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


def _terms(exps: np.ndarray, r, d, n, with_n: bool, eps: float) -> np.ndarray:
    """The law's columns for fixed exponents (d, n already scaled): [1, r^eta/d^beta, 1/(r+eps)^gamma, 1/n^alpha]."""
    beta, eta, gamma = exps[:3]
    cols = [np.ones_like(r), r**eta / d**beta, 1.0 / (r + eps) ** gamma]
    if with_n:
        cols.append(1.0 / n ** exps[3])
    return np.stack(cols, axis=1)


def fit_law(domain: str, share, tokens, loss, parameters=None, eps: float = EPS) -> LawFit:
    """Fit one domain's law to points (share, tokens[, parameters]) -> loss. With ``parameters`` None or
    of fewer than MIN_MODEL_SIZES distinct values, the N term is left out (A = 0)."""
    from scipy.optimize import least_squares, nnls

    r, d, y = (np.asarray(x, dtype=float) for x in (share, tokens, loss))
    n = np.ones_like(r) if parameters is None else np.asarray(parameters, dtype=float)
    with_n = len(np.unique(n)) >= MIN_MODEL_SIZES
    d0, n0 = _geomean(d), _geomean(n)
    ds, ns = d / d0, n / n0
    w = 1.0 / y  # relative residuals
    # Starts: for each exponent combination the best non-negative (E, B, C[, A]) by linear least squares.
    starts = []
    for exps in itertools.product(EXPONENT_GRID, repeat=4 if with_n else 3):
        exps = np.array(exps)
        cols = _terms(exps, r, ds, ns, with_n, eps)
        amps, _ = nnls(cols * w[:, None], np.ones_like(y))
        starts.append((float(np.sum((cols @ amps * w - 1.0) ** 2)), exps, amps))
    starts.sort(key=lambda s: s[0])

    lo_e, hi_e = EXPONENT_BOUNDS
    lo_a, hi_a = LOG_AMPLITUDE_BOUNDS
    e_max = float(y.min())  # the other terms are positive: E lies below every observed loss
    # theta = [E, log B, log C, beta, eta, gamma(, log A, alpha)]
    lower = [0.0, lo_a, lo_a, lo_e, lo_e, lo_e] + ([lo_a, lo_e] if with_n else [])
    upper = [e_max, hi_a, hi_a, hi_e, hi_e, hi_e] + ([hi_a, hi_e] if with_n else [])

    def predict(theta):
        pred = theta[0] + np.exp(theta[1]) * r ** theta[4] / ds ** theta[3] + np.exp(theta[2]) / (r + eps) ** theta[5]
        if with_n:
            pred = pred + np.exp(theta[6]) / ns ** theta[7]
        return pred

    def residuals(theta):
        return (predict(theta) - y) * w

    best = None
    for _, exps, amps in starts[:REFINED_STARTS]:
        tiny = 1e-6 * float(y.mean())  # a zero amplitude has no log: start just above it
        theta0 = [min(amps[0], e_max * 0.999), math.log(max(amps[1], tiny)), math.log(max(amps[2], tiny)), *exps[:3]]
        if with_n:
            theta0 += [math.log(max(amps[3], tiny)), exps[3]]
        theta0 = np.clip(theta0, np.array(lower) + 1e-9, np.array(upper) - 1e-9)
        res = least_squares(
            residuals, theta0, bounds=(lower, upper), x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=5000
        )
        if best is None or res.cost < best.cost:
            best = res
    t = best.x
    # Back to natural units: B (r^eta / (D/d0)^beta) = (B d0^beta) r^eta / D^beta, likewise A.
    law = DcptLaw(
        E=float(t[0]),
        A=float(np.exp(t[6]) * n0 ** t[7]) if with_n else 0.0,
        alpha=float(t[7]) if with_n else 0.0,
        B=float(np.exp(t[1]) * d0 ** t[3]),
        beta=float(t[3]),
        eta=float(t[4]),
        C=float(np.exp(t[2])),
        gamma=float(t[5]),
        eps=eps,
    )
    pred = predict(t)
    points = [
        {
            "share": float(r[i]),
            "tokens": float(d[i]),
            "parameters": float(n[i]),
            "observed": float(y[i]),
            "predicted": float(pred[i]),
            "error": float((pred[i] - y[i]) / y[i]),
        }
        for i in range(len(y))
    ]
    return LawFit(domain, law, points)


def law_parameters(with_n: bool) -> int:
    return 8 if with_n else 6


def fit_sweep(points: list[MixPoint], source: str = "sweep table", leave_one_out: bool = True) -> dict[str, LawFit]:
    """One law per validation domain, each point's fit error and (``leave_one_out``) its error when
    predicted by a fit on all the other points. Refuses too few points for the parameters."""
    if not points:
        raise MixLawError(f"{source}: no finished point with validation losses")
    domains = sorted(set().union(*(p.loss for p in points)))
    token_budgets = sorted({p.tokens for p in points})
    if len(token_budgets) < MIN_TOKEN_BUDGETS:
        raise MixLawError(
            f"{source}: points[*].tokens has {len(token_budgets)} value(s); the law's D term needs at "
            f"least {MIN_TOKEN_BUDGETS} token budgets: sweep train.train_tokens too"
        )
    sizes = {p.parameters for p in points}
    if 1 < len(sizes) < MIN_MODEL_SIZES:
        raise MixLawError(
            f"{source}: points[*].parameters has {len(sizes)} model sizes; the N term needs at least "
            f"{MIN_MODEL_SIZES}: fit one size at a time with --where model=..."
        )
    n_params = law_parameters(len(sizes) >= MIN_MODEL_SIZES)
    fits = {}
    for domain in domains:
        own = [p for p in points if domain in p.loss]
        shares = sorted({p.shares[domain] for p in own})
        if len(shares) < MIN_SHARES:
            raise MixLawError(
                f"{source}: points[*].shares.{domain} has {len(shares)} value(s); the law needs at least "
                f"{MIN_SHARES} shares of each group: sweep data.groups.<group>.share over more values"
            )
        if len(own) < n_params + 1:  # at least one point beyond the parameters
            raise MixLawError(
                f"{source}: {len(own)} points with valid_loss.{domain}; the law has {n_params} parameters, "
                f"so a fit needs at least {n_params + 1} points: sweep more shares or token budgets"
            )
        args = (
            [p.shares[domain] for p in own],
            [p.tokens for p in own],
            [p.loss[domain] for p in own],
            [p.parameters for p in own],
        )
        fit = fit_law(domain, *args)
        for point, row in zip(own, fit.points):
            row["num"] = point.num
        if leave_one_out and len(own) >= n_params + 2:  # each fit without one point still has one to spare
            from tqdm import tqdm

            for i, point in enumerate(tqdm(own, desc=f"{domain}: leave-one-out fits", unit="fit", leave=False)):
                rest = [[v for j, v in enumerate(col) if j != i] for col in args]
                law = fit_law(domain, *rest).law
                predicted = float(law.loss(point.shares[domain], point.tokens, point.parameters))
                observed = point.loss[domain]
                fit.leave_one_out.append(
                    {
                        "num": point.num,
                        "share": point.shares[domain],
                        "tokens": point.tokens,
                        "observed": observed,
                        "predicted": predicted,
                        "error": (predicted - observed) / observed,
                    }
                )
        fits[domain] = fit
    return fits


# -- the recommendation ------------------------------------------------------------------------


@dataclass
class Recommendation:
    """The domain share with the lowest domain loss whose general loss stays within the limit."""

    domain: str
    general: str
    shares: dict[str, float]  # every group's share of the training tokens (sums to 1)
    domain_loss: float
    general_loss: float
    general_reference: float  # the loss the rise is measured from
    reference_kind: (
        str  # "the base model's" (given, or the sweep's iteration 0) or "no domain data" (the law at domain share 0)
    )
    max_general_rise: float  # fraction of the reference
    binding: bool  # True when the limit, not the domain loss's own minimum, set the share

    def overrides(self) -> str:
        """The Hydra override line of the blend config (conf/data/*.yaml's data.groups)."""
        return " ".join(f"data.groups.{g}.share={s:g}" for g, s in self.shares.items())

    def yaml(self) -> str:
        """The same as a conf/data/*.yaml snippet (merge into the preset's groups)."""
        return "groups:\n" + "".join(f"  {g}:\n    share: {s:g}\n" for g, s in self.shares.items())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "overrides": self.overrides(), "yaml": self.yaml()}


def curve(
    fits: dict[str, LawFit], domain: str, general: str, other: float, tokens: float, parameters: float, num: int = 1001
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(domain shares, domain loss, general loss) over every domain share the other groups leave."""
    r = np.linspace(0.0, 1.0 - other, num)
    return r, fits[domain].law.loss(r, tokens, parameters), fits[general].law.loss(1.0 - other - r, tokens, parameters)


def recommend(
    fits: dict[str, LawFit],
    domain: str,
    general: str,
    fixed_shares: dict[str, float],
    tokens: float,
    parameters: float,
    max_general_rise: float,
    base_general_loss: float | None = None,
    order: list[str] | None = None,
) -> Recommendation:
    """The trade-off: the domain share minimising the domain loss at (tokens, parameters) subject to
    general loss <= reference * (1 + max_general_rise). ``fixed_shares``: the other groups, held;
    ``order``: the groups' order in the config (that of the shares returned)."""
    other = sum(fixed_shares.values())
    r, ld, lg = curve(fits, domain, general, other, tokens, parameters)
    if base_general_loss is None:
        reference, kind = float(lg[0]), "no domain data"
    else:
        reference, kind = float(base_general_loss), "the base model's"
    feasible = lg <= reference * (1.0 + max_general_rise)
    if not feasible.any():
        i = int(np.argmin(lg))
        raise MixLawError(
            f"--max-general-rise {max_general_rise:g}: no domain share keeps the {general} loss within "
            f"{max_general_rise:.1%} of {reference:.4f} ({kind}); the lowest predicted is {lg[i]:.4f} "
            f"at {domain} share {r[i]:.3f} (+{lg[i] / reference - 1:.1%}): allow a larger rise"
        )
    best = int(np.argmin(np.where(feasible, ld, np.inf)))
    binding = bool(ld[best] > ld.min() + 1e-12)
    shares = {
        **{g: round(s, SHARE_DECIMALS) for g, s in fixed_shares.items()},
        domain: round(float(r[best]), SHARE_DECIMALS),
    }
    # The general group takes the rest, so that the shares sum to 1 exactly as the planner checks.
    shares[general] = round(1.0 - sum(shares.values()), SHARE_DECIMALS)
    shares = {g: shares[g] for g in order or shares}
    return Recommendation(
        domain, general, shares, float(ld[best]), float(lg[best]), reference, kind, max_general_rise, binding
    )


# -- the plot ----------------------------------------------------------------------------------


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

    from ellama_megatron.formats.atomic import write_figure_atomic

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


# -- the whole analysis (tools/fit_mix.py) -----------------------------------------------------


def pick_groups(
    points: list[MixPoint], table: Path, domain: str | None, general: str
) -> tuple[str, str, dict[str, float]]:
    """(domain group, general group, the other groups' shares): the others must be held constant."""
    groups = list(points[0].shares)
    if general not in groups:
        raise MixLawError(f"{table}: points[*].shares has no group {general!r} ({groups}); name it with --general")
    if domain is None:
        rest = [g for g in groups if g != general]
        if len(rest) != 1:
            raise MixLawError(f"{table}: {len(groups)} data groups ({groups}); name the domain group with --domain")
        domain = rest[0]
    if domain not in groups or domain == general:
        raise MixLawError(f"{table}: --domain {domain!r} is not a data group other than {general!r} ({groups})")
    fixed = {}
    for g in groups:
        if g in (domain, general):
            continue
        values = {p.shares[g] for p in points}
        if len(values) > 1:
            raise MixLawError(
                f"{table}: points[*].shares.{g} varies ({sorted(values)}); only the {domain} and {general} "
                "shares may vary between the points of one recommendation"
            )
        fixed[g] = values.pop()
    for name in (domain, general):
        if not all(name in p.loss for p in points):
            raise MixLawError(
                f"{table}: points[*].valid_loss.{name} is missing: validate each group (data.valid_by=group)"
            )
    return domain, general, fixed


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
    from ellama_megatron.formats.atomic import write_text_atomic

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
