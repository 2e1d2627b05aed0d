"""Plan the training blend from target token shares and write the blend file training reads.

    python tools/plan_blend.py data=ellama train=paper
    python tools/plan_blend.py data=ellama train=paper data.groups.general.share=0.3 data.blend_file=runs/abl/blend.json

Composes ellama_megatron/conf/ like recipes/cpt.py (any Hydra override works), reads the manifests that
tools/preprocess_data.py wrote for every source in data.groups, and prints per source: training
tokens available, target share of all training tokens, tokens to be drawn, epochs (passes over
the source), its cap, and the resulting Megatron weight. Fails (exit 2, nothing written) when a
manifest is missing or a source would be repeated beyond its max_epochs. Writes
{"train": [{"prefix", "weight"}], "valid": {group: [prefix, ...]}} to data.blend_file, or to
${run_dir}/blend.json when that is null. Training with data.groups set plans the same blend
itself; the file is for review, for other tools, or for data.blend_file runs.
See docs/data.md for what a Megatron weight means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ellama_megatron import CONF_DIR
from ellama_megatron.cli import run_tool
from ellama_megatron.data.blend_plan import PlanError, plan_blend
from ellama_megatron.data.manifest import ManifestError
from ellama_megatron.formats.atomic import write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/plan_blend.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. data=ellama train=paper data.groups.general.share=0.3"
    )
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=args.overrides)
    try:
        if not cfg.data.get("groups"):
            raise PlanError(f"data={cfg.data} has no `groups`: nothing to plan. Use a config such as data=ellama.")
        plan = plan_blend(cfg.data, float(cfg.train.train_tokens), int(cfg.train.seq_length))
    except (PlanError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = (
        Path(cfg.data.blend_file)
        if cfg.data.get("blend_file")
        else Path(OmegaConf.select(cfg, "run_dir")) / "blend.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, plan.to_blend_dict())
    print(plan.format_table())
    print(f"wrote {out}: {len(plan.to_blend_dict()['train'])} training prefixes, {len(plan.valid)} validation sets")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
