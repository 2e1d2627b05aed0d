"""Target token shares -> Megatron blend weights, with the epochs each source will see.

What a Megatron weight means: BlendedDataset draws fixed-length samples (seq_length tokens each)
from its datasets so that dataset i supplies a fraction w_i / sum(w) of all samples. Every sample
has the same length, so that is also its fraction of training *tokens*, whatever the size of
the dataset. A small dataset with a large weight is therefore repeated; the plan makes the
repetition explicit (epochs = tokens drawn / tokens available) and refuses to exceed a cap.

Config (``data.groups``, see conf/data/ellama.yaml): groups with a share of the whole; in each,
sources with a share of the group and the manifests of their preprocessed datasets. One share
per level may be null: it takes what the others leave, so one override changes a mix
(``data.groups.general.share=0.3`` makes e-commerce 0.7).

A source with several manifests (shards, languages) is sampled uniformly by token: each
prefix's weight is the source's share times the prefix's fraction of the source's tokens.
Only manifests are read (and the datasets' files checked to exist), so planning is instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ellama_megatron.data.manifest import dataset_prefixes, read_manifest

DEFAULT_MAX_EPOCHS = 1.0
SHARE_TOLERANCE = 1e-6


class PlanError(ValueError):
    """The blend cannot be planned as configured; the message names the key and the fix."""


@dataclass
class SourcePlan:
    group: str
    source: str
    share: float  # target fraction of all training tokens
    max_epochs: float
    manifests: list[str]
    train_prefixes: list[tuple[str, int]]  # (prefix, train tokens)
    valid_prefixes: list[str]
    languages: dict  # language -> train tokens
    tokens_available: int = 0
    tokens_drawn: float = 0.0
    epochs: float = 0.0

    @property
    def weight(self) -> float:
        """The Megatron weight of the whole source: its share of samples, i.e. of tokens."""
        return self.share


@dataclass
class BlendPlan:
    train_tokens: float
    seq_length: int
    num_samples: int
    sources: list[SourcePlan]
    valid: dict = field(default_factory=dict)  # validation set name -> [prefix, ...]

    def train_entries(self) -> list[tuple[SourcePlan, str, float]]:
        """(source, prefix, weight) of each dataset the blend draws from."""
        out = []
        for s in self.sources:
            if s.share <= 0:
                continue
            for prefix, tokens in s.train_prefixes:
                if tokens > 0:
                    out.append((s, prefix, s.share * tokens / s.tokens_available))
        return out

    def to_blend_dict(self) -> dict:
        """The shape the training engine reads (data.blend_file); group and source name each entry's
        domain for the per-domain training loss (engine/domain_loss.py)."""
        return {
            "train": [
                {"prefix": p, "weight": w, "group": s.group, "source": s.source} for s, p, w in self.train_entries()
            ],
            "valid": {name: list(prefixes) for name, prefixes in self.valid.items()},
        }

    def language_shares(self) -> dict[str, float]:
        """Fraction of all training tokens per language, from the manifests' language counts."""
        shares: dict[str, float] = {}
        for s in self.sources:
            total = sum(s.languages.values())
            for lang, tokens in s.languages.items():
                shares[lang] = shares.get(lang, 0.0) + s.share * tokens / max(total, 1)
        return dict(sorted(shares.items(), key=lambda kv: -kv[1]))

    def format_table(self) -> str:
        head = (
            f"{'group':<12} {'source':<22} {'available':>10} {'share':>7} {'to draw':>10} {'epochs':>7} "
            f"{'cap':>5} {'weight':>8}"
        )
        lines = [
            f"blend plan: {_human(self.train_tokens)} training tokens = {self.num_samples:,} samples "
            f"of {self.seq_length} tokens",
            head,
            "-" * len(head),
        ]
        for s in self.sources:
            lines.append(
                f"{s.group:<12} {s.source:<22} {_human(s.tokens_available):>10} {s.share:>7.2%} "
                f"{_human(s.tokens_drawn):>10} {s.epochs:>7.2f} {s.max_epochs:>5g} {s.weight:>8.4f}"
            )
        groups: dict[str, float] = {}
        for s in self.sources:
            groups[s.group] = groups.get(s.group, 0.0) + s.share
        lines.append("-" * len(head))
        lines.append("groups: " + ", ".join(f"{g} {v:.1%}" for g, v in groups.items()))
        lines.append("languages: " + ", ".join(f"{k} {v:.1%}" for k, v in self.language_shares().items()))
        lines.append("validation sets: " + ", ".join(f"{k} ({len(v)} prefixes)" for k, v in self.valid.items()))
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _to_plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    return dict(cfg)


def resolve_shares(shares: dict[str, float | None], where: str) -> dict[str, float]:
    """Fill the one null share with the rest; check that shares are >= 0 and sum to 1."""
    missing = [k for k, v in shares.items() if v is None]
    if len(missing) > 1:
        raise PlanError(f"{where}: at most one share may be null (the rest); null in {missing}")
    for k, v in shares.items():
        if v is not None and not (isinstance(v, (int, float)) and v >= 0):
            raise PlanError(f"{where}.{k}.share = {v!r}: must be a number >= 0 (or null for the rest)")
    given = sum(v for v in shares.values() if v is not None)
    out = {k: float(v) for k, v in shares.items() if v is not None}
    if missing:
        rest = 1.0 - given
        if rest < -SHARE_TOLERANCE:
            raise PlanError(f"{where}: shares sum to {given:g} > 1, nothing left for {missing[0]} (share: null)")
        out[missing[0]] = max(rest, 0.0)
    elif abs(given - 1.0) > SHARE_TOLERANCE:
        raise PlanError(
            f"{where}: shares sum to {given:g}, not 1. Fix the shares or set one of them to null to take the rest."
        )
    return {k: out[k] for k in shares}


