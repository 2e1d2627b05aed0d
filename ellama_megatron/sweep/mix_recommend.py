"""The mix the fitted laws recommend: the trade-off e-Llama made by hand, the domain share that
minimises the domain loss at the target scale while the general loss rises by at most a given fraction
over a reference (the base model's general loss when given, else the fitted general loss with no
domain data at the same budget).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ellama_megatron.sweep.mix_law import LawFit, MixLawError, MixPoint

SHARE_DECIMALS = 3  # of the recommended shares (the blend planner's tolerance is far finer)


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
