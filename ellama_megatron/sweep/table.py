"""Collects a finished sweep (recipes/sweep.py) into one table: each point's overrides, final
training loss and final per-domain validation losses, as markdown and JSON; the JSON also holds the
scale each point trained at (group shares, tokens, parameters: what tools/fit_mix.py fits).
``read_points`` reads that JSON back as the points of a fit (sweep/mix_law.py).

Every point's rank 0 writes ``point.json`` in its run folder (overrides, Slurm job id, the folder of
the job's logs); the losses are read from those logs with the engine's own parser, so this works
after the fact too (tools/sweep_table.py), including on a sweep whose driver was killed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ellama_megatron.data.blend_plan import resolve_shares
from ellama_megatron.formats.atomic import write_text_atomic
from ellama_megatron.formats.train_log import TrainLog, parse_train_log
from ellama_megatron.llama.config import LlamaConfig
from ellama_megatron.run.model_source import run_model
from ellama_megatron.run.plan import train_iterations
from ellama_megatron.run.progress import DONE_FILE
from ellama_megatron.sweep.mix_law import MixLawError, MixPoint

POINT_FILE = "point.json"  # written by launch/sweep.py (rank 0 of each point) in the point's run folder
TABLE_NAME = "sweep_table"  # <sweep dir>/sweep_table.md and .json


def point_scale(config_file: Path | None) -> dict[str, Any]:
    """What a scaling-law fit (sweep/mix_law.py) needs of a point, from the config it ran (point.json's
    "config"): each data group's share of the training tokens (nulls resolved), the tokens it trains
    on (whole steps) and the model's parameters. None where there is no config (the point was
    refused) or no data groups (a blend file gives weights, not shares)."""
    if config_file is None or not Path(config_file).exists():
        return {"shares": None, "tokens": None, "parameters": None}
    cfg = OmegaConf.load(config_file)
    groups = OmegaConf.to_container(cfg.data, resolve=True).get("groups") or {}
    shares = resolve_shares({g: (v or {}).get("share") for g, v in groups.items()}, "data.groups") if groups else None
    # The few keys it needs, not RunPlan.from_cfg: a config written before the schema gained a field
    # still tabulates.
    t = cfg.train
    tokens_per_step = t.global_batch_size * t.seq_length
    return {
        "shares": shares,
        "tokens": train_iterations(t.train_tokens, t.global_batch_size, t.seq_length) * tokens_per_step,
        "parameters": LlamaConfig.from_dict(run_model(cfg)[0], f"{config_file}: model").num_parameters(),
    }


def read_point(point_file: Path) -> dict[str, Any]:
    point = json.loads(point_file.read_text())
    run_dir = point_file.parent
    log = TrainLog()
    log_dir = Path(point.get("log_dir") or run_dir)
    # Megatron prints losses on the last rank: read every rank's log of every attempt (requeues).
    for path in sorted(log_dir.glob("*_log.out")) + sorted(log_dir.glob("*_log.err")):
        part = parse_train_log(path.read_text(errors="replace"))
        log.train_loss.update(part.train_loss)
        for domain, values in part.valid_loss.items():
            log.valid_loss.setdefault(domain, {}).update(values)
        log.train_iters = part.train_iters or log.train_iters
    last = log.last_iteration
    return {
        "num": point["num"],
        "overrides": point["overrides"],
        "job_id": point.get("job_id"),
        "run_dir": str(run_dir),
        "finished": (run_dir / DONE_FILE).exists(),
        "iterations": last,
        "train_iters": log.train_iters,
        "train_loss": log.train_loss.get(last),
        # The last value per domain: the final pass over the whole validation set.
        "valid_loss": {d: v[max(v)] for d, v in sorted(log.valid_loss.items()) if v},
        # Iteration 0 (train.eval_at_start): the base model's losses, the reference of tools/fit_mix.py.
        "valid_loss_start": {d: v[0] for d, v in sorted(log.valid_loss.items()) if 0 in v},
        **point_scale(point.get("config")),
    }


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per point of ``sweep_dir`` (points without a point.json, never started, are absent)."""
    files = sorted(Path(sweep_dir).glob(f"*/{POINT_FILE}"), key=lambda p: json.loads(p.read_text())["num"])
    return [read_point(f) for f in files]


def varying_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between points: the sweep's axes."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for override in row["overrides"]:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    keys = [k for k, v in values.items() if len(v) > 1 or len(rows) == 1]
    return keys or list(values)


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = varying_keys(rows)
    domains = sorted({d for row in rows for d in row["valid_loss"]})
    header = ["#", *keys, "iterations", "train loss", *(f"valid {d}" for d in domains), "finished", "job"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    for row in rows:
        given = dict(o.partition("=")[::2] for o in row["overrides"])
        cells = [
            str(row["num"]),
            *(given.get(k, "") for k in keys),
            f"{row['iterations']}/{row['train_iters'] or '?'}",
            fmt(row["train_loss"]),
            *(fmt(row["valid_loss"].get(d)) for d in domains),
            "yes" if row["finished"] else "no",
            str(row["job_id"] or ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(sweep_dir: Path) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Write <sweep_dir>/sweep_table.md and .json (each complete or absent); returns them and the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect_sweep(sweep_dir)
    md_path, json_path = sweep_dir / f"{TABLE_NAME}.md", sweep_dir / f"{TABLE_NAME}.json"
    write_text_atomic(md_path, markdown(rows))
    write_text_atomic(json_path, json.dumps({"points": rows}, indent=2) + "\n")
    return md_path, json_path, rows


class SweepTableCallback(Callback):
    """Hydra callback: after the multirun's jobs have ended, write and print the sweep table."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        md_path, json_path, rows = write_tables(Path(config.hydra.sweep.dir))
        print(md_path.read_text(), end="")
        print(f"sweep table: {len(rows)} points -> {md_path} and {json_path}")


# -- reading a sweep table back (sweep/mix_law.py fits its points) ------------------------------

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


def read_points(table: Path, where: dict[str, str] | None = None) -> list[MixPoint]:
    """The finished points of a sweep table (tools/sweep_table.py's JSON, or its sweep folder).

    ``where`` keeps the points whose overrides have these values (one slice of a sweep that also
    varies, e.g., the LR). Raises MixLawError naming the file and the field."""
    table = Path(table)
    if table.is_dir():
        table = table / f"{TABLE_NAME}.json"
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