def plan_blend(data_cfg, train_tokens: float, seq_length: int) -> BlendPlan:
    """Plan the training blend of ``data_cfg.groups`` for ``train_tokens`` tokens of ``seq_length``.

    Reads the manifests only. Raises PlanError (missing manifest, bad shares, a source repeated
    beyond its max_epochs, tokenizers that differ between sources).
    """
    cfg = _to_plain(data_cfg)
    groups = cfg.get("groups") or {}
    if not groups:
        raise PlanError("data.groups is empty: nothing to plan (see conf/data/ellama.yaml)")
    if seq_length <= 0 or train_tokens <= 0:
        raise PlanError(f"train_tokens ({train_tokens}) and seq_length ({seq_length}) must be positive")
    default_cap = float(cfg.get("max_epochs", DEFAULT_MAX_EPOCHS))
    valid_by = cfg.get("valid_by", "group")
    if valid_by not in ("group", "source"):
        raise PlanError(f"data.valid_by = {valid_by!r}: use 'group' (one validation loss per group) or 'source'")

    num_samples = math.ceil(train_tokens / seq_length)
    group_shares = resolve_shares({g: (v or {}).get("share") for g, v in groups.items()}, "data.groups")
    sources: list[SourcePlan] = []
    valid: dict[str, list[str]] = {}
    tokenizers: dict[str, str] = {}
    for gname, gcfg in groups.items():
        gcfg = gcfg or {}
        srcs = gcfg.get("sources") or {}
        if not srcs:
            raise PlanError(f"data.groups.{gname}.sources is empty")
        src_shares = resolve_shares(
            {s: (v or {}).get("share") for s, v in srcs.items()}, f"data.groups.{gname}.sources"
        )
        for sname, scfg in srcs.items():
            scfg = scfg or {}
            manifests = scfg.get("manifests", scfg.get("manifest"))
            if isinstance(manifests, str):
                manifests = [manifests]
            if not manifests:
                raise PlanError(f"data.groups.{gname}.sources.{sname}: no 'manifests' given")
            cap = float(scfg.get("max_epochs", gcfg.get("max_epochs", default_cap)))
            plan = SourcePlan(gname, sname, group_shares[gname] * src_shares[sname], cap, list(manifests), [], [], {})
            for path in manifests:
                m = read_manifest(path)
                tokenizers[str(path)] = m["tokenizer"]["tokenizer_json_sha256"]
                train = dataset_prefixes(path, m, "train")
                tokens = sum(n for _, n in train)
                plan.train_prefixes.extend(train)
                if train:
                    for lang, e in m["splits"]["train"].get("languages", {}).items():
                        plan.languages[lang] = plan.languages.get(lang, 0) + e["tokens"]
                vprefixes = [p for p, _ in dataset_prefixes(path, m, "valid")]
                plan.valid_prefixes.extend(vprefixes)
                for p in [p for p, _ in train] + vprefixes:
                    for ext in (".bin", ".idx"):
                        # A stat each: a blend naming a moved or deleted dataset would fail only in the ranks.
                        if not Path(str(p) + ext).is_file():
                            raise PlanError(
                                f"{path}: its dataset {p}{ext} is missing; copy the dataset beside "
                                "the manifest or preprocess it again (tools/preprocess_data.py)"
                            )
                plan.tokens_available += tokens
            plan.tokens_drawn = plan.share * num_samples * seq_length
            if plan.share > 0 and plan.tokens_available == 0:
                raise PlanError(f"data.groups.{gname}.sources.{sname}: its manifests hold no training tokens")
            plan.epochs = plan.tokens_drawn / plan.tokens_available if plan.tokens_available else 0.0
            sources.append(plan)
            if plan.valid_prefixes:
                name = gname if valid_by == "group" else f"{gname}-{sname}"
                valid.setdefault(name, []).extend(plan.valid_prefixes)

    if len(set(tokenizers.values())) > 1:
        raise PlanError(
            "sources were tokenized with different tokenizers: "
            + ", ".join(f"{p} ({h[:12]})" for p, h in tokenizers.items())
            + ". Re-run tools/preprocess_data.py with one tokenizer."
        )
    over = [s for s in sources if s.epochs > s.max_epochs * (1 + 1e-9)]
    if over:
        raise PlanError(
            "sources repeated beyond their max_epochs: "
            + "; ".join(
                f"{s.group}/{s.source} needs {s.epochs:.2f} epochs ({_human(s.tokens_drawn)} of "
                f"{_human(s.tokens_available)} tokens), cap {s.max_epochs:g}"
                for s in over
            )
            + ". Lower its share, raise its max_epochs, add data, or train on fewer tokens."
        )
    return BlendPlan(float(train_tokens), int(seq_length), num_samples, sources, valid)
