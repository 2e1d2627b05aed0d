"""Merging streams: peak memory stays near one shard, far below the models' size."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest

from ellama_megatron.llama.config import load_model_config
from ellama_megatron.llama.hf import hf_llama_config


def write_sharded_random_weights(out, cfg, seed, shard_bytes):
    """A HF Llama folder of random weights, written tensor by tensor (no model instantiation: fast)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    hf_cfg = hf_llama_config(cfg)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(hf_cfg).state_dict().items()}
    out.mkdir(parents=True)
    hf_cfg.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    groups, cur, size = [], {}, 0
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * 0.02
        if cur and size + t.numel() * 4 > shard_bytes:
            groups.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += t.numel() * 4
    groups.append(cur)
    weight_map = {}
    for i, g in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(g, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in g})
    total = sum(t.numel() * 4 for g in groups for t in g.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


MB = 2**20

# Bound on the merge's peak-RSS growth: the base shard and the adapted shard being read are
# memory-mapped (2 shards), plus working memory (row chunks of 2 MB here, allocator slack).
# Measured on the 2-core VM (2026-11-21): 74 MB growth for two 112 MB models in 20 MB shards
# (6 shards each); the growth was flat from the first shard to the last (no accumulation).
WORKING_BYTES = 48 * MB


@pytest.mark.slow
def test_merge_peak_rss_is_near_one_shard(tmp_path):
    cfg = dataclasses.replace(
        load_model_config("tiny"),
        num_layers=8,
        hidden_size=512,
        ffn_hidden_size=1536,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=64,
        vocab_size=4096,
    )
    for name, seed in [("base", 0), ("adapted", 1)]:
        write_sharded_random_weights(tmp_path / name, cfg, seed, shard_bytes=20 * MB)
    shards = sorted((tmp_path / "base").glob("*.safetensors"))
    model_bytes = sum(f.stat().st_size for f in shards)
    shard_bytes = max(f.stat().st_size for f in shards)
    assert len(shards) >= 3 and model_bytes > 100 * MB

    script = textwrap.dedent(
        f"""
        import json, sys
        from ellama_megatron.merge.merge_hf import merge_hf_folders
        import torch, safetensors, transformers  # everything the merge imports, before the baseline
        from transformers import AutoConfig
        AutoConfig.from_pretrained({str(tmp_path / "base")!r})
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        # Reset the kernel's peak-RSS mark (VmHWM) so the peak measured is the merge's own.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        merge_hf_folders({str(tmp_path / "base")!r}, [{str(tmp_path / "adapted")!r}], [0.5],
                         {str(tmp_path / "out")!r}, progress=False, chunk_bytes=2 * 2**20)
        after = status("VmHWM")
        print(json.dumps({{"before": before, "after": after}}))
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    growth = rss["after"] - rss["before"]
    msg = (
        f"peak RSS grew by {growth / MB:.1f} MB during the merge; shard {shard_bytes / MB:.1f} MB, "
        f"model {model_bytes / MB:.1f} MB, {len(shards)} shards"
    )
    print(msg)
    assert growth < 2 * shard_bytes + WORKING_BYTES, msg
    # ... and far below what loading the models would take (both inputs: 224 MB).
    assert growth < 0.5 * 2 * model_bytes, msg
    assert sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")) == model_bytes
