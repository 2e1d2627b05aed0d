"""Training curves per domain: training loss (the blend's and, with logging.train_loss_by, each
domain's) and each validation domain's loss against iteration, from Megatron training logs (parsed by
the engine's `parse_train_log`) or TensorBoard event files (Megatron's tags `lm loss` and
`lm loss validation-<domain>`, ours `lm loss by <level>/<domain>` and `tokens by <level>/<domain>`).
"""

from __future__ import annotations

from pathlib import Path

from ellama_megatron.formats.atomic import write_figure_atomic
from ellama_megatron.formats.train_log import TrainLog, parse_domain_tag, parse_train_log

_VALID_TAG = "lm loss validation-"


def read_tensorboard(path: str | Path) -> TrainLog:
    """Scalars from an event file or a folder of them (e.g. ${run_dir}/tensorboard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    log = TrainLog()
    for tag in acc.Tags().get("scalars", []):
        if tag == "lm loss":
            log.train_loss.update({e.step: e.value for e in acc.Scalars(tag)})
        elif tag.startswith(_VALID_TAG) and not tag.endswith((" vs samples", " ppl")):
            log.valid_loss.setdefault(tag[len(_VALID_TAG) :], {}).update({e.step: e.value for e in acc.Scalars(tag)})
        elif domain_tag := parse_domain_tag(tag):  # "lm loss by group/general", "tokens by group/general"
            kind, level, domain = domain_tag
            curves = log.domain_train_loss if kind == "loss" else log.domain_train_tokens
            convert = float if kind == "loss" else int
            curves.setdefault(level, {}).setdefault(domain, {}).update(
                {e.step: convert(e.value) for e in acc.Scalars(tag)}
            )
    return log


def read_curves(path: str | Path) -> TrainLog:
    """A training log (text) or TensorBoard event file/folder."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such log file or TensorBoard folder")
    if p.is_dir() or p.name.startswith("events.out.tfevents"):
        log = read_tensorboard(p)
    else:
        log = parse_train_log(p.read_text(errors="replace"))
    if not log.train_loss and not log.valid_loss:
        raise ValueError(
            f"{p}: no losses found; give Megatron's training log (lines ' iteration N/M | ... lm loss: ...' and "
            "' validation-<domain> loss at iteration N | lm loss value: ...') or its TensorBoard folder"
        )
    return log


def plot_training_curves(log: TrainLog, out_png: str | Path, title: str = "Training curves") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_png)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if log.train_loss:
        it = sorted(log.train_loss)
        ax.plot(it, [log.train_loss[i] for i in it], color="0.6", lw=1, label="train")
    colors = {}  # a domain's training and validation curves share a color
    for level, style in (("group", "-"), ("source", ":")):
        for domain, losses in sorted(log.domain_train_loss.get(level, {}).items()):
            it = sorted(losses)
            (line,) = ax.plot(
                it, [losses[i] for i in it], style, lw=1, color=colors.get(domain), label=f"train {domain}"
            )
            colors[domain] = line.get_color()
    for domain, losses in sorted(log.valid_loss.items()):
        it = sorted(losses)
        ax.plot(it, [losses[i] for i in it], "o-", ms=3, color=colors.get(domain), label=f"validation {domain}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return write_figure_atomic(out, fig)
