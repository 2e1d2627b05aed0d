"""The D-CPT law (Que et al. 2024, arXiv 2406.01375) and its fit to the points of a mix sweep.

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

The points come from a sweep table (sweep/table.py: read_points); the mix the laws recommend is
sweep/mix_recommend.py's, the report of a fit sweep/mix_report.py's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

EPS = 0.01  # r + eps: a finite loss at share 0 (a domain absent from the mix), as in the paper's r' = r + eps
EXPONENT_BOUNDS = (0.0, 3.0)  # alpha, beta, eta, gamma; loss exponents in the literature lie well inside
LOG_AMPLITUDE_BOUNDS = (-30.0, 30.0)  # log A, log B, log C (in the fit's scaled units)
EXPONENT_GRID = (0.05, 0.2, 0.5, 1.0, 2.0)  # starts of each exponent
REFINED_STARTS = 4  # best grid starts refined by least_squares
MIN_TOKEN_BUDGETS = 2  # distinct D: beta needs two
MIN_SHARES = 3  # distinct r per domain: eta and gamma need three
MIN_MODEL_SIZES = 3  # distinct N: A and alpha beside E need three


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

    log_r = np.log(np.where(r > 0, r, 1.0))  # where r = 0 the B term and its derivatives are 0
    log_ds, log_ns, log_re = np.log(ds), np.log(ns), np.log(r + eps)

    def jacobian(theta):
        # Analytic: a finite-difference Jacobian costs 6-8 more evaluations per step and was 3/4 of a
        # sweep fit's time (26 fits with leave-one-out).
        b = np.exp(theta[1]) * r ** theta[4] / ds ** theta[3]
        c = np.exp(theta[2]) / (r + eps) ** theta[5]
        cols = [np.ones_like(r), b, c, -b * log_ds, b * log_r, -c * log_re]
        if with_n:
            a = np.exp(theta[6]) / ns ** theta[7]
            cols += [a, -a * log_ns]
        return np.stack(cols, axis=1) * w[:, None]

    best = None
    for _, exps, amps in starts[:REFINED_STARTS]:
        tiny = 1e-6 * float(y.mean())  # a zero amplitude has no log: start just above it
        theta0 = [min(amps[0], e_max * 0.999), math.log(max(amps[1], tiny)), math.log(max(amps[2], tiny)), *exps[:3]]
        if with_n:
            theta0 += [math.log(max(amps[3], tiny)), exps[3]]
        theta0 = np.clip(theta0, np.array(lower) + 1e-9, np.array(upper) - 1e-9)
        res = least_squares(
            residuals,
            theta0,
            jac=jacobian,
            bounds=(lower, upper),
            x_scale="jac",
            xtol=1e-12,
            ftol=1e-12,
            gtol=1e-12,
            max_nfev=5000,
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
